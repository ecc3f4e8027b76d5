r"""Qwen2-VL-7B-class native-resolution model at pod scale: the 675 M-param native tower (patch 14,
2D RoPE, 2x2 merger), Qwen2-7B (28 layers, 3584 wide, 4 kv heads, q/k/v biases, M-RoPE sections
16/24/24). For planning TPU runs (the plan builds no data or tokenizer); the shapes are the published
model's (Qwen/Qwen2-VL-7B-Instruct's config.json).

  python -m mm_jax.plan --config=configs/qwen2_vl_7b.py --topology=v5p-64

A training row: up to 1024 text tokens and images of up to 28*28*1024 pixels (the largest bucket,
4096 patches: 1024 image tokens), so rows of 2048 tokens. Every part trains (Qwen2-VL's stage 2);
layers scanned with full remat, compute in bfloat16, params and Adam state in float32, FSDP over every
chip. Expected (experiments/README.md, "Plans for TPU topologies"): 8.291 B params, 29,680 model TFLOP
per step (encoder 6076, decoder 21,820); on v5p-64 at 8 rows per chip 34.31 GiB of 95 per chip (XLA
peak 26.01): fits. The compile takes ~2.5 min on a 2-core CPU.
"""
import ml_collections as mlc

from mm_jax.config import files


def get_config(arg: str = "") -> mlc.ConfigDict:
  if arg:
    raise ValueError(f"qwen2_vl_7b has no variants (got {arg!r})")
  c = files.get_config("base")
  c.global_batch_size = 256
  c.total_steps = 10_000
  c.mesh.update(dict(dcn=1, data=1, fsdp=-1, tensor=1))
  c.data.text_len = 1024
  c.data.native.update(dict(min_pixels=56 * 56, max_pixels=28 * 28 * 1024, patch_buckets=(1024, 4096)))
  m = c.model
  m.family, m.connector, m.prefix_attention = "native", "merger", False
  m.dtype, m.param_dtype = "bfloat16", "float32"
  scan = dict(scan=True, remat="full", remat_names=())
  m.encoder = mlc.ConfigDict(dict(patch_size=14, temporal_patch=2, merge=2, width=1280, depth=32,
                                  num_heads=16, mlp_dim=5120, mlp_act="quick_gelu", rope_theta=10_000.0,
                                  **scan))
  m.decoder.update(dict(
      vocab_size=152_064, width=3584, depth=28, num_heads=28, num_kv_heads=4, head_dim=128,
      mlp_dim=18_944, norm="llama", norm_eps=1e-6, mlp_act="silu", embed_scale=False,
      tie_embeddings=False, qkv_bias=True, rope_theta=1_000_000.0, rope_sections=(16, 24, 24), **scan))
  m.family_options.native.placeholder_ids = (151_655, 151_656)  # <|image_pad|>, <|video_pad|>
  c.optim.lr = 1e-5
  c.optim.warmup_steps = 200
  c.optim.rules = ((".*", "trainable"),)
  return c

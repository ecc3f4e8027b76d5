r"""Llama-3.2-11B-Vision-class cross-attention model at pod scale: a ViT-H/14-class encoder at 560 px
(1600 image tokens), a linear connector, Llama 3.1 8B with a gated cross-attention block before every
4th decoder block (8 cross blocks, 1.75 B params). For planning TPU runs (the plan builds no data or
tokenizer); the shapes are the published model's, simplified (one 560 px tile, one 32-layer encoder
where Mllama has 32 local + 8 global layers and concatenates intermediate features).

  python -m mm_jax.plan --config=configs/llama32_vision_11b.py --topology=v5p-64
  python -m mm_jax.plan --config=configs/llama32_vision_11b.py --topology=v5e-256
  python -m mm_jax.plan --config=configs/llama32_vision_11b.py:oversized --topology=v5e-16

Expected (experiments/README.md, "Plans for TPU topologies"): 10.41 B params (2.38 B trainable),
13,143 model TFLOP per step (forward 5693, backward 7450: the frozen LLM's input gradients only);
fits both: v5p-64 at 8 examples per chip 17.92 GiB of 95 per chip, v5e-256 at 1 per chip 3.52 of
15.75 (2xv5e-256 with --config.global_batch_size=512: 5.24). `oversized` on v5e-16: DOES NOT FIT,
XLA needs 547.7 GiB of 15.75 per chip (exit status 2). Each compile takes 1.5-2 min on a 2-core CPU.

Layers (and cross super-blocks) are scanned with full remat, compute in bfloat16, params and Adam
state in float32, FSDP over every chip. Stage: Llama 3.2 Vision's stage 1 (encoder, connector and
cross blocks train; the LLM is frozen: no optimizer state, no weight gradients, but its backward
pass still carries the cross blocks' gradient). Global batch 256 x 1024 text tokens.

Variants (`--config=configs/llama32_vision_11b.py:VARIANT`):
  all        every part trains, the LLM too.
  oversized  `all` without remat: on v5e-16 (16 examples per chip) deliberately too big, the plan
             reports it as not fitting.
"""
import ml_collections as mlc

from mm_jax.config import files


def get_config(arg: str = "") -> mlc.ConfigDict:
  c = files.get_config("base")  # the model, mesh, batch and stage are set here
  c.global_batch_size = 256
  c.total_steps = 10_000
  c.mesh.update(dict(dcn=1, data=1, fsdp=-1, tensor=1))  # FSDP over every chip of a slice
  c.data.image_size = 560
  c.data.text_len = 1024

  m = c.model
  m.family, m.connector = "cross", "linear"
  m.prefix_attention = False
  m.dtype, m.param_dtype = "bfloat16", "float32"
  scan = dict(scan=True, remat="full", remat_names=())
  m.encoder = mlc.ConfigDict(dict(  # ViT-H/14-class
      patch_size=14, width=1280, depth=32, num_heads=16, mlp_dim=5120, norm_eps=1e-5, final_norm=True,
      **scan))
  m.decoder.update(dict(  # Llama 3.1 8B
      vocab_size=128_256, width=4096, depth=32, num_heads=32, num_kv_heads=8, head_dim=128,
      mlp_dim=14_336, norm="llama", norm_eps=1e-5, mlp_act="silu", embed_scale=False,
      tie_embeddings=False, rope_theta=500_000.0, rope_type="llama3", rope_factor=8.0,
      rope_low_freq_factor=1.0, rope_high_freq_factor=4.0, rope_original_max_len=8192, **scan))
  # Cross blocks: the decoder's heads, kv heads, head_dim and MLP width (Mllama's).
  m.family_options.cross.update(dict(every=4, num_heads=0, num_kv_heads=0, head_dim=0, mlp_dim=0))

  c.optim.lr = 2e-5
  c.optim.warmup_steps = 200
  c.optim.rules = (("decoder/.*", "frozen"), (".*", "trainable"))

  for variant in filter(None, arg.split(",")):
    if variant in ("all", "oversized"):
      c.optim.rules = ((".*", "trainable"),)
    if variant == "oversized":
      m.encoder.remat = m.decoder.remat = "none"
    elif variant != "all":
      raise ValueError(f"unknown variant {variant!r} of llama32_vision_11b; known: all, oversized")
  return c

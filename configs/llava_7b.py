r"""LLaVA-1.5-7B-class model at pod scale: CLIP ViT-L/14 at 336 px (576 image tokens; 23 of its 24
layers, the features of layer -2 before the post-LN), the 2-layer MLP connector, Llama 2 7B (Vicuna);
causal attention everywhere, the image after BOS. For planning TPU runs (the plan builds no data or
tokenizer); the shapes are the published model's, the weights random unless imported.

  python -m mm_jax.plan --config=configs/llava_7b.py --topology=v5e-64
  python -m mm_jax.plan --config=configs/llava_7b.py --topology=v6e-32

Expected (experiments/README.md, "Plans for TPU topologies"): 7.05 B params (6.76 B trainable),
11,292 model TFLOP per step; fits both: v5e-64 at 2 examples per chip 7.46 GiB of 15.75 per chip
(XLA peak 5.09), v6e-32 at 4 per chip 13.41 of 31.25. The compile takes 2-3.5 min on a 2-core CPU.

Layers are scanned with full remat, compute in bfloat16, params and Adam state in float32, FSDP over
every chip. Stage: LLaVA-1.5's stage 2 (instruction tuning: connector and LLM train, the encoder is
frozen). Global batch 128 (LLaVA-1.5's) x 1472 text tokens: 2048 tokens in the decoder per example.

Variants (`--config=configs/llava_7b.py:VARIANT`):
  stage1  LLaVA's stage 1: only the connector trains (encoder and LLM frozen; the LLM still runs a
          backward pass for the connector's gradient), global batch 256 (LLaVA-1.5's), text 128.
  all     every part trains (the encoder too, at 0.1x the learning rate).
"""
import ml_collections as mlc

from mm_jax.config import files


def get_config(arg: str = "") -> mlc.ConfigDict:
  c = files.get_config("base")  # the model, mesh, batch and stage are set here
  c.global_batch_size = 128
  c.total_steps = 5_000
  c.mesh.update(dict(dcn=1, data=1, fsdp=-1, tensor=1))  # FSDP over every chip of a slice
  c.data.image_size = 336
  c.data.text_len = 2048 - 576

  m = c.model
  m.family, m.connector = "unified", "mlp"
  m.image_position, m.prefix_attention = 1, False
  m.dtype, m.param_dtype = "bfloat16", "float32"
  scan = dict(scan=True, remat="full", remat_names=())
  m.encoder = mlc.ConfigDict(dict(  # CLIP ViT-L/14-336, up to layer -2
      patch_size=14, width=1024, depth=23, num_heads=16, mlp_dim=4096, norm_eps=1e-5, final_norm=False,
      **scan))
  m.decoder.update(dict(  # Llama 2 7B (Vicuna 1.5)
      vocab_size=32_000, width=4096, depth=32, num_heads=32, num_kv_heads=32, head_dim=128,
      mlp_dim=11_008, norm="llama", norm_eps=1e-5, mlp_act="silu", embed_scale=False,
      tie_embeddings=False, rope_theta=10_000.0, rope_type="default", **scan))

  c.optim.lr = 2e-5
  c.optim.warmup_steps = 150
  c.optim.weight_decay = 0.0
  c.optim.rules = (("encoder/.*", "frozen"), (".*", "trainable"))

  for variant in filter(None, arg.split(",")):
    if variant == "stage1":
      c.optim.rules = (("connector/.*", "trainable"), (".*", "frozen"))
      c.optim.lr = 1e-3
      c.global_batch_size = 256
      c.data.text_len = 128
    elif variant == "all":
      c.optim.rules = ((".*", "trainable"),)
      c.optim.lr_scales = (("encoder/.*", 0.1),)
    else:
      raise ValueError(f"unknown variant {variant!r} of llava_7b; known: stage1, all")
  return c

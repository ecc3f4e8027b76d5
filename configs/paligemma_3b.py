r"""PaliGemma-3B-class model at pod scale: SigLIP so400m/14 at 224 px (256 image tokens), a linear
connector, Gemma 2B; prefix-LM attention, image first. For planning TPU runs (no data or tokenizer is
built by the plan); the shapes are the published model's, the weights random unless imported.

  python -m mm_jax.plan --config=configs/paligemma_3b.py --topology=v5e-16
  python -m mm_jax.plan --config=configs/paligemma_3b.py --topology=v5p-32

Expected (experiments/README.md, "Plans for TPU topologies"): 2.92 B params, 1665 model TFLOP per
step (104 per chip); fits both, at 16 examples per chip: v5e-16 9.16 GiB of 15.75 per chip (XLA peak
8.24), v5p-32 10.00 of 95 (with --config.global_batch_size=1024, 64 per chip: 26.5 of 95). The
compile takes 1-4 min on a 2-core CPU.

Layers are scanned with full remat (each block keeps only its input for the backward), compute in
bfloat16, params and Adam state in float32, FSDP over every chip. Stage: PaliGemma's stage 1 (every
part trains, the encoder at 0.1x the learning rate). Global batch 256 x 128 text tokens (384 tokens in
the decoder per example).

Variants (`--config=configs/paligemma_3b.py:VARIANT`):
  448             448 px, 1024 image tokens (PaliGemma's stage-2 resolution), global batch 128.
  frozen_encoder  the encoder frozen (forward only, no optimizer state for it).
"""
import ml_collections as mlc

from mm_jax.config import files


def get_config(arg: str = "") -> mlc.ConfigDict:
  c = files.get_config("base")  # the model, mesh, batch and stage are set here
  c.global_batch_size = 256
  c.total_steps = 10_000
  c.mesh.update(dict(dcn=1, data=1, fsdp=-1, tensor=1))  # FSDP over every chip of a slice
  c.data.image_size = 224
  c.data.text_len = 128

  m = c.model
  m.family, m.connector = "unified", "linear"
  m.image_position, m.prefix_attention = 0, True
  m.dtype, m.param_dtype = "bfloat16", "float32"
  scan = dict(scan=True, remat="full", remat_names=())
  m.encoder = mlc.ConfigDict(dict(  # SigLIP so400m/14
      patch_size=14, width=1152, depth=27, num_heads=16, mlp_dim=4304, norm_eps=1e-6, final_norm=True,
      **scan))
  m.decoder.update(dict(  # Gemma 2B
      vocab_size=257_216, width=2048, depth=18, num_heads=8, num_kv_heads=1, head_dim=256,
      mlp_dim=16_384, norm="gemma", norm_eps=1e-6, mlp_act="gelu_tanh", embed_scale=True,
      tie_embeddings=True, rope_theta=10_000.0, rope_type="default", **scan))

  c.optim.lr = 1e-4
  c.optim.warmup_steps = 500
  c.optim.rules = ((".*", "trainable"),)
  c.optim.lr_scales = (("encoder/.*", 0.1),)

  for variant in filter(None, arg.split(",")):
    if variant == "448":
      c.data.image_size = 448
      c.global_batch_size = 128
    elif variant == "frozen_encoder":
      c.optim.rules = (("encoder/.*", "frozen"), (".*", "trainable"))
      c.optim.lr_scales = ()
    else:
      raise ValueError(f"unknown variant {variant!r} of paligemma_3b; known: 448, frozen_encoder")
  return c

r"""Images at their own size: the varied-size `shapes_sizes` data (shapes of 16-24 px on 128-160 px
canvases of any aspect) read at a fixed 64 px, natively, or tiled.

  python -m mm_jax.train --config=configs/shapes_native.py:native --workdir=workdirs/native
  python -m mm_jax.eval  --config=configs/shapes_native.py:native --workdir=workdirs/native

Variants (`--config=configs/shapes_native.py:VARIANT`), equal steps and batch:
  fixed   the unified tiny model, every image resized to 64 x 64 (its shapes shrink to 6-12 px)
  native  the native family: each image rounded to multiples of 32 px (patch 16, 2x2 merge), 2D RoPE,
          its own token count, padded to one of data.native.patch_buckets
  anyres  the anyres family: a 64 px base view plus 64 px tiles of the pinpoint canvas that fits best
  test    (with one of the above) a very small model and dataset, for the test suite.
Expected at 1500 steps (test EM, experiments/README.md "Images at their own resolution, and video"):
fixed 0.386, native 0.5395, anyres 0.438; ~15 / 30 / 50 min on 2 shared cores.
"""
import ml_collections as mlc

from mm_jax.config import files


def get_config(arg: str = "native") -> mlc.ConfigDict:
  variants = [v for v in arg.split(",") if v]
  c = files.get_config("shapes_tiny")
  c.data.name = "shapes_sizes"
  c.data.num_train, c.data.num_validation, c.data.num_test = 8000, 200, 500
  c.data.image_processor = "siglip"  # a bicubic resize, as the native and tiled paths use
  kind = next((v for v in variants if v in ("fixed", "native", "anyres")), "native")
  if kind == "native":
    c.model.family, c.model.connector = "native", "merger"
    c.model.encoder = mlc.ConfigDict(dict(patch_size=16, temporal_patch=1, merge=2, width=128, depth=3,
                                          num_heads=4, mlp_dim=512, mlp_act="gelu_tanh"))
    c.model.decoder.rope_sections = (4, 6, 6)  # M-RoPE over head_dim 32
    c.data.native.update(dict(min_pixels=128 * 128, max_pixels=160 * 160, patch_buckets=(64, 80, 100)))
  elif kind == "anyres":
    c.model.family, c.model.connector = "anyres", "linear"
    c.model.family_options.anyres.pinpoints = ((64, 128), (128, 64), (128, 128))
  for v in variants:
    if v == "test":
      c.total_steps, c.global_batch_size, c.log_every, c.checkpoint_every = 4, 8, 2, 2
      c.data.num_train, c.data.num_validation, c.data.num_test = 64, 16, 16
      c.eval.batch_size = 8
    elif v not in ("fixed", "native", "anyres"):
      raise ValueError(f"unknown variant {v!r} of shapes_native; known: fixed, native, anyres, test")
  return c

r"""Tiny PaliGemma-style model on the generated `shapes` dataset: the default job.

Trains on a 2-core CPU in minutes and answers held-out questions about colour, shape, count, position and
presence of shapes in 64x64 images.

  python -m mm_jax.train --config=configs/shapes_tiny.py --workdir=workdirs/tiny
  python -m mm_jax.eval  --config=configs/shapes_tiny.py --workdir=workdirs/tiny

Expected on a 2-core CPU: about 8 minutes of training (3000 steps at ~6 steps/s), then test
vqa_exact_match 0.84 (colour 0.68, shape 0.95, count 0.88, presence 0.86); 0.82-0.84 over seeds 0-2,
and the earlier code 0.82-0.93 over the same seeds (experiments/README.md: "Your own data"), which also
has the measurements and how the settings were chosen.

Variants (`--config=configs/shapes_tiny.py:VARIANT`):
  blind   every image replaced by a constant: what the text alone can give (expect <= 0.45).
  test    a very small model and dataset, for the test suite.
"""
import ml_collections as mlc

from mm_jax.config import files


def get_config(arg: str = "") -> mlc.ConfigDict:
  c = files.get_config("base")  # configs/base.py documents every field; the demo's choices below
  c.total_steps = 3000
  c.global_batch_size = 64
  c.data.name = "shapes"
  c.data.image_size = 64
  c.data.text_len = 26               # a 4-shape caption needs 25, + bos
  c.data.caption_ratio = 1.0
  c.model.family = "unified"
  c.model.connector = "linear"
  c.model.connector_options.resampler.update(dict(num_queries=8, depth=2, num_heads=4, mlp_dim=512))
  c.model.encoder.update(dict(patch_size=16, width=128, depth=3, num_heads=4, mlp_dim=512))
  c.model.decoder.update(dict(width=128, depth=3, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=512))
  c.optim.lr = 2e-3

  for variant in filter(None, arg.split(",")):
    if variant == "blind":
      c.data.blind = True
    elif variant == "test":
      _shrink_for_tests(c)
    else:
      raise ValueError(f"unknown variant {variant!r} of shapes_tiny; known: blind, test")
  return c


def _shrink_for_tests(c: mlc.ConfigDict) -> None:
  c.total_steps = 4
  c.global_batch_size = 8
  c.log_every = 2
  c.checkpoint_every = 2
  c.data.num_train, c.data.num_validation, c.data.num_test = 64, 16, 16
  c.data.image_size = 32
  c.data.text_len = 20
  c.data.caption_ratio = 0.0
  c.model.encoder.update(dict(patch_size=8, width=32, depth=1, num_heads=2, mlp_dim=64))
  c.model.decoder.update(dict(width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64))
  c.model.connector_options.resampler.update(dict(num_queries=6, depth=1, num_heads=2, mlp_dim=64))
  c.optim.warmup_steps = 1
  c.eval.batch_size = 8


# --- Sweeps: python -m mm_jax.sweep --config=configs/shapes_tiny.py --sweep=NAME --workdir=DIR ---
# (`--list` shows them.) A sweep is a list, or a generator, of points; a point is a dict of dotted
# overrides applied to get_config(arg) after the --config.x=y flags given to mm_jax.sweep.

def get_sweeps() -> dict:
  return {
      # The four connectors at the default budget (experiments/README.md, "Sweeps": 600 steps on CPU).
      "connector": [{"model.connector": c} for c in ("linear", "mlp", "resampler", "pixel_shuffle")],
      # The peak learning rate around the default 2e-3 (a generator works as well as a list).
      "lr": ({"optim.lr": lr} for lr in (5e-4, 1e-3, 2e-3, 4e-3)),
      # For the tests (with :test): one field of each kind a flag can set: str, float, tuple, bool, int.
      "smoke": [
          {},
          {"model.connector": "mlp", "optim.lr": 1e-3},
          {"model.connector": "pixel_shuffle", "optim.lr_scales": (("encoder/.*", 0.5),)},
          {"model.connector": "resampler", "model.prefix_attention": False, "seed": 1},
      ],
  }

r"""SigLIP contrastive pretraining on `shapes` (image, caption) pairs: the encoder of configs/shapes_tiny.py
(same fields, so it loads there by init.parts) plus a MAP head, a small text tower and the sigmoid loss.

  python -m mm_jax.train --config=configs/siglip_shapes.py --workdir=workdirs/siglip
  python -m mm_jax.eval  --config=configs/siglip_shapes.py --workdir=workdirs/siglip
  # then the unified model on this encoder, frozen (LLaVA stage 1):
  python -m mm_jax.train --config=configs/shapes_tiny.py --workdir=workdirs/tiny_from_siglip_frozen \
      --config.init.parts='(("workdirs/siglip", "encoder/", "encoder/"),)' \
      --config.optim.rules='(("encoder/.*", "frozen"), (".*", "trainable"))'

Expected on a 2-core CPU: about 5 minutes of training (1500 steps of 128 pairs at ~5 steps/s on
shared cores), then on the 395 of 500 test images whose caption is unique in the split: image->text
recall@1 0.97, text->image recall@1 0.97. The unified model on the frozen encoder passes test
vqa_exact_match 0.85 at step 750 (from scratch: 2500) and ends at 0.99 (from scratch: 0.91); fine-tuning
the encoder from step 0 at shapes_tiny's lr instead ends at 0.84. experiments/README.md ("SigLIP
pretraining") has the measurements.

Variants (`--config=configs/siglip_shapes.py:VARIANT`):
  softmax  the CLIP loss (softmax cross-entropy both ways) instead of the sigmoid loss.
  test     a very small model and dataset, for the test suite.
"""
import ml_collections as mlc

from mm_jax.config import files


def get_config(arg: str = "") -> mlc.ConfigDict:
  variants = [v for v in arg.split(",") if v]
  unknown = set(variants) - {"softmax", "test"}
  if unknown:
    raise ValueError(f"unknown variant {sorted(unknown)[0]!r} of siglip_shapes; known: softmax, test")
  # Built on shapes_tiny (its :test variant for tests): its data, schedule and encoder, which must match
  # for the unified model to load this encoder.
  c = files.get_config("shapes_tiny", "test" if "test" in variants else "")
  c.total_steps = 1500
  c.global_batch_size = 128
  c.checkpoint_every = 500
  c.data.text_len = 20               # caption + eos, padded (the longest caption needs all 20)

  c.model.family = "siglip"          # models.FAMILIES
  c.model.text = mlc.ConfigDict(dict(  # siglip.TextEncoder; out_dim is the encoder width
      vocab_size=0,                  # 0: the tokenizer's
      width=128, depth=2, num_heads=4, mlp_dim=512, max_len=c.data.text_len, norm_eps=1e-6))
  # model.family_options.siglip: logit scale log(10) and bias -10 at init (base's)

  c.optim.loss = "sigmoid"           # "sigmoid" (SigLIP) | "softmax" (CLIP); contrastive.LOSSES
  c.optim.lr = 1e-3
  c.eval.batch_size = 256

  if "softmax" in variants:
    c.optim.loss = "softmax"
    c.model.family_options.siglip.logit_bias_init = 0.0  # a constant shift: the softmax ignores it
  if "test" in variants:
    c.total_steps = 4
    c.global_batch_size = 8
    c.checkpoint_every = 2
    c.model.text.update(dict(width=32, depth=1, num_heads=2, mlp_dim=64, max_len=20))
    c.eval.batch_size = 8
  return c

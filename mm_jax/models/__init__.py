"""Model registries: `model.family` picks a Family record, `model.connector` a connector, a family's
encoder one of ENCODERS. `python -m mm_jax.models` lists them.

  model = build_model(config.model, tokenizer.vocab_size)
A new family is one module defining its Family record (models/family.py) plus one line below.
"""
import ml_collections as mlc

from mm_jax.models import anyres, cross_attention, hybrid, native, siglip, vlm
from mm_jax.models.connectors import CONNECTORS
from mm_jax.models.encoders import ENCODERS
from mm_jax.models.family import Family, options, pick

FAMILIES: dict[str, Family] = {
    "unified": vlm.UNIFIED,
    "lm": vlm.LM,
    "fuyu": vlm.FUYU,
    "siglip": siglip.SIGLIP,
    "cross": cross_attention.CROSS,
    "hybrid": hybrid.HYBRID,
    "native": native.NATIVE,
    "anyres": anyres.ANYRES,
}


def family_of(model_cfg: mlc.ConfigDict) -> Family:
  """FAMILIES[model.family], an unknown name an error naming the known ones."""
  return pick(FAMILIES, model_cfg.family, "model.family")


def example_batch(config: mlc.ConfigDict, task, batch: int = 1) -> dict:
  """Zeros shaped like a training batch of the config's task, with its family's own keys."""
  b = task.example_batch(config, batch)
  extra = family_of(config.model).example_inputs
  return {**b, **extra(config, batch)} if extra else b


def model_inputs(model, task) -> tuple[str, ...]:
  """The batch keys model.__call__ takes, in order: the model's own (native) or its task's."""
  return getattr(model, "inputs", None) or task.inputs


def build_model(model_cfg: mlc.ConfigDict, tokenizer_vocab: int):
  """The model a config describes; `tokenizer_vocab` is the tokenizer's size."""
  return family_of(model_cfg).build(model_cfg, tokenizer_vocab)


def tokens_per_image(config: mlc.ConfigDict) -> int:
  """The tokens one image of data.image_size puts in the decoder's sequence; 0 for families whose
  images are cross-attended (cross) or ignored (lm). What the data rows reserve per image."""
  if not family_of(config.model).image_in_sequence:
    return 0
  s = config.data.image_size
  vocab = config.model.decoder.vocab_size or config.data.vocab_size  # any the builder accepts: unused
  return build_model(config.model, vocab).num_image_tokens((1, s, s, 3))

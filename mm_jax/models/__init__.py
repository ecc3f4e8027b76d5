"""Model registry: a config's `model.family` and `model.connector` pick the classes."""
import ml_collections as mlc

from mm_jax.errors import UserError
from mm_jax.models.connectors import CONNECTORS
from mm_jax.models.gemma import Decoder
from mm_jax.models.vit import ViT
from mm_jax.models.vlm import UnifiedVLM

FAMILIES = {"unified": UnifiedVLM}


def _pick(registry: dict, name: str, field: str):
  if name not in registry:
    raise UserError(f"unknown {field} {name!r}; known: {', '.join(sorted(registry))} "
                    f"(set --config.{field}=NAME)")
  return registry[name]


def build_model(model_cfg: mlc.ConfigDict, vocab_size: int):
  """The model a config describes; `vocab_size` comes from the tokenizer."""
  family = _pick(FAMILIES, model_cfg.family, "model.family")
  connector = _pick(CONNECTORS, model_cfg.connector, "model.connector")
  return family(encoder=ViT(**model_cfg.encoder),
                connector=connector(model_cfg.decoder.width),
                decoder=Decoder(vocab_size=vocab_size, **model_cfg.decoder))

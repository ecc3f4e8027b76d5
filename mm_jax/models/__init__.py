"""Model registry: a config's `model.family` picks a builder, `model.connector` a connector.

Config fields map one to one onto module fields (model.encoder -> vit.ViT, model.decoder -> decoder.Decoder
with its `rope_*` fields -> layers.Rope, model.connector_options.<name> -> CONNECTORS[name]); a field left
out takes the module's default. `python -m mm_jax.models` lists the registries.
"""
import dataclasses

import jax.numpy as jnp
import ml_collections as mlc

from mm_jax.errors import UserError
from mm_jax.models.connectors import CONNECTORS
from mm_jax.models.cross_attention import cross_attention
from mm_jax.models.decoder import Decoder
from mm_jax.models.hybrid import hybrid
from mm_jax.models.layers import Rope
from mm_jax.models.siglip import MAPHead, SigLIP, TextEncoder
from mm_jax.models.vit import RawPatches, ViT
from mm_jax.models.vlm import UnifiedVLM

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _pick(registry: dict, name: str, field: str):
  if name not in registry:
    raise UserError(f"unknown {field} {name!r}; known: {', '.join(sorted(registry))} "
                    f"(set --config.{field}=NAME)")
  return registry[name]


def options(cls, exclude=()) -> list[str]:
  """The config-settable fields of a module class (those not set by the builder)."""
  return sorted({f.name for f in dataclasses.fields(cls)} - {"parent", "name", *exclude})


def _make(cls, fields: dict, section: str, **extra):
  known = options(cls, extra)
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise UserError(f"model.{section}.{unknown[0]} is not a field of {cls.__name__}; known: "
                    f"{', '.join(known) or '(none)'}")
  return cls(**fields, **extra)


def dtypes(model_cfg: mlc.ConfigDict) -> dict:
  """{"dtype", "param_dtype"} from model.dtype / model.param_dtype ('float32' or 'bfloat16')."""
  out = {}
  for field in ("dtype", "param_dtype"):
    name = model_cfg.get(field, "float32")
    out[field] = _pick(DTYPES, name, f"model.{field}")
  return out


def build_encoder(model_cfg: mlc.ConfigDict) -> ViT:
  return _make(ViT, dict(model_cfg.encoder), "encoder", **dtypes(model_cfg))


def vocab_size(model_cfg: mlc.ConfigDict, tokenizer_vocab: int) -> int:
  """decoder.vocab_size if set (an imported model's), else the tokenizer's; never less than it."""
  v = model_cfg.decoder.get("vocab_size", 0) or tokenizer_vocab
  if v < tokenizer_vocab:
    raise UserError(f"the tokenizer has {tokenizer_vocab} pieces but model.decoder.vocab_size is {v}; "
                    "use the tokenizer the model was trained with (data.tokenizer)")
  return v


def build_decoder(model_cfg: mlc.ConfigDict, tokenizer_vocab: int) -> Decoder:
  fields = {k: v for k, v in dict(model_cfg.decoder).items() if k != "vocab_size"}
  rope_fields = {k[len("rope_"):]: fields.pop(k) for k in list(fields) if k.startswith("rope_")}
  try:
    rope = Rope(**rope_fields)
  except TypeError as e:
    raise UserError(f"model.decoder has an unknown rope_* field ({e}); known: "
                    f"{', '.join('rope_' + f.name for f in dataclasses.fields(Rope))}") from None
  return _make(Decoder, fields, "decoder", rope=rope, vocab_size=vocab_size(model_cfg, tokenizer_vocab),
               **dtypes(model_cfg))


def build_connector(model_cfg: mlc.ConfigDict):
  """CONNECTORS[model.connector] with its options from model.connector_options.<name>. Every section
  there is checked (a typo in another connector's options is an error too) but only the chosen one used."""
  cls = _pick(CONNECTORS, model_cfg.connector, "model.connector")
  sections = dict(model_cfg.get("connector_options", None) or {})
  extra = dict(width=model_cfg.decoder.width, **dtypes(model_cfg))
  made = {}
  for name, fields in sections.items():
    if name not in CONNECTORS:
      raise UserError(f"model.connector_options.{name}: unknown connector; known: "
                      f"{', '.join(sorted(CONNECTORS))}")
    made[name] = _make(CONNECTORS[name], dict(fields), f"connector_options.{name}", **extra)
  return made[model_cfg.connector] if model_cfg.connector in made else cls(**extra)


def unified(model_cfg: mlc.ConfigDict, tokenizer_vocab: int) -> UnifiedVLM:
  """Method A: image tokens from the connector in the decoder's sequence (PaliGemma, LLaVA)."""
  return UnifiedVLM(encoder=build_encoder(model_cfg),
                    connector=build_connector(model_cfg),
                    decoder=build_decoder(model_cfg, tokenizer_vocab),
                    image_position=model_cfg.get("image_position", 0),
                    prefix_attention=model_cfg.get("prefix_attention", True))


def fuyu(model_cfg: mlc.ConfigDict, tokenizer_vocab: int) -> UnifiedVLM:
  """Fuyu: raw pixel patches, no image encoder, through the connector into the decoder's sequence.

  Patches of model.encoder.patch_size (the encoder's other fields are unused) go through the connector
  (linear in Fuyu) straight into the decoder's sequence."""
  return UnifiedVLM(encoder=RawPatches(model_cfg.encoder.patch_size),
                    connector=build_connector(model_cfg),
                    decoder=build_decoder(model_cfg, tokenizer_vocab),
                    image_position=model_cfg.get("image_position", 0),
                    prefix_attention=model_cfg.get("prefix_attention", True))


def language_model(model_cfg: mlc.ConfigDict, tokenizer_vocab: int) -> UnifiedVLM:
  """The decoder alone (an imported Gemma / Llama): a causal LM that ignores the image."""
  return UnifiedVLM(encoder=None, connector=None, decoder=build_decoder(model_cfg, tokenizer_vocab),
                    prefix_attention=model_cfg.get("prefix_attention", False))


def siglip(model_cfg: mlc.ConfigDict, tokenizer_vocab: int) -> SigLIP:
  """Two towers: model.encoder (ViT) + a MAP head of the encoder's heads / mlp_dim, model.text
  (TextEncoder; vocab_size 0 or absent: the tokenizer's), projected to the encoder's width."""
  encoder = build_encoder(model_cfg)
  kw = dtypes(model_cfg)
  fields = dict(model_cfg.text)
  v = fields.pop("vocab_size", 0) or tokenizer_vocab
  if v < tokenizer_vocab:
    raise UserError(f"the tokenizer has {tokenizer_vocab} pieces but model.text.vocab_size is {v}; "
                    "use the tokenizer the model was trained with (data.tokenizer)")
  text = _make(TextEncoder, fields, "text", vocab_size=v, out_dim=encoder.width, **kw)
  head = MAPHead(encoder.num_heads, encoder.mlp_dim, encoder.norm_eps, **kw)
  init = {k: model_cfg[k] for k in ("logit_scale_init", "logit_bias_init") if k in model_cfg}
  return SigLIP(encoder=encoder, map_head=head, text=text, **init)


FAMILIES = {"unified": unified, "lm": language_model, "siglip": siglip, "cross": cross_attention,
            "hybrid": hybrid, "fuyu": fuyu}


def build_model(model_cfg: mlc.ConfigDict, tokenizer_vocab: int):
  """The model a config describes; `tokenizer_vocab` is the tokenizer's size."""
  return _pick(FAMILIES, model_cfg.family, "model.family")(model_cfg, tokenizer_vocab)

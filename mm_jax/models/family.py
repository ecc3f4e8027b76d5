"""What a model family is, as one record, and the builders families share.

  FAMILIES["cross"] = Family(build=cross_attention, check=check, options=CrossOptions)
A family's module (vlm.py, cross_attention.py, ...) defines its record; models/__init__.py lists them.
Config fields map one to one onto module fields (model.decoder -> Decoder, its rope_* -> Rope,
model.connector_options.<name> -> CONNECTORS[name], model.family_options.<name> -> Family.options); a
field left out takes the module's default, an unknown one is an error naming the known ones.
"""
import dataclasses
from typing import Callable

import jax.numpy as jnp
import ml_collections as mlc

from mm_jax.errors import UserError
from mm_jax.models.connectors import CONNECTORS
from mm_jax.models.decoder import Decoder
from mm_jax.models.layers import Rope

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


@dataclasses.dataclass(frozen=True)
class Family:
  """build(model_cfg, tokenizer_vocab) -> the flax module, which counts its own FLOPs (count_flops);
  check(config): its sections' fields, before any work (mm_jax.config.validate calls it);
  image_in_sequence: its image tokens sit in the decoder's sequence at model.image_position;
  options: the dataclass of model.family_options.<name> (None: it has none);
  example_inputs(config, batch) -> the batch keys its model takes beyond (or instead of) its task's,
  as zeros (native: patches instead of images; None: the task's keys);
  rows(config, tokenizer) -> its data rows, when not data/rows.py's (native: data/native_rows.py)."""
  build: Callable
  check: Callable[[mlc.ConfigDict], None]
  image_in_sequence: bool = False
  options: type | None = None
  example_inputs: Callable | None = None
  rows: Callable | None = None


def pick(registry: dict, name: str, field: str):
  if name not in registry:
    raise UserError(f"unknown {field} {name!r}; known: {', '.join(sorted(registry))} "
                    f"(set --config.{field}=NAME)")
  return registry[name]


def options(cls, exclude=()) -> list[str]:
  """The config-settable fields of a module or options class (those not set by the builder)."""
  return sorted({f.name for f in dataclasses.fields(cls)} - {"parent", "name", *exclude})


def make(cls, fields: dict, section: str, **extra):
  """cls(**fields, **extra), an unknown field of model.<section> an error naming the known ones."""
  known = options(cls, extra)
  unknown = sorted(set(fields) - set(known))
  if unknown:
    raise UserError(f"model.{section}.{unknown[0]} is not a field of {cls.__name__}; known: "
                    f"{', '.join(known) or '(none)'}")
  return cls(**fields, **extra)


def family_options(model_cfg: mlc.ConfigDict, name: str, cls):
  """model.family_options.<name> as an instance of cls (absent: cls's defaults)."""
  return make(cls, dict(model_cfg.family_options.get(name) or {}), f"family_options.{name}")


def dtypes(model_cfg: mlc.ConfigDict) -> dict:
  """{"dtype", "param_dtype"} from model.dtype / model.param_dtype ('float32' or 'bfloat16')."""
  return {field: pick(DTYPES, model_cfg[field], f"model.{field}") for field in ("dtype", "param_dtype")}


def vocab_size(section: str, given: int, tokenizer_vocab: int, rows: int = 0) -> int:
  """model.<section>.vocab_size if set (an imported model's), else the tokenizer's; never less than it,
  nor than the embedding's rows (`rows`: Mllama's tokenizer holds <|image|>, an input-only row)."""
  v = given or tokenizer_vocab
  if max(v, rows) < tokenizer_vocab:
    raise UserError(f"the tokenizer has {tokenizer_vocab} pieces but model.{section}.vocab_size is {v}; "
                    "use the tokenizer the model was trained with (data.tokenizer)")
  return v


def build_decoder(model_cfg: mlc.ConfigDict, tokenizer_vocab: int) -> Decoder:
  fields = {k: v for k, v in dict(model_cfg.decoder).items() if k != "vocab_size"}
  rope_fields = {k[len("rope_"):]: fields.pop(k) for k in list(fields) if k.startswith("rope_")}
  if "sections" in rope_fields:  # a static module field: hashable
    rope_fields["sections"] = tuple(rope_fields["sections"])
  try:
    rope = Rope(**rope_fields)
  except TypeError as e:
    raise UserError(f"model.decoder has an unknown rope_* field ({e}); known: "
                    f"{', '.join('rope_' + f.name for f in dataclasses.fields(Rope))}") from None
  vocab = vocab_size("decoder", model_cfg.decoder.vocab_size, tokenizer_vocab, fields.get("embed_rows", 0))
  return make(Decoder, fields, "decoder", rope=rope, vocab_size=vocab, **dtypes(model_cfg))


def build_connector(model_cfg: mlc.ConfigDict):
  """CONNECTORS[model.connector] with its options from model.connector_options.<name>. Every section
  there is checked (a typo in another connector's options is an error too) but only the chosen one used."""
  cls = pick(CONNECTORS, model_cfg.connector, "model.connector")
  extra = dict(width=model_cfg.decoder.width, **dtypes(model_cfg))
  made = {}
  for name, fields in dict(model_cfg.connector_options or {}).items():
    if name not in CONNECTORS:
      raise UserError(f"model.connector_options.{name}: unknown connector; known: "
                      f"{', '.join(sorted(CONNECTORS))}")
    made[name] = make(CONNECTORS[name], dict(fields), f"connector_options.{name}", **extra)
  return made[model_cfg.connector] if model_cfg.connector in made else cls(**extra)

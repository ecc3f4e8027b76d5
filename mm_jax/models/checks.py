"""Startup checks of the model sections the families share (decoder, text tower); each family's check
calls those it reads, so mm_jax.config.validate names no family.

  decoder(config)   # model.decoder: sizes, heads against kv heads, RoPE's even head_dim, its choices
"""
from mm_jax.config import fields
from mm_jax.errors import UserError
from mm_jax.models.layers import ACTIVATIONS

NORMS = ("gemma", "llama")          # layers.RMSNorm's forms
ROPE_TYPES = ("default", "llama3")  # layers.Rope.type


def decoder(config) -> None:
  d = "model.decoder"
  for field in ("width", "depth", "num_heads", "num_kv_heads", "mlp_dim"):
    fields.integer(config, f"{d}.{field}", 1)
  fields.integer(config, f"{d}.vocab_size", 0)
  rows = fields.integer(config, f"{d}.embed_rows", 0)
  if rows:
    vocab, tied = fields.get(config, f"{d}.vocab_size"), fields.get(config, f"{d}.tie_embeddings")
    if tied is True or (vocab and rows < vocab):
      raise UserError(f"{d}.embed_rows={rows} needs an untied head ({d}.tie_embeddings=False) and at "
                      f"least {d}.vocab_size rows; set it to 0 (vocab_size rows) otherwise")
  head_dim = fields.integer(config, f"{d}.head_dim", 2)
  if head_dim and head_dim % 2:  # RoPE rotates pairs of dims
    raise UserError(f"{d}.head_dim={head_dim} must be even (RoPE rotates pairs); set "
                    f"--config.{d}.head_dim")
  heads, kv = fields.get(config, f"{d}.num_heads"), fields.get(config, f"{d}.num_kv_heads")
  if heads is not fields.ABSENT and kv is not fields.ABSENT and heads % kv:
    raise UserError(f"{d}.num_heads={heads} must be a multiple of {d}.num_kv_heads={kv} (grouped-query "
                    f"attention); set --config.{d}.num_kv_heads to a divisor of {heads}")
  fields.choice(config, f"{d}.norm", NORMS)
  fields.choice(config, f"{d}.mlp_act", tuple(ACTIVATIONS))
  fields.choice(config, f"{d}.rope_type", ROPE_TYPES)
  fields.number(config, f"{d}.norm_eps", 0, lo_open=True)
  fields.number(config, f"{d}.rope_theta", 0, lo_open=True)


def image_position(config) -> None:
  """model.image_position of a family whose image tokens sit in the sequence."""
  fields.integer(config, "model.image_position", 0)

"""Typed reads of config fields for the startup checks: each raises UserError naming the field and the fix.

  fields.integer(config, "model.decoder.depth", 1)    # the int at the path (None if absent), >= 1
A field absent from the config is skipped (None), so a check written for one family's sections reads
another family's config safely.
"""
import math

import ml_collections as mlc

from mm_jax.errors import UserError

ABSENT = object()


def get(config, path: str):
  """The value at a dotted path, or ABSENT."""
  node = config
  for key in path.split("."):
    if not isinstance(node, (mlc.ConfigDict, dict)) or key not in node:
      return ABSENT
    node = node[key]
  return node


def is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def integer(config, path: str, lo: int):
  """The int at `path` (None if absent), >= lo."""
  v = get(config, path)
  if v is ABSENT:
    return None
  if not is_int(v) or v < lo:
    raise UserError(f"{path}={v!r} must be an integer >= {lo}; set --config.{path}")
  return v


def number(config, path: str, lo: float, hi: float = math.inf, lo_open=False, hi_open=False):
  """The number at `path` (None if absent), in the interval [lo, hi] (open ends as given)."""
  v = get(config, path)
  if v is ABSENT:
    return None
  ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
  if not ok:
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if hi == math.inf:
      span = f"{'> ' if lo_open else '>= '}{lo:g}"
    raise UserError(f"{path}={v!r} must be a number {span}; set --config.{path}")
  return v


def boolean(config, path: str) -> None:
  v = get(config, path)
  if v is not ABSENT and not isinstance(v, bool):
    raise UserError(f"{path}={v!r} must be True or False; set --config.{path}")


def choice(config, path: str, known) -> None:
  v = get(config, path)
  if v is not ABSENT and v not in known:
    raise UserError(f"{path}={v!r} is unknown; use one of {', '.join(known)} (--config.{path}=...)")


def heads(section: str, width: int | None, num_heads: int | None) -> None:
  """model.<section>.num_heads must divide its width."""
  if width and num_heads and width % num_heads:
    raise UserError(f"model.{section}.num_heads={num_heads} must divide model.{section}.width={width}; "
                    f"set --config.model.{section}.num_heads to a divisor of {width}")

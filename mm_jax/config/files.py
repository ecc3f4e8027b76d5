"""Config files: the one loader of configs/*.py and of `path.py[:arg]` specs, and `complete`.

  c = files.get_config("shapes_tiny", "test")   # configs/<name>.py's get_config(arg), by name
  c = files.load("configs/recipes.py:llava")     # a spec as --config takes it (cwd, then the repo)
  c = files.complete(c)                          # every field of configs/base.py present

`complete` is how configs written before a field (an imported model's OUT/config.py, a user's own
file) keep working: missing fields take base's defaults, and the old flat family fields move to
model.family_options (LEGACY).
"""
import importlib.util
import os
import pathlib

import ml_collections as mlc

from mm_jax.errors import UserError

REPO = pathlib.Path(__file__).resolve().parents[2]
DIRECTORY = str(REPO / "configs")

# Flat model fields of configs written before model.family_options: old name -> (family, field).
LEGACY = {
    "cross_every": ("cross", "every"), "cross_num_heads": ("cross", "num_heads"),
    "cross_num_kv_heads": ("cross", "num_kv_heads"), "cross_head_dim": ("cross", "head_dim"),
    "cross_mlp_dim": ("cross", "mlp_dim"), "cross_last_image_only": ("cross", "last_image_only"),
    "hybrid_tiles": ("hybrid", "tiles"), "logit_scale_init": ("siglip", "logit_scale_init"),
    "logit_bias_init": ("siglip", "logit_bias_init"),
}


def path(file: str) -> str:
  """A config file's path: as given if it exists (or is absolute), else relative to the repository."""
  if os.path.exists(file) or os.path.isabs(file):
    return file
  if not (REPO / file).exists():
    raise UserError(f"config file {file} not found here nor in {REPO}")
  return str(REPO / file)


def module(file: str):
  """The config file's module, imported from its path."""
  spec = importlib.util.spec_from_file_location(f"_config_{pathlib.Path(file).stem}", path(file))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def load(spec: str) -> mlc.ConfigDict:
  """'path.py[:arg]' as --config loads it."""
  file, _, arg = spec.partition(":")
  return module(file).get_config(arg)


def get_config(name: str, arg: str = "") -> mlc.ConfigDict:
  """configs/<name>.py's get_config(arg)."""
  return module(os.path.join(DIRECTORY, f"{name}.py")).get_config(arg)


def _merge(base: dict, over: dict) -> dict:
  out = dict(base)
  for key, value in over.items():
    both = isinstance(value, dict) and isinstance(out.get(key), dict)
    out[key] = _merge(out[key], value) if both else value
  return out


def complete(config: mlc.ConfigDict) -> mlc.ConfigDict:
  """config with every field of configs/base.py (its own values win), legacy flat fields moved."""
  own = config.to_dict()
  model = own.get("model", {})
  for old, (family, field) in LEGACY.items():
    if old in model:
      model.setdefault("family_options", {}).setdefault(family, {})[field] = model.pop(old)
  return mlc.ConfigDict(_merge(get_config("base").to_dict(), own))

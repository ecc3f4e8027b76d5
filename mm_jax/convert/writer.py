"""Checks a checkpoint's headers against the model, then streams its tensors into params and writes
OUT: checkpoints/0 (params only), config.py and tokenizer.model."""
import json
import math
import os
import re
import shutil

import jax
import ml_collections as mlc
import numpy as np

from mm_jax.checkpoint import Checkpoints, workdir_path
from mm_jax.convert import names
from mm_jax.convert.reader import FLOAT_DTYPES, HFCheckpoint
from mm_jax.errors import UserError
from mm_jax.models.stack import path_str


def flat_params(abstract) -> dict:
  return {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]}


def check(ckpt: HFCheckpoint, layout: str, entries: list[names.Entry], skipped: re.Pattern | None,
          abstract: dict) -> None:
  """Every expected tensor present with the shape the model needs, no unexpected one: headers only."""
  ours = {e.ours for e in entries}
  assert ours == set(abstract) and len(ours) == len(entries), (  # a mapping bug, not bad input
      sorted(ours ^ set(abstract))[:5])
  files, prefixes = {}, {}  # canonical -> file name; canonical prefix -> the file's prefix for it
  for name in ckpt.headers:
    c = names.canonical(name, layout)
    if c is not None and c in files:
      raise UserError(f"{ckpt.directory} holds both {files[c]} and {name}, two layouts of one tensor")
    files[c if c is not None else name] = name
    if c is not None:
      part = c.split(".", 1)[0] + "."
      prefixes.setdefault(part, name[:len(name) - len(c) + len(part)])
  expected = {e.hf for e in entries}
  for c, name in sorted(files.items()):
    if c not in expected and not (skipped is not None and skipped.fullmatch(c)):
      raise UserError(f"unexpected tensor {name} in {ckpt.directory}: the model config.json describes "
                      "has no place for it (a different architecture or config?)")
  for e in entries:
    if e.hf not in files:
      part, rest = e.hf.split(".", 1)
      raise UserError(f"tensor {prefixes.get(part + '.', part + '.') + rest} (for {e.ours}) is "
                      f"missing from {ckpt.directory}")
    name = files[e.hf]
    shape, dtype = ckpt.headers[name]
    want = e.hf_shape(abstract[e.ours].shape)
    if shape != want:
      raise UserError(f"tensor {name} in {ckpt.directory} has shape {list(shape)} but config.json "
                      f"implies {list(want)} (for {e.ours})")
    if dtype not in FLOAT_DTYPES:
      raise UserError(f"tensor {name} in {ckpt.directory} has dtype {dtype}; a float is needed")


def stream(ckpt: HFCheckpoint, layout: str, entries: list[names.Entry], abstract: dict) -> dict:
  """The params (nested dicts), each read, transformed, cast and placed with its sharding in turn."""
  file_name = {names.canonical(n, layout) or n: n for n in ckpt.headers}
  params = {}
  # Largest first: a tensor's transient copies then sit on top of the fewest params already held.
  for e in sorted(entries, key=lambda e: -math.prod(abstract[e.ours].shape)):
    target = abstract[e.ours]
    x = np.asarray(ckpt.read(file_name[e.hf], e.part))  # a view: no copy
    x = e.transform(x, target.shape).astype(target.dtype, copy=False)
    node = params
    *parents, leaf = e.ours.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = jax.device_put(x, target.sharding)
    del x  # only the placed param stays
  return params


def refuse_existing(out: str) -> None:
  existing = Checkpoints(out, read_only=True)
  step = existing.latest_step()
  existing.close()
  if step is not None:
    raise UserError(f"--out={out} already holds a checkpoint (step {step} in {existing.directory}); "
                    "give a new directory")


_CONFIG_PY = '''r"""Imported from Hugging Face ({arch}) by
  python -m mm_jax.convert --hf_dir={hf_dir} --out={out}

  python -m mm_jax.eval  --config={out}/config.py --workdir={out}
  python -m mm_jax.train --config={out}/config.py --workdir=NEW   # starts from these params (init.parts)
"""
import json

import ml_collections as mlc

_CONFIG = r"""
{json}
"""


def _tuples(x):
  """JSON has lists where the config has tuples."""
  if isinstance(x, dict):
    return {{k: _tuples(v) for k, v in x.items()}}
  return tuple(_tuples(v) for v in x) if isinstance(x, list) else x


def get_config(arg: str = "") -> mlc.ConfigDict:
  if arg:
    raise ValueError(f"this config has no variants (got {{arg!r}})")
  return mlc.ConfigDict(_tuples(json.loads(_CONFIG)))
'''


def write(out: str, hf_dir: str, arch: str, config: mlc.ConfigDict, params: dict,
          tokenizer: str | None) -> None:
  """OUT/checkpoints/0 (params and, in its meta, the config), OUT/config.py, and a copy of the
  `tokenizer` file at data.tokenizer when that is set."""
  root = workdir_path(out)
  root.mkdir(parents=True, exist_ok=True)
  # Uncompressed: compressing would buffer every array again (experiments/convert_memory.py).
  ckpt = Checkpoints(out, keep=1, compress=False)
  ckpt.save_params(0, params, config)
  ckpt.wait()
  ckpt.close()
  text = json.dumps(json.loads(config.to_json_best_effort()), indent=1)
  (root / "config.py").write_text(_CONFIG_PY.format(arch=arch, hf_dir=hf_dir, out=out, json=text))
  if tokenizer and config.data.tokenizer and os.path.abspath(tokenizer) != os.path.abspath(config.data.tokenizer):
    shutil.copyfile(tokenizer, config.data.tokenizer)

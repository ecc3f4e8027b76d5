r"""A workdir's params -> a Hugging Face checkpoint directory, the inverse of the import.

  export(workdir, out, step=None, max_shard_bytes=2 * 10**9)

The model must descend from a `mm_jax.convert` import: the import keeps the model's config.json, its
tokenizer and processor files and the file name of every tensor in <import>/hf/ (HF_DIR), and export
finds it in the workdir or in a root of its init.parts. Each param becomes its HF tensor by the
inverse of the import's names.Entry (kernels back to (out, in), convs to (D, C, p, p)); the tensors the
import left out because HF's forward does not use them (e.g. LLaVA's vision layers after
vision_feature_layer) are written back from the import's copy. The safetensors files are written by
hand, tensor by tensor (the format is a JSON header and the raw bytes; the safetensors library writes
only whole dicts), so the host holds the params plus one tensor; past max_shard_bytes they are sharded
with model.safetensors.index.json, as save_pretrained shards.
"""
import json
import math
import os
import shutil
import struct

import jax
import ml_dtypes
import numpy as np
from jax.experimental import multihost_utils

from mm_jax.checkpoint import workdir_path
from mm_jax.convert import names
from mm_jax.errors import UserError

HF_DIR = "hf"              # in an import's OUT: config.json, tokenizer/processor files, tensors.json
TENSORS = "tensors.json"   # canonical name -> the name in the HF files, and the layout
UNUSED = "unused.safetensors"  # the file tensors the import skipped that HF's model still has
EXPORTABLE = ("unified", "lm", "siglip", "cross")  # cross: Llama 3.2 Vision
_NP_DTYPES = {"F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "BF16": np.dtype(ml_dtypes.bfloat16),
              "F16": np.dtype(np.float16)}  # the safetensors dtypes a checkpoint's floats come in
_ST_DTYPES = {v: k for k, v in _NP_DTYPES.items()}
# the non-weight files of a save_pretrained directory that the import keeps and export writes back
KEPT_FILES = ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
              "special_tokens_map.json", "tokenizer.model", "spiece.model", "added_tokens.json",
              "preprocessor_config.json", "processor_config.json", "chat_template.json",
              "chat_template.jinja")


def inverse(e: names.Entry, x: np.ndarray) -> np.ndarray:
  """The HF tensor (this entry's block of rows) of our param x: Entry.transform backwards."""
  shape = e.hf_shape(x.shape)
  if e.kind == "linear":
    return np.ascontiguousarray(x.reshape(math.prod(x.shape[:e.n_in]), -1).T).reshape(
        shape[0] // e.part[1], shape[1])
  if e.kind == "conv":
    return np.ascontiguousarray(x.transpose(3, 2, 0, 1))
  if e.kind == "out_first":
    return np.ascontiguousarray(np.moveaxis(x, -1, 0))
  return x.reshape(-1) if e.kind == "flat" else x.reshape(shape)


def lineage(workdir: str, config, stored_config) -> str:
  """The import's hf/ folder this workdir's model descends from: in the workdir, or through the
  init.parts that load the whole model (prefixes '' and ''), followed back run by run (a stage-2 run
  from stage 1 from the import). stored_config(root) -> the config that root's checkpoint holds."""
  seen, todo = set(), [(workdir, config)]
  while todo:
    root, cfg = todo.pop(0)
    path = os.path.join(str(workdir_path(root)), HF_DIR)
    if os.path.isfile(os.path.join(path, TENSORS)):
      return path
    seen.add(str(workdir_path(root)))
    for part in cfg.init.get("parts", ()) or ():
      if tuple(part[1:]) == ("", "") and str(workdir_path(part[0])) not in seen:
        try:
          todo.append((part[0], stored_config(part[0])))
        except UserError:  # a root without a checkpoint holds no lineage
          continue
  raise UserError(f"{workdir} does not descend from a Hugging Face import as a whole model (no "
                  f"{HF_DIR}/{TENSORS} in it, nor in the runs its init.parts load whole); export writes "
                  "models imported with python -m mm_jax.convert (then fine-tuned); re-import with this "
                  "version if the import predates it")


def keep_for_export(out: str, ckpt, layout: str, entries, skipped) -> None:
  """At import: OUT/hf/ with the model's kept files, tensors.json and the unused tensors."""
  root = os.path.join(str(workdir_path(out)), HF_DIR)
  os.makedirs(root, exist_ok=True)
  for name in KEPT_FILES:
    if os.path.isfile(os.path.join(ckpt.directory, name)):
      shutil.copyfile(os.path.join(ckpt.directory, name), os.path.join(root, name))
  file_name = {names.canonical(n, layout) or n: n for n in ckpt.headers}
  converted = {e.hf for e in entries}
  # a tied head's copy and old rotary buffers are not written back: HF rebuilds both
  unused = sorted(f for c, f in file_name.items() if c not in converted and skipped is not None
                  and skipped.fullmatch(c) and not c.startswith("lm_head.") and "rotary_emb" not in c
                  and ckpt.headers[f][1] in _NP_DTYPES)  # integer buffers (position ids): HF rebuilds them
  with open(os.path.join(root, TENSORS), "w") as f:
    json.dump({"layout": layout, "names": {c: file_name[c] for c in converted},
               "shapes": {c: list(ckpt.headers[file_name[c]][0]) for c in converted}, "unused": unused},
              f, indent=1)
  write_safetensors(os.path.join(root, UNUSED),
                    [(f, ckpt.headers[f][0], _NP_DTYPES[ckpt.headers[f][1]], lambda f=f: ckpt.read(f))
                     for f in unused])


def unused_tensors(hf_dir: str) -> list[tuple]:
  """The import's unused tensors, as write_safetensors takes them (read one at a time)."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  path = os.path.join(hf_dir, UNUSED)
  with safe_open(path, framework="flax") as f:
    heads = {n: (tuple(f.get_slice(n).get_shape()), _NP_DTYPES[f.get_slice(n).get_dtype()]) for n in f.keys()}

  def read(n):
    with safe_open(path, framework="flax") as f:
      return np.asarray(f.get_tensor(n))
  return [(n, shape, dtype, lambda n=n: read(n)) for n, (shape, dtype) in sorted(heads.items())]


def write_safetensors(path: str, tensors) -> None:
  """tensors: [(name, shape, numpy dtype, make() -> array)], each made and written in turn."""
  header, offset = {}, 0
  for name, shape, dtype, _ in tensors:
    size = math.prod(shape) * dtype.itemsize
    if dtype not in _ST_DTYPES:
      raise UserError(f"tensor {name} has dtype {dtype}; export writes {', '.join(_NP_DTYPES)} tensors")
    header[name] = {"dtype": _ST_DTYPES[dtype], "shape": list(shape),
                    "data_offsets": [offset, offset + size]}
    offset += size
  header["__metadata__"] = {"format": "pt"}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)  # the data starts 8-byte aligned
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob)
    for name, shape, dtype, make in tensors:
      x = np.ascontiguousarray(np.asarray(make()).astype(dtype, copy=False))
      assert x.shape == tuple(shape), (name, x.shape, shape)
      f.write(x.reshape(-1).view(np.uint8).data)  # the array's own buffer: no bytes copy
      del x


def _host(x: jax.Array) -> np.ndarray:
  return np.asarray(x if x.is_fully_addressable else multihost_utils.process_allgather(x, tiled=True))


def hf_tensors(entries, abstract: dict, recorded: dict, dtype, flat=None) -> list[tuple]:
  """[(file name, HF shape, dtype, make)] of every converted tensor, names checked against the import;
  abstract: path -> ShapeDtypeStruct; flat: path -> param, read only by make()."""
  by_hf: dict[str, list[names.Entry]] = {}
  for e in entries:
    by_hf.setdefault(e.hf, []).append(e)
  out = []
  for hf, group in sorted(by_hf.items()):
    group.sort(key=lambda e: e.part[0])
    if hf not in recorded["names"]:
      raise UserError(f"the model has {group[0].ours}, whose tensor {hf} the import did not have; "
                      "export needs the imported architecture (same config.model)")
    shape = group[0].hf_shape(abstract[group[0].ours].shape)
    want = tuple(recorded.get("shapes", {}).get(hf, shape))
    if shape != want:
      raise UserError(f"{group[0].ours} makes {recorded['names'][hf]} of shape {list(shape)}, but the "
                      f"imported model's is {list(want)}: export needs the imported architecture "
                      "(same config.model)")
    make = lambda g=group: np.concatenate([inverse(e, _host(flat[e.ours])) for e in g], axis=0) \
        if len(g) > 1 else inverse(g[0], _host(flat[g[0].ours]))
    out.append((recorded["names"][hf], shape, dtype, make))
  missing = sorted(set(recorded["names"]) - set(by_hf))
  if missing:
    raise UserError(f"the model lacks the imported tensor {recorded['names'][missing[0]]}; export needs "
                    "the imported architecture (same config.model)")
  return out


def write_checkpoint(out: str, tensors: list[tuple], max_shard_bytes: int) -> list[str]:
  """model.safetensors, or shards and model.safetensors.index.json past max_shard_bytes."""
  shards, size = [[]], 0
  for t in tensors:
    n = math.prod(t[1]) * t[2].itemsize
    if shards[-1] and size + n > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append(t)
    size += n
  if len(shards) == 1:
    write_safetensors(os.path.join(out, "model.safetensors"), shards[0])
    return ["model.safetensors"]
  files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
  weight_map = {}
  for file, shard in zip(files, shards):
    write_safetensors(os.path.join(out, file), shard)
    weight_map.update({t[0]: file for t in shard})
  total = sum(math.prod(t[1]) * t[2].itemsize for t in tensors)
  with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=1)
  return files

r"""Write a workdir's model back as a Hugging Face checkpoint, for transformers, vLLM and the hub.

  python -m mm_jax.export --workdir=W --out=DIR [--step=N] [--max_shard_size=2GB]

DIR gets config.json, the safetensors weights (sharded with model.safetensors.index.json past
--max_shard_size) and the tokenizer and processor files, so that
transformers.AutoModelForImageTextToText (PaliGemma, LLaVA), AutoModelForCausalLM (Gemma, Llama) or
AutoModel (SigLIP) .from_pretrained(DIR) loads it. The model must come from `mm_jax.convert` (then be
fine-tuned, in W or in a workdir whose init.parts reads it); families without a Hugging Face
counterpart are refused by name. Everything is checked before DIR is created; the tensors are then
written one at a time (convert/export.py).
"""
import json
import os
import re

import jax
import numpy as np
from jax.experimental import multihost_utils

from mm_jax.checkpoint import Checkpoints, OtherLayout
from mm_jax.convert import export as hf_export
from mm_jax.convert import names, writer
from mm_jax.errors import UserError
from mm_jax.eval.evaluate import restore_params, stored_config
from mm_jax.train import sharding
from mm_jax.train.state import ModelOnMesh

def shard_bytes(text: str) -> int:
  m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]?B)\s*", text.upper())
  if not m:
    raise UserError(f"--max_shard_size={text} is not a size; write e.g. 500MB or 5GB")
  return int(float(m.group(1)) * {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9}[m.group(2)])


class _OneByOne:
  """path -> param, each restored from the checkpoint when asked for (a partial restore): the host
  holds one param at a time, not the model."""

  def __init__(self, ckpt: Checkpoints, step: int, abstract: dict):
    self._ckpt, self._step, self._abstract = ckpt, step, abstract

  def __getitem__(self, path: str):
    target = self._abstract[path]
    node = tree = {}
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = target
    return writer.flat_params(self._ckpt.restore_params(self._step, tree))[path]


def _params(workdir: str, step: int, mm: ModelOnMesh, abstract: dict) -> dict:
  """path -> param: one at a time where the checkpoint has the unrolled layout, else all of them
  converted by name (a scanned run)."""
  ckpt = Checkpoints(workdir, read_only=True)
  try:
    ckpt.check_compatible(step, mm.abstract_params)
  except OtherLayout:
    ckpt.close()
    return writer.flat_params(restore_params(workdir, mm, step)[1])
  return _OneByOne(ckpt, step, abstract)


def export(workdir: str, out: str, step: int | None = None, max_shard_bytes: int = 2 * 10**9) -> list[str]:
  """Checks, then writes DIR; returns the weight files written."""
  config, step = stored_config(workdir, step)
  family = config.model.family
  if family not in hf_export.EXPORTABLE:
    raise UserError(f"the {family} family has no Hugging Face counterpart to export to; export writes "
                    "PaliGemma, LLaVA, Gemma, Llama and SigLIP models (families "
                    f"{', '.join(hf_export.EXPORTABLE)}) imported with mm_jax.convert")
  hf_dir = hf_export.lineage(workdir, config, lambda root: stored_config(root, None)[0])
  with open(os.path.join(hf_dir, "config.json")) as f:
    hf = json.load(f)
  arch = (hf.get("architectures") or ["?"])[0]
  if arch == "SiglipVisionModel":
    raise UserError(f"{workdir} starts from a SigLIP vision tower alone (SiglipVisionModel); export "
                    "writes whole models: PaliGemma, LLaVA, Gemma, Llama, SiglipModel")
  with open(os.path.join(hf_dir, hf_export.TENSORS)) as f:
    recorded = json.load(f)
  if os.path.isdir(out) and os.listdir(out):
    raise UserError(f"--out={out} is not empty; give a new directory")
  for part in ("encoder", "decoder", "text"):  # HF's names are per layer: the unrolled layout
    if part in config.model and "scan" in config.model[part]:
      config.model[part].scan = False
  m = config.model
  vocab = m.get("decoder", {}).get("vocab_size") or m.get("text", {}).get("vocab_size") or config.data.vocab_size
  mm = ModelOnMesh.create(config, vocab, sharding.make_mesh(config.mesh))
  _, entries, _ = names.mapping(arch, hf, config.model)
  abstract = writer.flat_params(mm.abstract_params)
  missing = sorted(set(abstract) - {e.ours for e in entries})
  if missing:  # e.g. an encoder from another run beside an imported decoder: not this HF model
    raise UserError(f"{workdir}'s model has params the imported {arch} has no tensor for (first: "
                    f"{missing[0]}); export writes the imported architecture only")
  dtype = np.dtype(jax.tree.leaves(abstract)[0].dtype)
  hf_export.hf_tensors(entries, abstract, recorded, dtype)  # names checked before anything is read
  tensors = hf_export.hf_tensors(entries, abstract, recorded, dtype, _params(workdir, step, mm, abstract))
  tensors += hf_export.unused_tensors(hf_dir)
  if jax.process_index() != 0:  # the gathers are collectives: every process makes every tensor
    multihost_utils.sync_global_devices("mm_jax.export checks")
    for t in tensors:
      t[3]()
    return []
  if jax.process_count() > 1:  # every process has checked --out before process 0 creates it
    multihost_utils.sync_global_devices("mm_jax.export checks")
  os.makedirs(out, exist_ok=True)
  files = hf_export.write_checkpoint(out, tensors, max_shard_bytes)
  for name in hf_export.KEPT_FILES:
    if os.path.isfile(os.path.join(hf_dir, name)):
      with open(os.path.join(hf_dir, name), "rb") as src, open(os.path.join(out, name), "wb") as dst:
        dst.write(src.read())
  print(f"Exported {arch} (step {step} of {workdir}): {len(tensors)} tensors in {len(files)} "
        f"file(s) -> {out}", flush=True)
  return files

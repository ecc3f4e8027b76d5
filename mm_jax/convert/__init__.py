r"""Imports a Hugging Face checkpoint (safetensors + config.json) as an mm_jax workdir.

  python -m mm_jax.convert --hf_dir=DIR --out=OUT [--dtype=float32|bfloat16]
  python -m mm_jax.eval  --config=OUT/config.py --workdir=OUT
  python -m mm_jax.train --config=OUT/config.py --workdir=NEW     # starts from the imported params

Architectures (config.json's architectures[0]; hf_config.py says what each becomes): GemmaForCausalLM,
LlamaForCausalLM, PaliGemmaForConditionalGeneration, LlavaForConditionalGeneration, SiglipModel and
SiglipVisionModel (the encoder alone: a starting point for training, not a model to evaluate).
Writes OUT/checkpoints/0 (params only), OUT/config.py (the derived config, with init.parts reading the
params by name), OUT/tokenizer.model (a copy of DIR's tokenizer.model or spiece.model; without one,
data.tokenizer names the tokenizer.json kept in OUT/hf/) and OUT/hf/
(config.json, the tokenizer and processor files, the tensor names: what mm_jax.export writes back).
Nothing is written until every tensor's name and shape is checked against the model, from the
safetensors headers alone; an OUT that already holds a checkpoint is refused. Then tensors are
streamed one at a time, so the host holds the params plus one tensor in flight.
"""
import os

from absl import logging
import ml_collections as mlc

from mm_jax.train import sharding
from mm_jax.checkpoint import workdir_path
from mm_jax.convert import export, hf_config, names, writer
from mm_jax.convert.reader import HFCheckpoint
from mm_jax.errors import UserError
from mm_jax.train.state import ModelOnMesh

DTYPES = ("float32", "bfloat16")


def tokenizer_file(hf_dir: str) -> str | None:
  """The checkpoint's SentencePiece model: tokenizer.model, or spiece.model (SigLIP's name)."""
  for name in ("tokenizer.model", "spiece.model"):
    if os.path.isfile(os.path.join(hf_dir, name)):
      return os.path.join(hf_dir, name)
  return None


def derive_config(hf: dict, hf_dir: str, out: str, dtype: str) -> tuple[str, mlc.ConfigDict]:
  """(architecture, the config OUT/config.py will return)."""
  if dtype not in DTYPES:
    raise UserError(f"--dtype={dtype} is not one of {', '.join(DTYPES)}")
  arch, config = hf_config.derive(hf)
  config.model.dtype = config.model.param_dtype = dtype
  root = str(workdir_path(out))
  if arch == "SiglipVisionModel":  # a tokenizer of this model would be its text tower's: none here
    config.init.parts = ((root, "encoder/", "encoder/"),)
  else:
    config.init.parts = ((root, "", ""),)
    if tokenizer_file(hf_dir):
      config.data.tokenizer = os.path.join(root, "tokenizer.model")
    elif os.path.isfile(os.path.join(hf_dir, "tokenizer.json")):  # Llama 3, Qwen: no SentencePiece model
      config.data.tokenizer = os.path.join(root, export.HF_DIR, "tokenizer.json")  # kept with its config
  return arch, config


def _abstract_params(arch: str, config: mlc.ConfigDict) -> dict:
  """path -> ShapeDtypeStruct (with its sharding on the current mesh) of every param to write."""
  if arch == "SiglipVisionModel":  # encoder + MAP head, named and sharded as in the siglip family
    probe = hf_config.base_config("siglip_shapes")
    probe.model.encoder = config.model.encoder
    probe.model.dtype = probe.model.param_dtype = config.model.param_dtype
    probe.data.image_size = config.data.image_size
    config = probe
  model_cfg = config.model
  vocab = (model_cfg.get("decoder", {}).get("vocab_size") or model_cfg.get("text", {}).get("vocab_size")
           or config.data.vocab_size)
  mm = ModelOnMesh.create(config, vocab, sharding.make_mesh(config.mesh))
  flat = writer.flat_params(mm.abstract_params)
  if arch == "SiglipVisionModel":
    flat = {k: v for k, v in flat.items() if k.startswith(("encoder/", "map_head/"))}
  return flat


def convert(hf_dir: str, out: str, dtype: str = "float32") -> mlc.ConfigDict:
  """Checks, then writes OUT; returns the config written. Raises UserError (OUT untouched) on bad input."""
  ckpt = HFCheckpoint(hf_dir)
  arch, config = derive_config(ckpt.config, hf_dir, out, dtype)
  abstract = _abstract_params(arch, config)
  layout, entries, skipped = names.mapping(arch, ckpt.config, config.model)
  writer.check(ckpt, layout, entries, skipped, abstract)
  writer.refuse_existing(out)
  if arch != "SiglipVisionModel" and not config.data.tokenizer:
    logging.warning("%s has no tokenizer.model (SentencePiece) nor tokenizer.json: set data.tokenizer in "
                    "%s/config.py before eval or train", hf_dir, out)

  params = writer.stream(ckpt, layout, entries, abstract)
  writer.write(out, hf_dir, arch, config, params, tokenizer_file(hf_dir))
  export.keep_for_export(out, ckpt, layout, entries, skipped)  # what mm_jax.export writes back
  print(f"Converted {arch} from {hf_dir}: {len(entries)} tensors -> {out} "
        f"(python -m mm_jax.eval --config={out}/config.py --workdir={out})", flush=True)
  return config

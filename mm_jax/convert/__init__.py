r"""Imports a Hugging Face checkpoint (safetensors + config.json) as an mm_jax workdir.

  python -m mm_jax.convert --hf_dir=DIR --out=OUT [--dtype=float32|bfloat16]
  python -m mm_jax.eval  --config=OUT/config.py --workdir=OUT
  python -m mm_jax.train --config=OUT/config.py --workdir=NEW     # starts from the imported params

Architectures (config.json's architectures[0]; hf_config.py says what each becomes): GemmaForCausalLM,
LlamaForCausalLM, PaliGemmaForConditionalGeneration, LlavaForConditionalGeneration (SigLIP tower + Llama
text), SiglipVisionModel. SiglipVisionModel alone writes the encoder params and a unified-family config
whose init.parts reads only encoder/ from OUT (decoder and connector start fresh): it is a starting
point for training, and eval on OUT alone is not meaningful.

Writes OUT/checkpoints/0 (params only, with their shardings on the current mesh), OUT/config.py (the
derived config: configs/shapes_tiny.py's with model.* from config.json, data.tokenizer =
OUT/tokenizer.model, init.parts reading the params by name) and OUT/tokenizer.model (a copy).

Nothing is written until everything is checked: the architecture and config fields, then every
tensor's name and shape against the model built from the derived config, from the safetensors headers
alone. Then tensors are streamed one at a time (read, transposed, cast, placed), so the host holds the
params plus one tensor in flight (experiments/convert_memory.py measures the peak).
"""
import os

from absl import logging
import ml_collections as mlc

from mm_jax import sharding
from mm_jax.checkpoint import workdir_path
from mm_jax.convert import hf_config, names, writer
from mm_jax.convert.reader import HFCheckpoint
from mm_jax.errors import UserError
from mm_jax.state import ModelOnMesh

DTYPES = ("float32", "bfloat16")


def base_config() -> mlc.ConfigDict:
  """configs/shapes_tiny.py's get_config(): the schema and the training defaults."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "shapes_tiny.py")
  spec = importlib.util.spec_from_file_location("shapes_tiny_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def derive_config(hf: dict, hf_dir: str, out: str, dtype: str) -> tuple[str, mlc.ConfigDict]:
  """(architecture, the config OUT/config.py will return)."""
  if dtype not in DTYPES:
    raise UserError(f"--dtype={dtype} is not one of {', '.join(DTYPES)}")
  arch, config = hf_config.derive(base_config(), hf)
  config.model.dtype = config.model.param_dtype = dtype
  root = str(workdir_path(out))
  if arch == "SiglipVisionModel":
    config.init.parts = ((root, "encoder/", "encoder/"),)
  else:
    config.init.parts = ((root, "", ""),)
    if os.path.isfile(os.path.join(hf_dir, "tokenizer.model")):
      config.data.tokenizer = os.path.join(root, "tokenizer.model")
  return arch, config


def convert(hf_dir: str, out: str, dtype: str = "float32") -> mlc.ConfigDict:
  """Checks, then writes OUT; returns the config written. Raises UserError (OUT untouched) on bad input."""
  ckpt = HFCheckpoint(hf_dir)
  arch, config = derive_config(ckpt.config, hf_dir, out, dtype)
  mesh = sharding.make_mesh(config.mesh)
  vocab = config.model.decoder.vocab_size or config.data.vocab_size
  mm = ModelOnMesh.create(config, vocab, mesh)
  abstract = writer.flat_params(mm.abstract_params)
  if arch == "SiglipVisionModel":
    abstract = {k: v for k, v in abstract.items() if k.startswith("encoder/")}
  layout, entries, skipped = names.plan(arch, ckpt.config, config.model)
  writer.check(ckpt, layout, entries, skipped, abstract)
  writer.refuse_existing(out)
  if arch != "SiglipVisionModel" and not config.data.tokenizer:
    logging.warning("%s has no tokenizer.model (SentencePiece): set data.tokenizer in %s/config.py "
                    "before eval or train", hf_dir, out)

  params = writer.stream(ckpt, layout, entries, abstract)
  writer.write(out, hf_dir, arch, config, params)
  print(f"Converted {arch} from {hf_dir}: {len(entries)} tensors -> {out} "
        f"(python -m mm_jax.eval --config={out}/config.py --workdir={out})", flush=True)
  return config

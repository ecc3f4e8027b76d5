"""python -m mm_jax.convert --hf_dir=DIR --out=OUT [--dtype=float32|bfloat16] (see __init__.py)."""
from absl import flags

from mm_jax import cli
from mm_jax.convert import DTYPES, convert
from mm_jax.errors import UserError

_HF_DIR = flags.DEFINE_string("hf_dir", None, "A Hugging Face checkpoint: config.json + safetensors.")
_OUT = flags.DEFINE_string("out", None, "The mm_jax workdir to write (must not hold a checkpoint).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", DTYPES, "Param (and compute) dtype of the import.")


def main() -> None:
  if not _HF_DIR.value or not _OUT.value:
    raise UserError("--hf_dir and --out are required")
  convert(_HF_DIR.value, _OUT.value, _DTYPE.value)


if __name__ == "__main__":
  cli.run("mm_jax.convert", main)

r"""python -m mm_jax.export: a workdir's model as a Hugging Face checkpoint (mm_jax.export's docstring)."""
from absl import flags

from mm_jax import cli
from mm_jax.errors import UserError
from mm_jax.export import export, shard_bytes

_WORKDIR = flags.DEFINE_string("workdir", None, "The workdir whose checkpoint to export.")
_OUT = flags.DEFINE_string("out", None, "The directory to write (must be new or empty).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")
_MAX_SHARD = flags.DEFINE_string("max_shard_size", "2GB", "Largest safetensors file, e.g. 500MB, 5GB.")

def main() -> None:
  if not _WORKDIR.value or not _OUT.value:
    raise UserError("--workdir and --out are required")
  export(_WORKDIR.value, _OUT.value, _STEP.value, shard_bytes(_MAX_SHARD.value))


if __name__ == "__main__":
  cli.run("mm_jax.export", main)

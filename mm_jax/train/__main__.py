r"""python -m mm_jax.train --config=configs/shapes_tiny.py --workdir=DIR: train (or resume) a run.

Every family and stage; `--config.x.y=v` overrides any field. mm_jax.train.loop.train has the details.
"""
from absl import flags
from ml_collections import config_flags

from mm_jax import cli
from mm_jax.errors import UserError
from mm_jax.models import CONNECTORS, FAMILIES
from mm_jax.train.loop import train

_CONFIG = config_flags.DEFINE_config_file(
    "config", None,
    f"Config file (configs/*.py[:variant]). Registries: model.family in {sorted(FAMILIES)}, "
    f"model.connector in {sorted(CONNECTORS)}.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")


def main() -> None:
  if _CONFIG.value is None or not _WORKDIR.value:
    raise UserError("--config and --workdir are required")
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  cli.run("mm_jax.train", main, steps=True)

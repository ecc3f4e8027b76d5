r"""python -m mm_jax.eval --config=CONFIG --workdir=DIR [--split=test] [--step=N]: score a checkpoint.

The evaluator is the model's task's (mm_jax.tasks); mm_jax.eval.evaluate has the details.
"""
from absl import flags
from ml_collections import config_flags

from mm_jax import cli
from mm_jax.errors import UserError
from mm_jax.eval.evaluate import evaluate

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training run's workdir.")
_SPLIT = flags.DEFINE_string("split", "test", "Dataset split: train, validation or test.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the newest).")


def main() -> None:
  if _CONFIG.value is None or not _WORKDIR.value:
    raise UserError("--config and --workdir are required")
  evaluate(_CONFIG.value, _WORKDIR.value, _SPLIT.value, _STEP.value)


if __name__ == "__main__":
  cli.run("mm_jax.eval", main, steps=True)

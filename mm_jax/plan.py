r"""python -m mm_jax.plan --config=CONFIG --topology=v5e-16: compile the train step for a TPU topology.

Prints per-chip memory against HBM and the model FLOPs; exit 2 if it does not fit (mm_jax.perf.plan).
"""
import json
import sys

from absl import flags
from ml_collections import config_flags

from mm_jax import cli
from mm_jax.errors import UserError
from mm_jax.perf.plan import format_report, plan

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                          lock_config=True)
_TOPOLOGY = flags.DEFINE_string("topology", None, "v5e-16, v5p-128, 2xv5e-256, cpu-8, ...")
_HBM_GIB = flags.DEFINE_float("hbm_gib", None, "Usable HBM per device in GiB (default: the chip's).")
_JSON_OUT = flags.DEFINE_string("json_out", None, "Also write the report as JSON here.")


def main() -> None:
  if _CONFIG.value is None or not _TOPOLOGY.value:
    raise UserError("--config and --topology are required (e.g. --topology=v5e-16)")
  report = plan(_CONFIG.value, _TOPOLOGY.value, _HBM_GIB.value)
  report["config"] = config_flags.get_config_filename(flags.FLAGS["config"])
  report["overrides"] = {k: repr(v) for k, v in config_flags.get_override_values(flags.FLAGS["config"]).items()}
  print(format_report(report, report["config"]), flush=True)
  if _JSON_OUT.value:
    with open(_JSON_OUT.value, "w") as fh:
      json.dump(report, fh, indent=1)
  if not report["fits"]:
    sys.exit(2)


if __name__ == "__main__":
  cli.run("mm_jax.plan", main)

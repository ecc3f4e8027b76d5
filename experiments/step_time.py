r"""Train-step time of a config and variants of it, in one run (ratios are what to trust on a shared machine).

  python experiments/step_time.py                      # the default and the variants below
  python experiments/step_time.py global_batch_size=32 data.text_len=24

Prints one JSON line per variant: {"overrides", "ms_per_step", "examples_per_s", "ratio_to_default"}.
The step runs on a fixed batch on one device, so the input pipeline is not included.
"""
import importlib.util
import json
import pathlib
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mm_jax.train import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.train import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.tasks import TASKS  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.train.state import ModelOnMesh  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.cli import keep_freed_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

keep_freed_memory()  # as mm_jax.train does on CPU: XLA's per-step temporaries are not faulted in anew

VARIANTS = ("", "global_batch_size=32", "data.text_len=16", "model.encoder.patch_size=8",
            "model.decoder.num_kv_heads=1")


def load_config(overrides: str):
  spec = importlib.util.spec_from_file_location("cfg", REPO / "configs" / "shapes_tiny.py")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("")
  for item in filter(None, overrides.split()):
    key, value = item.split("=")
    *path, last = key.split(".")
    node = config
    for p in path:
      node = node[p]
    node[last] = type(node[last])(value)
  return config


def step_timer(config):
  """Builds the train step of `config` on one device and warms it up; returns timer(steps) -> ms/step,
  so that several configs can be built first and then timed alternately."""
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  mm = ModelOnMesh.create(config, 128, mesh)
  tx = optim.make_optimizer(config.optim, config.total_steps,
                            optim.param_labels(mm.abstract_params, config.optim.rules))
  carry = {"state": mm.init_train_state(tx, 0)}
  step = mm.make_train_step(tx)
  batch = sharding.to_global(
      {k: np.asarray(v) for k, v in TASKS[mm.model.task].example_batch(config, config.global_batch_size).items()}, mesh)

  def timer(steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
      carry["state"], out = step(carry["state"], batch)
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps * 1e3

  timer(3)
  return timer


def ms_per_step(config, steps: int = 15) -> float:
  return step_timer(config)(steps)


def main(argv):
  variants = [" ".join(argv[1:])] if len(argv) > 1 else VARIANTS
  base = None
  for overrides in variants:
    config = load_config(overrides)
    ms = ms_per_step(config)
    base = base or ms
    print(json.dumps({"overrides": overrides or "default", "ms_per_step": round(ms, 1),
                      "examples_per_s": round(config.global_batch_size / ms * 1e3, 1),
                      "ratio_to_default": round(ms / base, 3)}), flush=True)


if __name__ == "__main__":
  main(sys.argv)

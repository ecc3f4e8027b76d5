r"""Model-FLOP utilisation of a ~1B-parameter unified model (configs/bench_1b.py) in bfloat16 on one GPU.

  source experiments/gpu_env.sh && python3 experiments/gpu_mfu.py     # on the lent GPU machine
  python3 experiments/gpu_mfu.py --runs=:32,dots:32,dots:64,no_remat:16

Prints one JSON line per run (variant of configs/bench_1b.py : global batch): the median train-step time of 10 steps after 3 warm-ups,
the analytic model FLOPs per step (mm_jax.perf.flops.train_flops: 2 x multiply-adds of every matmul,
attention included, remat not counted), and MFU against the chip's datasheet bf16 dense peak
(mm_jax.perf.mfu when it knows the chip, else H100 SXM's 989e12) and against a bf16 8192^3 matmul measured
in the same run. Without a GPU it prints one line saying so and exits 0.
"""
import argparse
import json
import math
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mm_jax.perf import flops  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.perf import mfu  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.train import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.train import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.train.state import ModelOnMesh  # pylint: disable=g-import-not-at-top,wrong-import-position

H100_BF16 = 989e12  # NVIDIA H100 SXM datasheet, dense bf16


def load_config(variant: str):
  from mm_jax.config import files  # pylint: disable=g-import-not-at-top
  return files.get_config("bench_1b", variant)


def synthetic_batch(config, batch: int, vocab: int) -> dict:
  """Random pixels and tokens; half the text is the prefix, the loss on the other half (the suffix)."""
  rng = np.random.default_rng(0)
  s, t = config.data.image_size, config.data.text_len
  suffix_BxT = np.broadcast_to(np.arange(t) >= t // 2, (batch, t)).astype(np.int32)
  return {"image": rng.uniform(-1, 1, (batch, s, s, 3)).astype(np.float32),
          "text": rng.integers(1, vocab, (batch, t)).astype(np.int32),
          "mask_ar": suffix_BxT, "mask_input": np.ones((batch, t), np.int32), "mask_loss": suffix_BxT}


def peak(device) -> tuple[float, str]:
  lookup = getattr(mfu, "peak_flops_per_device", None)
  if lookup is not None:
    try:
      return lookup(device, "bfloat16")
    except Exception:  # pylint: disable=broad-except
      pass
  return H100_BF16, "H100 SXM datasheet (assumed)"


def measure(variant: str, batch: int, matmul_peak: float) -> dict:
  config = load_config(variant)
  config.global_batch_size = batch
  device = jax.devices()[0]
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, [device])
  vocab = config.model.decoder.vocab_size
  mm = ModelOnMesh.create(config, vocab, mesh)
  labels = optim.param_labels(mm.abstract_params, config.optim.rules)
  tx = optim.make_optimizer(config.optim, config.total_steps, labels)
  state = mm.init_train_state(tx, 0)
  step = mm.make_train_step(tx)
  batch_on_mesh = sharding.to_global(synthetic_batch(config, batch, vocab), mesh)
  for _ in range(3):
    state, out = step(state, batch_on_mesh)
  jax.block_until_ready(out)
  times = []
  for _ in range(10):
    start = time.perf_counter()
    state, out = step(state, batch_on_mesh)
    jax.block_until_ready(out)
    times.append(time.perf_counter() - start)
  seconds = statistics.median(times)
  model_flops = flops.train_flops(config, mm.abstract_params, labels)["total"]
  chip_peak, source = peak(device)
  params = sum(math.prod(x.shape) for x in jax.tree.leaves(mm.abstract_params))
  return {"bench": "gpu_mfu", "device": device.device_kind, "variant": variant or "default",
          "batch": batch, "params": params, "step_s": round(seconds, 4),
          "tokens_per_s": round(batch * (config.data.text_len + (config.data.image_size // config.model.encoder.patch_size) ** 2)
                                / seconds),
          "model_tflop_per_step": round(model_flops / 1e12, 2),
          "mfu_vs_datasheet": round(model_flops / seconds / chip_peak, 3), "datasheet_peak": chip_peak,
          "peak_source": source, "mfu_vs_matmul": round(model_flops / seconds / matmul_peak, 3),
          "matmul_peak_tflops": round(matmul_peak / 1e12, 1), "loss": float(out["loss"])}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", default=":32,:64,dots:32,dots:64,no_remat:16",
                      help="comma-separated VARIANT:BATCH ('' is the default variant: full remat)")
  args = parser.parse_args()
  if jax.default_backend() != "gpu":
    print(json.dumps({"bench": "gpu_mfu", "skipped": f"no GPU (backend {jax.default_backend()})"}))
    return
  matmul_peak = mfu.matmul_peak_flops("bfloat16", n=8192, seconds=2.0)
  for run in args.runs.split(","):
    variant, batch = run.split(":")
    try:
      print(json.dumps(measure(variant, int(batch), matmul_peak)), flush=True)
    except jax.errors.JaxRuntimeError as e:  # out of memory: recorded, the other runs go on
      print(json.dumps({"bench": "gpu_mfu", "variant": variant or "default", "batch": int(batch),
                        "error": str(e).split("\n")[0][:200]}), flush=True)


if __name__ == "__main__":
  main()

r"""Compile time of the decoder's train step against its depth, scanned and unrolled (the target: with scan,
24 layers must compile in at most 1.5x the time of 2 layers).

  python experiments/scan_compile.py              # one JSON line per (scan, depth), then a summary line
  python experiments/scan_compile.py --depths=2,24 --repeats=3 --unrolled

The model is the text decoder alone (family "lm") at a mid size (width 512, 8 heads, MLP 2048, vocab
8192, 128 tokens, batch 8, remat "full"), FSDP over 8 simulated CPU devices, so the step holds the
collectives a pod's step holds. Timed: lower + compile of the real train step (ModelOnMesh.train_step_jit,
the jit that training runs), from abstract inputs, nothing executed. Depths alternate within a repeat and
the median of the repeats is reported, because this machine is shared and noisy.
"""
import argparse
import json
import os
import statistics
import sys
import time

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from mm_jax.train import optim
from mm_jax.train import sharding
from mm_jax.tasks import TASKS
from mm_jax.train.state import ModelOnMesh

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "configs", "shapes_tiny.py")


def config_for(depth: int, scan: bool, remat: str):
  from mm_jax.config import files  # pylint: disable=g-import-not-at-top
  c = files.load(str(CONFIGS))
  c.model.family = "lm"
  c.model.decoder.update(dict(vocab_size=8192, width=512, depth=depth, num_heads=8, num_kv_heads=8,
                              head_dim=64, mlp_dim=2048, scan=scan, remat=remat))
  c.data.text_len = 128
  c.global_batch_size = 8
  c.mesh.update(dict(data=1, fsdp=-1))
  return c


def compile_seconds(depth: int, scan: bool, remat: str) -> float:
  config = config_for(depth, scan, remat)
  mm = ModelOnMesh.create(config, config.model.decoder.vocab_size, sharding.make_mesh(config.mesh))
  labels = optim.param_labels(mm.abstract_params, config.optim.rules)
  tx = optim.make_optimizer(config.optim, config.total_steps, labels)
  state = mm.abstract_train_state(tx)
  batch = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding.batch_sharding(mm.mesh)),
      TASKS[mm.model.task].example_batch(config, config.global_batch_size))
  jitted = mm.train_step_jit(tx)
  start = time.perf_counter()
  with mm.context():
    jitted.lower(state, batch).compile()
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--depths", default="2,24")
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--remat", default="full")
  parser.add_argument("--unrolled", action="store_true", help="also time the unrolled decoder")
  args = parser.parse_args()
  depths = [int(d) for d in args.depths.split(",")]
  modes = [True, False] if args.unrolled else [True]
  times = {(scan, d): [] for scan in modes for d in depths}
  compile_seconds(depths[0], True, args.remat)  # warm-up: imports, first-compile costs
  for _ in range(args.repeats):
    for scan in modes:
      for d in depths:
        times[(scan, d)].append(compile_seconds(d, scan, args.remat))
  for (scan, d), ts in times.items():
    print(json.dumps({"bench": "scan_compile", "scan": scan, "depth": d, "remat": args.remat,
                      "compile_s_median": round(statistics.median(ts), 2),
                      "compile_s": [round(t, 2) for t in ts]}))
  summary = {"bench": "scan_compile_summary", "remat": args.remat}
  for scan in modes:
    ratio = statistics.median(times[(scan, depths[-1])]) / statistics.median(times[(scan, depths[0])])
    summary[f"{'scan' if scan else 'unrolled'}_ratio_{depths[-1]}_vs_{depths[0]}"] = round(ratio, 2)
  if True in modes:
    summary["target_scan_ratio_max"] = 1.5
    summary["meets_target"] = summary[f"scan_ratio_{depths[-1]}_vs_{depths[0]}"] <= 1.5
  print(json.dumps(summary))


if __name__ == "__main__":
  main()

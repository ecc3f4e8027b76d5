r"""Input pipeline against the train step: examples/s of the real grain train iterator and of the step.

  python experiments/bench_input.py                  # configs/shapes_tiny.py, its data_dir (built if absent)
  python experiments/bench_input.py --data_dir=/tmp/shapes_data --repeats=7 --no-profile

Side "pipeline": mm_jax.data.prepare + train_iterator (shuffle, decode, tokenize, masks, batch; grain
with data.num_threads threads, as mm_jax.train runs it); each repeat starts a fresh iterator at another
batch index (nothing prefetched) and times --batches batches from creation to the last one. Side
"step": the jitted train step of the same config on one device and a fixed batch (steps/s x batch).
The two alternate, --repeats times each after a warm-up; medians. One JSON line per side, then

  {"bench": "input", "pipeline_examples_per_s", "step_examples_per_s", "ratio", "target": 3.0, "ok"}

A profile line (--no-profile: none) gives the per-example time of each stage, single-threaded (read,
tfds decode of the PNG and the fields, tokenize, image to float, the whole element).
Expected on the shared 2-core CPU: pipeline ~1300-1500 examples/s (2 threads), step ~340-400 examples/s,
ratio ~3.7-4.4 (target >= 3); per example ~0.35 ms, 60 % of it tfds's decode of the record (PNG decode
~0.2 ms). The process runs with mm_jax.train's malloc settings (cli.keep_freed_memory): its single
arena costs the pipeline's threads ~1.6x (2,090 examples/s with glibc's default arenas), but more
arenas slow the train step (bench_hf: 1.14 -> 1.35-1.47 of HF's time with 2 or the default).
~1 minute. Appends to experiments/bench_input.jsonl.
"""
import argparse
import json
import pathlib
import statistics
import sys
import time

import jax
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from bench_stages import Stage, load_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax import data  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.data import pipeline  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.cli import keep_freed_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

keep_freed_memory()  # as mm_jax.train does on CPU: XLA's per-step temporaries are not faulted in anew

TARGET = 3.0
JSONL = REPO / "experiments" / "bench_input.jsonl"


def pipeline_timer(config, tokenizer, source, batches: int):
  """-> timer(start_batch) -> examples/s of a fresh iterator from start_batch, creation included."""
  def timer(start_batch: int) -> float:
    t0 = time.perf_counter()
    it = pipeline.train_iterator(config, tokenizer, source, process_index=0, process_count=1)
    if start_batch:
      state = it.get_state()
      it.set_state(dict(state, next_index=start_batch))
    for _ in range(batches):
      batch = next(it)
    dt = time.perf_counter() - t0
    assert batch["image"].shape[0] == config.global_batch_size
    it.close()
    return batches * config.global_batch_size / dt
  return timer


def profile(config, tokenizer, source, n: int = 1000) -> dict:
  """Microseconds per example of each stage of _TrainExample, one thread, QA elements only."""
  raw_source, features = source._source.data_source, source._features  # pylint: disable=protected-access
  ids = np.random.default_rng(0).integers(0, len(source), n)
  out = {}

  def clock(name, fn, items):
    t0 = time.perf_counter()
    results = [fn(x) for x in items]
    out[name] = round((time.perf_counter() - t0) / n * 1e6, 1)
    return results

  raws = clock("read_us", lambda i: raw_source[int(i)], ids)
  clock("parse_us", features._example_parser_np.parse_example, raws)  # pylint: disable=protected-access
  records = clock("deserialize_us (parse + png decode)", features.deserialize_example_np, raws)
  clock("records_getitem_us (read + deserialize + check)", lambda i: source[int(i)], ids)
  src = data.get(config.data.name)
  qas = [src.texts(r, 0) for r in records]
  clock("tokenize_us", lambda qa: (pipeline._prefix(tokenizer, qa[0]), tokenizer.encode(qa[1])), qas)  # pylint: disable=protected-access
  clock("image_to_float_us", lambda r: pipeline._image(r["image"], config), records)  # pylint: disable=protected-access
  make = pipeline._TrainExample(config, tokenizer, source)  # pylint: disable=protected-access
  clock("whole_element_us", lambda i: make(int(i) * src.num_questions), ids)
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="shapes_tiny")
  parser.add_argument("--data_dir", default="", help="default: the config's data.data_dir")
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--batches", type=int, default=20, help="batches per pipeline repeat")
  parser.add_argument("--steps", type=int, default=5, help="train steps per step repeat")
  parser.add_argument("--profile", action=argparse.BooleanOptionalAction, default=True)
  args = parser.parse_args(argv)
  name, _, arg = args.config.partition(":")
  config = load_config(name, arg)
  # Relative data_dirs are the repository's (data/ by default), wherever the command runs.
  config.data.data_dir = str(REPO / (args.data_dir or config.data.data_dir))
  t0 = time.perf_counter()
  tokenizer, source = data.open_split(config, "train")
  lines = [{"bench": "input", "what": "prepare", "seconds": round(time.perf_counter() - t0, 2),
            "data_dir": config.data.data_dir, "train_images": len(source)}]
  pipe = pipeline_timer(config, tokenizer, source, args.batches)
  step = Stage(config, config.optim.rules, tokenizer.vocab_size)
  pipe(0), step(2)  # warm-up (and compile)
  b, rates = config.global_batch_size, {"pipeline": [], "step": []}
  for r in range(args.repeats):
    sides = ["pipeline", "step"] if r % 2 == 0 else ["step", "pipeline"]
    for side in sides:
      if side == "pipeline":
        rates[side].append(pipe(1000 * (r + 1)))
      else:
        rates[side].append(b / step(args.steps) * 1e3)
  for side, rs in rates.items():
    lines.append({"bench": "input", "what": side, "examples_per_s": round(statistics.median(rs), 1),
                  "repeats": [round(x, 1) for x in rs], "batch": b,
                  **({"threads": config.data.num_threads, "batches_per_repeat": args.batches}
                     if side == "pipeline" else {"steps_per_repeat": args.steps})})
  if args.profile:
    lines.append({"bench": "input", "what": "profile_per_example", **profile(config, tokenizer, source)})
  p, s = statistics.median(rates["pipeline"]), statistics.median(rates["step"])
  lines.append({"bench": "input", "summary": True, "pipeline_examples_per_s": round(p, 1),
                "step_examples_per_s": round(s, 1), "ratio": round(p / s, 2), "target": TARGET,
                "ok": p / s >= TARGET, "device": jax.devices()[0].device_kind})
  with open(JSONL, "a") as f:
    for line in lines:
      print(json.dumps(line), flush=True)
      f.write(json.dumps(line) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

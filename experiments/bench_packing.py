r"""Packing, measured: real (non-padding) tokens per second of training with data.packing False and
True, and the test exact match of both trained on the same number of examples.

  python experiments/bench_packing.py --parts=speed --steps=150 --warmup=50 --rounds=3 \
      --variants=unpacked,packed,unpacked_1slot                                   # ~35 min, 2 cores
  python experiments/bench_packing.py --parts=accuracy --acc_steps=1000 --seeds=0,1  # ~90 min

The data (built once under --work): conversations of one shapes scene each, "<image>say it N times" ->
"1 <caption> 2 <caption> ... N <caption>" (the caption numbered and repeated N times; the question in 1-5
tokens: "N", "N times", ... "please say it N times"), the scene, question and N chosen so that the text
(bos, question, answer, eos) has exactly a length drawn uniformly from [--min_len, --text_len]; written
as messages JSONL + PNGs and imported with `python -m mm_jax.data.prepare`; a SentencePiece tokenizer
trained on its text. The model is the tiny default (configs/shapes_tiny.py) with
data.name=conversations, data.text_len=--text_len, data.max_images=--max_images in both variants, so
both rows have L = text_len + max_images x 16 (checked with mm_jax.tasks.vqa.row_length).

speed: `python -m mm_jax.train` for --warmup + --steps steps, logging at --warmup and at the end, so the
last steps_per_sec times exactly the --steps steps after warmup (compile and the first steps
excluded); the --variants alternate over --rounds rounds (the order reversed every other round), each
run a fresh process. unpacked_1slot: unpacked rows of the same L with one image slot (text_len +
(max_images - 1) x 16), the fastest unpacked layout of that row length. Real tokens are counted here
from the same iterator (same config, same seed: the batches the timed steps consumed): the sum of
mask_input (the examples' text and image slots) over those batches; tokens/s = that sum x
steps_per_sec / steps. One JSON line per run and a summary line (medians, the ratios per round, the
density and examples per row).

accuracy: both variants trained on the same number of examples: --acc_steps unpacked steps; packed: the
fewest steps whose batches hold as many examples, its warmup scaled alike; --acc_control adds unpacked
rows at the packed run's steps and warmup with a batch of batch x examples per row (as many examples
per optimizer step as packed). Then `python -m mm_jax.eval` on the test split (exact match, and ANLS).
Each of --seeds runs every variant (the spread over seeds is the noise). A finished run of the same
overrides is reused (its JSON line written again, "reused": true). One JSON line per run, a summary.

Every JSON line is printed and appended to experiments/bench_packing.jsonl (--out).
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
PY = sys.executable
CONFIG = "configs/shapes_tiny.py"
OUT = os.path.join(ROOT, "experiments", "bench_packing.jsonl")
# The question: the number of repetitions, in 1-5 tokens (so lengths cover every residue mod the 5 of
# a one-object repetition); the image comes before it.
QUESTIONS = ("{n}", "{n} times", "say {n} times", "say it {n} times", "please say it {n} times")
SPLITS = ("train", "validation", "test")
_ARGS = None


# --- the data ---

def _answer(caption: str, n: int) -> str:
  return " ".join(f"{i} {caption}" for i in range(1, n + 1))


def _length(tok, question: str, answer: str) -> int:
  """Text tokens of the plain template's example: bos question answer eos (each text its own encode)."""
  return 1 + len(tok.encode(question)) + len(tok.encode(answer)) + 1


def _corpus(seed: int, count: int) -> list[str]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mm_jax.data import shapes  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(count):
    n = int(rng.integers(1, 16))
    q = QUESTIONS[int(rng.integers(len(QUESTIONS)))]
    out += [q.format(n=n), _answer(shapes.caption(shapes.random_scene(rng)), n)]
  return out


def _examples(tok, rng, count: int, min_len: int, max_len: int):
  """(scene, question, answer, length) x count: length drawn uniformly in [min_len, max_len], met
  exactly (scenes redrawn until one has a question and an n of that length)."""
  from mm_jax.data import shapes  # pylint: disable=g-import-not-at-top
  out = []
  while len(out) < count:
    target = int(rng.integers(min_len, max_len + 1))
    found = None
    for _ in range(1000):
      scene = shapes.random_scene(rng)
      cap = shapes.caption(scene)
      fits = []
      for q in QUESTIONS:
        for n in range(1, 60):
          length = _length(tok, q.format(n=n), _answer(cap, n))
          if length > target:
            break
          if length == target:
            fits.append((q.format(n=n), _answer(cap, n)))
      if fits:
        found = (scene, *fits[int(rng.integers(len(fits)))], target)
        break
    if found is None:
      raise SystemExit(f"no scene and question give {target} text tokens; change --min_len")
    out.append(found)
  return out


def build_data(work: str, args) -> tuple[str, str, dict]:
  """(prepared dataset dir, tokenizer path, statistics), built once under work/."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mm_jax.data import shapes  # pylint: disable=g-import-not-at-top
  from mm_jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  tag = f"len{args.min_len}-{args.text_len}_n{args.num_train}_seed{args.data_seed}"
  base = os.path.join(work, f"data_{tag}")
  raw, prepared, tok_path = (os.path.join(base, x) for x in ("raw", "prepared", "tokenizer.model"))
  stats_path = os.path.join(base, "lengths.json")
  if os.path.exists(os.path.join(prepared, "dataset_info.json")) and os.path.exists(stats_path):
    with open(stats_path) as f:
      return prepared, tok_path, json.load(f)
  os.makedirs(raw, exist_ok=True)
  tok = tokenizer_lib.train(_corpus(args.data_seed + 1000, 4000), args.vocab_size, tok_path)
  rng = np.random.default_rng(args.data_seed)
  sizes = {"train": args.num_train, "validation": args.num_validation, "test": args.num_test}
  lengths = {}
  for split in SPLITS:
    os.makedirs(os.path.join(raw, "images", split), exist_ok=True)
    lines = []
    for i, (scene, question, answer, length) in enumerate(
        _examples(tok, rng, sizes[split], args.min_len, args.text_len)):
      path = f"images/{split}/{i}.png"
      with open(os.path.join(raw, path), "wb") as f:
        f.write(shapes.png_bytes(scene))
      lines.append(json.dumps({"id": f"{split}/{i}", "messages": [
          {"role": "user", "content": "<image>" + question},
          {"role": "assistant", "content": answer}], "images": [path]}))
      lengths.setdefault(split, []).append(length)
    with open(os.path.join(raw, f"{split}.jsonl"), "w") as f:
      f.write("\n".join(lines) + "\n")
  _run([PY, "-m", "mm_jax.data.prepare", *[f"--input={s}={os.path.join(raw, s + '.jsonl')}" for s in SPLITS],
        f"--out={prepared}"])
  t = np.asarray(lengths["train"])
  stats = {"text_len_min": int(t.min()), "text_len_max": int(t.max()), "text_len_mean": float(t.mean()),
           "text_len_deciles": [int(x) for x in np.percentile(t, range(0, 101, 10))]}
  with open(stats_path, "w") as f:
    json.dump(stats, f)
  return prepared, tok_path, stats


# --- runs ---

def _run(cmd: list[str]) -> str:
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
  return out.stdout


# variant -> (data.packing, image slots per row: None = --max_images); the row length is the same:
# unpacked_1slot gives the text the row's other image slots (text_len + (max_images - 1) x 16).
VARIANTS = {"unpacked": (False, None), "packed": (True, None), "unpacked_1slot": (False, 1)}


def overrides(args, prepared: str, tok: str, variant: str, steps: int, seed: int = 0,
              warmup_steps: int = 100, log_every: int = 50) -> dict:
  """The --config.x=y overrides of a run (also applied here to count the real tokens)."""
  packing, slots = VARIANTS[variant]
  text_len = args.text_len
  if slots is not None:
    text_len += (args.max_images - slots) * args.tokens_per_image
  return {"data.name": "conversations", "data.path": prepared, "data.tokenizer": tok,
          "data.text_len": text_len, "data.max_images": slots or args.max_images,
          "data.packing": packing, "global_batch_size": args.batch, "total_steps": steps,
          "log_every": log_every, "checkpoint_every": steps, "checkpoint_minutes": 0.0, "seed": seed,
          "optim.warmup_steps": warmup_steps, "model.max_answer_len": args.text_len}


def _flags(o: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in o.items()]


def config_of(o: dict):
  from mm_jax.config import files  # pylint: disable=g-import-not-at-top
  c = files.get_config("shapes_tiny", "")
  for k, v in o.items():
    node = c
    *path, last = k.split(".")
    for p in path:
      node = node[p]
    node[last] = v
  return files.complete(c)


def count_batches(o: dict, start: int, stop: int) -> dict:
  """Sums over the training batches [start, stop) of the run with overrides o: real tokens
  (mask_input), loss tokens, examples (segments), rows; and the row length."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mm_jax import data  # pylint: disable=g-import-not-at-top
  from mm_jax.tasks import vqa  # pylint: disable=g-import-not-at-top
  config = config_of(o)
  tokenizer, source = data.open_split(config, "train")
  it = data.train_iterator(config, tokenizer, source, process_index=0, process_count=1)
  real = loss = examples = rows = 0
  for i in range(stop):
    b = next(it)
    if i < start:
      continue
    real += int(b["mask_input"].sum())
    loss += int(b["mask_loss"].sum())
    rows += b["segment"].shape[0]
    examples += sum(len(np.unique(s[s > 0])) for s in b["segment"])
  return {"row_length": int(vqa.row_length(config)), "real_tokens": real, "loss_tokens": loss,
          "examples": examples, "rows": rows}


def _steps_for(o: dict, examples: int) -> int:
  """The number of training batches of the run with overrides o that first hold `examples`."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from mm_jax import data  # pylint: disable=g-import-not-at-top
  config = config_of(o)
  tokenizer, source = data.open_split(config, "train")
  it = data.train_iterator(config, tokenizer, source, process_index=0, process_count=1)
  seen = steps = 0
  while seen < examples:
    seen += sum(len(np.unique(s[s > 0])) for s in next(it)["segment"])
    steps += 1
  return steps


def _read_json(path: str):
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def _last_metrics(workdir: str) -> dict:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return json.loads(f.read().splitlines()[-1])


def train(o: dict, workdir: str) -> float:
  if os.path.exists(workdir):
    subprocess.run(["rm", "-rf", workdir], check=True)
  start = time.time()
  _run([PY, "-m", "mm_jax.train", f"--config={CONFIG}", f"--workdir={workdir}", *_flags(o)])
  return time.time() - start


def _emit(result: dict) -> None:
  print(json.dumps(result), flush=True)
  with open(_ARGS.out, "a") as f:
    f.write(json.dumps(result) + "\n")


def speed(args, prepared: str, tok: str, stats: dict) -> None:
  total, names = args.warmup + args.steps, args.variants
  counts = {v: count_batches(overrides(args, prepared, tok, v, total, log_every=args.warmup),
                             args.warmup, total) for v in names}
  lengths = {v: c["row_length"] for v, c in counts.items()}
  if len(set(lengths.values())) != 1:
    raise SystemExit(f"the variants' row lengths differ: {lengths}; check --tokens_per_image")
  runs = {v: [] for v in names}
  for r in range(args.rounds):
    for v in (names if r % 2 == 0 else names[::-1]):  # alternated: each variant first in turn
      o = overrides(args, prepared, tok, v, total, log_every=args.warmup)
      wall = train(o, os.path.join(args.work, "speed"))
      m, c = _last_metrics(os.path.join(args.work, "speed")), counts[v]
      assert m["step"] == total, m
      sps = m["steps_per_sec"]
      res = {"bench": "packing_speed", "round": r, "variant": v, "packing": o["data.packing"],
             "text_len": o["data.text_len"], "max_images": o["data.max_images"], "steps": args.steps,
             "warmup": args.warmup, "batch": args.batch, "row_length": c["row_length"],
             "steps_per_s": sps, "rows_per_s": sps * args.batch,
             "examples_per_s": c["examples"] / args.steps * sps,
             "real_tokens_per_s": c["real_tokens"] / args.steps * sps,
             "loss_tokens_per_s": c["loss_tokens"] / args.steps * sps,
             "logged_tokens_per_s": m.get("tokens_per_s"),
             "density": c["real_tokens"] / (c["rows"] * c["row_length"]),
             "examples_per_row": c["examples"] / c["rows"], "wall_s": round(wall, 1)}
      runs[v].append(res)
      _emit(res)
  keys = ("rows_per_s", "examples_per_s", "real_tokens_per_s", "loss_tokens_per_s")
  summary = {"bench": "packing_speed_summary", "rounds": args.rounds, "steps": args.steps,
             "warmup": args.warmup, "text_len": args.text_len, "max_images": args.max_images,
             "batch": args.batch, "data": stats}
  for v in names:
    summary[v] = {k: statistics.median(x[k] for x in runs[v]) for k in keys}
    summary[v].update(row_length=counts[v]["row_length"], density=runs[v][0]["density"],
                      examples_per_row=runs[v][0]["examples_per_row"])
  for v in names:
    if v != "packed" and "packed" in names:
      # per round: the two runs of a round were measured side by side
      summary[f"real_tokens_ratio_packed_over_{v}"] = {
          "median_of_medians": summary["packed"]["real_tokens_per_s"] / summary[v]["real_tokens_per_s"],
          "per_round": [p["real_tokens_per_s"] / u["real_tokens_per_s"]
                        for u, p in zip(runs[v], runs["packed"])],
          "rows_per_s_ratio": summary["packed"]["rows_per_s"] / summary[v]["rows_per_s"]}
  _emit(summary)


def accuracy(args, prepared: str, tok: str, stats: dict) -> None:
  # the packed run's steps: the fewest whose batches hold the unpacked run's examples
  target = args.acc_steps * args.batch
  packed_steps = _steps_for(overrides(args, prepared, tok, "packed", 1), target)
  epr = target / (packed_steps * args.batch)
  packed_warm = max(1, round(args.acc_warmup / epr))
  # run -> (variant, steps, warmup steps, batch); "unpacked_big_batch" (--acc_control): unpacked rows,
  # the packed run's steps and warmup, batch x examples per row: as many examples per step as packed
  runs = {"unpacked": ("unpacked", args.acc_steps, args.acc_warmup, args.batch),
          "packed": ("packed", packed_steps, packed_warm, args.batch)}
  if args.acc_control:
    runs["unpacked_big_batch"] = ("unpacked", packed_steps, packed_warm, round(args.batch * epr))
  results = {name: [] for name in runs}
  for seed in args.seeds:
    for name, (variant, steps, warm, batch) in runs.items():
      o = overrides(args, prepared, tok, variant, steps, seed=seed, warmup_steps=warm,
                    log_every=min(50, steps))
      o["global_batch_size"] = batch
      workdir = os.path.join(args.work, f"acc_{name}_s{seed}_{args.acc_steps}")
      done = os.path.join(workdir, "bench_run.json")  # a finished run of these overrides: reused
      prior = _read_json(done)
      if prior and prior["overrides"] == o:  # (its JSON line is written again, "reused": true)
        scores, wall, eval_s = (prior[k] for k in ("scores", "train_s", "eval_s"))
      else:
        wall = train(o, workdir)
        if _last_metrics(workdir)["step"] != steps:
          raise SystemExit(f"{workdir}: training stopped before step {steps}")
        start = time.time()
        _run([PY, "-m", "mm_jax.eval", f"--config={CONFIG}", f"--workdir={workdir}", *_flags(o),
              "--config.eval.metrics=('exact_match','anls')"])
        eval_s = time.time() - start
        with open(os.path.join(workdir, "eval", "test.json")) as f:
          scores = json.load(f)
        scores = {k: scores[k] for k in ("vqa_exact_match", "anls", "num_examples")}
        with open(done, "w") as f:
          json.dump({"overrides": o, "scores": scores, "train_s": wall, "eval_s": eval_s}, f)
      trained = count_batches(o, 0, steps)["examples"]
      res = {"bench": "packing_accuracy", "run": name, "packing": o["data.packing"], "seed": seed,
             "steps": steps, "warmup_steps": warm, "batch": batch, "examples_trained": trained,
             "final_loss": _last_metrics(workdir)["loss"],
             "vqa_exact_match": scores["vqa_exact_match"], "anls": scores["anls"],
             "num_examples": scores["num_examples"], "train_s": round(wall, 1),
             "eval_s": round(eval_s, 1), "reused": bool(prior and prior["overrides"] == o)}
      results[name].append(res)
      _emit(res)
  summary = {"bench": "packing_accuracy_summary", "acc_steps_unpacked": args.acc_steps,
             "acc_steps_packed": packed_steps, "examples_per_row": epr, "data": stats}
  for name, rs in results.items():
    summary[name] = {k: [r[k] for r in rs] for k in ("seed", "steps", "batch", "vqa_exact_match",
                                                     "anls", "examples_trained")}
  _emit(summary)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--parts", default="speed,accuracy")
  parser.add_argument("--work", default=os.path.join(ROOT, "workdirs", "bench_packing"))
  parser.add_argument("--text_len", type=int, default=64)
  parser.add_argument("--min_len", type=int, default=8)
  parser.add_argument("--max_images", type=int, default=4)
  parser.add_argument("--batch", type=int, default=64)
  parser.add_argument("--steps", type=int, default=150, help="timed steps after warmup")
  parser.add_argument("--warmup", type=int, default=50, help="untimed steps first (compile)")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--acc_steps", type=int, default=600, help="unpacked steps of the accuracy runs")
  parser.add_argument("--acc_warmup", type=int, default=100, help="unpacked warmup steps (lr)")
  parser.add_argument("--acc_control", action=argparse.BooleanOptionalAction, default=True,
                      help="also unpacked at the packed run's steps with a batch of as many examples")
  parser.add_argument("--seeds", default="0,1", help="seeds of each variant in the accuracy part")
  parser.add_argument("--num_train", type=int, default=8000)
  parser.add_argument("--num_validation", type=int, default=200)
  parser.add_argument("--num_test", type=int, default=500)
  parser.add_argument("--data_seed", type=int, default=0)
  parser.add_argument("--vocab_size", type=int, default=128)
  parser.add_argument("--variants", default="unpacked,packed",
                      help=f"speed: comma-separated of {list(VARIANTS)}")
  parser.add_argument("--tokens_per_image", type=int, default=16, help="the model's (64 px / 16 px "
                      "patches); checked against mm_jax.tasks.vqa.row_length")
  parser.add_argument("--out", default=OUT, help="the JSON lines are appended to it")
  args = parser.parse_args()
  global _ARGS
  _ARGS = args
  args.seeds = [int(s) for s in args.seeds.split(",")]
  args.variants = args.variants.split(",")
  prepared, tok, stats = build_data(args.work, args)
  print(json.dumps({"data": prepared, "tokenizer": tok, **stats}), flush=True)
  parts = args.parts.split(",")
  if "speed" in parts:
    speed(args, prepared, tok, stats)
  if "accuracy" in parts:
    accuracy(args, prepared, tok, stats)


if __name__ == "__main__":
  main()

r"""Imports conversation datasets (LLaVA JSON, messages JSONL) into ArrayRecord shards + TFDS metadata.

  python -m mm_jax.data.prepare --input=train=llava.json --input=validation=val.jsonl --out=DIR
      [--split=train] [--format=llava|messages] [--image_root=DIR] [--workers=N]
      [--examples_per_shard=1000] [--bad_records=fail|skip] [--max_image_pixels=50000000]
      [--allow_outside_root] [--tokenizer=PATH] [--shard_index=I --num_shards=N]
  python -m mm_jax.data.prepare --merge=DIR      # the metadata, once every part's shards are written

  source = prepare.read(DIR, "train")   # source[i]: the Conversation, its images the encoded bytes
  # plain TFDS, no TensorFlow: tfds.builder_from_directory(DIR).as_data_source()["train"][i] ->
  #   {"id": b"...", "conversation": b"<Conversation.to_json()>", "images": [b"\x89PNG...", ...]}

--input SPLIT=PATH (several per split are read in order) or PATH (split --split); each file's format
is detected from its first record unless --format names it (formats/). Image paths are relative to
--image_root (default: each input file's directory; gs:// etc. through etils.epath). Record i of a
split goes into shard i // examples_per_shard, so the result is the same whatever --workers; a worker
process writes whole shards (shards.py), and a rerun skips the finished ones. --bad_records=fail stops
at a bad record with `<file>:<line> (<split> record <index>) <reason>; <fix>`, the shards written kept;
skip leaves it out and counts it. Statistics per split (DIR/statistics.json, and printed): records,
examples, skipped (the first listed), images (and the most in one example), turns, and the token
length percentiles of the text parts with --tokenizer. Several machines: each runs the same command
with its --shard_index of --num_shards (a contiguous range of the output shards) into one shared DIR;
the last to finish writes the metadata (or --merge does). DIR/.prepare holds the plan and each shard's
statistics.
"""
import concurrent.futures
import dataclasses
import json
import multiprocessing
import os
import re
import sys
import time

from etils import epath
import tensorflow_datasets as tfds

from mm_jax.data import formats, shards
from mm_jax.data.conversation import Conversation
from mm_jax.errors import UserError

PROG = "mm_jax.data.prepare"
POLICIES = ("fail", "skip")
@dataclasses.dataclass(frozen=True)
class Options:
  inputs: tuple = ()            # (split, path) in order
  out: str = ""
  format: str = ""              # "": detected from the first record
  image_root: str = ""          # "": each input file's directory
  workers: int = 0              # 0: os.cpu_count()
  examples_per_shard: int = 1000
  bad_records: str = "fail"
  max_image_pixels: int = 50_000_000
  allow_outside_root: bool = False
  tokenizer: str = ""
  shard_index: int = 0
  num_shards: int = 1


def parse_input(value: str, split: str) -> tuple[str, str]:
  """--input SPLIT=PATH or PATH (split `split`) -> (split, path)."""
  m = re.fullmatch(r"(\w+)=(.+)", value)
  return (m[1], m[2]) if m else (split, value)


def check(opts: Options) -> None:
  """UserError naming the flag and the fix; nothing is written before."""
  if not opts.out:
    raise UserError("--out is required: the directory to write the dataset into")
  if not opts.inputs:
    raise UserError("--input is required: SPLIT=PATH or PATH (a .json list or a .jsonl file)")
  for split, _ in opts.inputs:
    if not re.fullmatch(r"\w+", split):
      raise UserError(f"split {split!r} is no split name; use letters, digits and _ (--input SPLIT=PATH)")
  if opts.format:
    formats.get(opts.format)
  for name in ("examples_per_shard", "max_image_pixels", "num_shards"):
    if getattr(opts, name) < 1:
      raise UserError(f"--{name}={getattr(opts, name)} must be at least 1")
  if opts.workers < 0:
    raise UserError(f"--workers={opts.workers} must be at least 1 (0: one per CPU)")
  if not 0 <= opts.shard_index < opts.num_shards:
    raise UserError(f"--shard_index={opts.shard_index} must be in [0, --num_shards={opts.num_shards})")
  if opts.bad_records not in POLICIES:
    raise UserError(f"--bad_records={opts.bad_records} is unknown; use fail or skip")
  if opts.image_root and not epath.Path(opts.image_root).is_dir():
    raise UserError(f"--image_root={opts.image_root} is not a directory; give the images' directory")
  if opts.tokenizer:  # loaded here once: the forked workers inherit it
    try:
      shards.load_tokenizer(opts.tokenizer)
    except UserError as e:
      raise UserError(f"--tokenizer: {e}") from None
    except Exception as e:  # e.g. not a tokenizer file
      raise UserError(f"--tokenizer={opts.tokenizer} cannot be loaded ({type(e).__name__}: "
                      f"{' '.join(str(e).split())[:120]}); give a .model, a tokenizer.json or their "
                      "directory") from None
  if epath.Path(opts.out).exists() and not epath.Path(opts.out).is_dir():
    raise UserError(f"--out={opts.out} is a file; give a directory (created if missing)")


def index(opts: Options) -> dict[str, list]:
  """{split: [(path, image root, format, line, raw record)]}, every input read once
  (formats.read_records); a file's format is --format or detected from its first record."""
  splits: dict[str, list] = {}
  for split, path in opts.inputs:
    root = opts.image_root or os.path.dirname(path) or "."
    records = formats.read_records(path)
    fmt = opts.format or formats.detect(records[0][1], f"{path}:{records[0][0]}")
    splits.setdefault(split, []).extend((path, root, fmt, line, raw) for line, raw in records)
  return splits


def make_plan(opts: Options, splits: dict[str, list]) -> dict:
  """What the output is made of: its identity, the same for every part and every rerun."""
  e = opts.examples_per_shard
  return {"examples_per_shard": e, "max_image_pixels": opts.max_image_pixels,
          "allow_outside_root": opts.allow_outside_root, "tokenizer": opts.tokenizer,
          "splits": {split: {"inputs": list(dict.fromkeys(r[:3] for r in recs)),
                             "records": len(recs), "shards": -(-len(recs) // e)}
                     for split, recs in splits.items()}}


def _plan_path(out: str) -> epath.Path:
  return epath.Path(out) / shards.WORK / "plan.json"


def save_plan(out: str, plan: dict) -> None:
  """Writes DIR/.prepare/plan.json, or checks that the one there is this plan."""
  path = _plan_path(out)
  plan = json.loads(json.dumps(plan))  # tuples as lists, as read back
  if path.exists():
    old = json.loads(path.read_text())
    if old != plan:
      diff = [k for k in plan if old.get(k) != plan[k]]
      raise UserError(f"--out={out} holds another import (its plan differs in {', '.join(diff)}); "
                      "give a new --out, or delete it to start again")
    return
  path.parent.mkdir(parents=True, exist_ok=True)
  shards._write_json(path, plan)  # pylint: disable=protected-access


def my_shards(plan: dict, shard_index: int, num_shards: int) -> list[tuple[str, int]]:
  """This part's contiguous range of (split, shard) over all the splits' shards, in order."""
  every = [(split, k) for split, s in plan["splits"].items() for k in range(s["shards"])]
  return every[shard_index * len(every) // num_shards:(shard_index + 1) * len(every) // num_shards]


def missing(out: str, plan: dict) -> list[str]:
  return [shards.shard_name(split, k, s["shards"]) for split, s in plan["splits"].items()
          for k in range(s["shards"]) if not shards.is_done(out, split, k, s["shards"])]


class Progress:
  """A line on stderr every few seconds: shards done, examples, examples/s."""

  def __init__(self, todo: int, done: int, total: int, every: float = 2.0):
    self.todo, self.done, self.total, self.every = todo, done, total, every
    self.shards = self.examples = self.skipped = 0
    self.start = self.last = time.monotonic()

  def update(self, stats: dict) -> None:
    self.shards += 1
    self.examples += stats["examples"]
    self.skipped += stats["skipped"]
    if time.monotonic() - self.last >= self.every or self.shards == self.todo:
      self.last = time.monotonic()
      rate = self.examples / max(self.last - self.start, 1e-9)
      print(f"{PROG}: {self.done + self.shards}/{self.total} shards, {self.examples} examples "
            f"({self.skipped} skipped) in {self.last - self.start:.1f} s, {rate:.0f} examples/s",
            file=sys.stderr, flush=True)


def _run(tasks: list, workers: int, progress: Progress) -> None:
  if workers == 1 or len(tasks) == 1:
    for t in tasks:
      progress.update(shards.write_shard(t))
    return
  # fork: the workers start at once with the records in memory (jax's backends are never started here)
  context = multiprocessing.get_context("fork")
  with concurrent.futures.ProcessPoolExecutor(min(workers, len(tasks)), mp_context=context) as pool:
    futures = [pool.submit(shards.write_shard, t) for t in tasks]
    try:
      for f in concurrent.futures.as_completed(futures):
        progress.update(f.result())
    except concurrent.futures.process.BrokenProcessPool:
      raise UserError("a worker process died (killed, or out of memory?); rerun the command: the "
                      "finished shards are kept") from None
    finally:  # the shards in flight finish (and are kept); the others are not started
      for f in futures:
        f.cancel()


def run(opts: Options) -> dict | None:
  """Imports opts.inputs into opts.out; returns {split: statistics}, or None while other parts
  (--shard_index of --num_shards) have shards to write."""
  check(opts)
  splits = index(opts)
  plan = make_plan(opts, splits)
  save_plan(opts.out, plan)
  settings = shards.Settings(out=opts.out, bad_records=opts.bad_records,
                             max_image_pixels=opts.max_image_pixels,
                             allow_outside_root=opts.allow_outside_root, tokenizer=opts.tokenizer)
  mine, e = my_shards(plan, opts.shard_index, opts.num_shards), opts.examples_per_shard
  todo = [(split, k) for split, k in mine
          if not shards.is_done(opts.out, split, k, plan["splits"][split]["shards"])]
  tasks = [shards.Task(settings, split, k, plan["splits"][split]["shards"], k * e,
                       splits[split][k * e:(k + 1) * e]) for split, k in todo]
  total = sum(s["shards"] for s in plan["splits"].values())
  done = total - len(missing(opts.out, plan))
  if len(todo) < len(mine):
    print(f"{PROG}: {len(mine) - len(todo)} of this part's {len(mine)} shards already written",
          file=sys.stderr, flush=True)
  _run(tasks, opts.workers or os.cpu_count() or 1, Progress(len(tasks), done, total))
  if left := missing(opts.out, plan):
    print(f"{PROG}: part {opts.shard_index} of {opts.num_shards} done; {len(left)} shards of the "
          f"other parts are not written yet: the last part to finish writes the metadata, or run "
          f"python -m {PROG} --merge={opts.out} once they are", file=sys.stderr, flush=True)
    return None
  return _finish(opts.out, plan)


def merge(out: str) -> dict:
  """Writes the metadata of an import whose parts have all finished."""
  if not _plan_path(out).exists():
    raise UserError(f"--merge={out} holds no import ({shards.WORK}/plan.json is missing); give the "
                    "--out directory of the parts")
  plan = json.loads(_plan_path(out).read_text())
  if left := missing(out, plan):
    raise UserError(f"--merge={out}: {len(left)} shards are not written yet (the first: {left[0]}); "
                    "run the parts that write them (the same command: finished shards are skipped)")
  return _finish(out, plan)


def _finish(out: str, plan: dict) -> dict:
  per_split = {split: [json.loads(shards.stats_path(out, split, k, s["shards"]).read_text())
                       for k in range(s["shards"])] for split, s in plan["splits"].items()}
  return shards.write_metadata(out, per_split, description=f"Conversations imported by {PROG}.")


def summary(stats: dict) -> list[str]:
  """The statistics as printed: a line per split, then the skipped records listed."""
  lines = []
  for split, s in stats.items():
    line = (f"{split}: {s['examples']} examples of {s['records']} records ({s['skipped']} skipped), "
            f"{s['images']} images (at most {s['max_images']} in one), {s['turns']} turns, "
            f"{s['shards']} shards, {s['bytes'] / 1e6:.1f} MB")
    if "tokens" in s:
      t = s["tokens"]
      line += f"; tokens p50 {t['p50']}, p90 {t['p90']}, p99 {t['p99']}, max {t['max']}"
    lines.append(line)
    lines += [f"  skipped {w}" for w in s["skipped_first"]]
  return lines


class Reader:
  """The examples of a split of an import, by random access: reader[i] is a Conversation whose
  images are the encoded bytes."""

  def __init__(self, out: str, split: str):
    self.source = tfds.builder_from_directory(out).as_data_source()[split]

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, i: int) -> Conversation:
    record = self.source[i]
    return Conversation.from_json(record["conversation"].decode(), [bytes(b) for b in record["images"]])


def read(out: str, split: str) -> Reader:
  return Reader(out, split)


def main() -> None:
  if _MERGE.value:
    stats = merge(_MERGE.value)
    out = _MERGE.value
  else:
    opts = Options(inputs=tuple(parse_input(v, _SPLIT.value) for v in _INPUT.value or ()),
                   out=_OUT.value or "", format=_FORMAT.value or "", image_root=_IMAGE_ROOT.value,
                   workers=_WORKERS.value, examples_per_shard=_EXAMPLES_PER_SHARD.value,
                   bad_records=_BAD_RECORDS.value, max_image_pixels=_MAX_IMAGE_PIXELS.value,
                   allow_outside_root=_ALLOW_OUTSIDE_ROOT.value, tokenizer=_TOKENIZER.value,
                   shard_index=_SHARD_INDEX.value, num_shards=_NUM_SHARDS.value)
    stats, out = run(opts), opts.out
  if stats is not None:
    print("\n".join(summary(stats)))
    print(f"Wrote {out}: read it with mm_jax.data.prepare.read({out!r}, split), or "
          f"tfds.builder_from_directory({out!r}).as_data_source()[split]", flush=True)


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mm_jax import cli  # pylint: disable=g-import-not-at-top
  _INPUT = flags.DEFINE_multi_string("input", None, "SPLIT=PATH or PATH (split --split): a .json "
                                     "list or JSONL file; repeat for more files and splits.")
  _SPLIT = flags.DEFINE_string("split", "train", "The split of an --input given without SPLIT=.")
  _OUT = flags.DEFINE_string("out", None, "The dataset directory to write (created if missing).")
  _FORMAT = flags.DEFINE_string("format", "", f"{' or '.join(formats.FORMATS)}; default: detected "
                                "from the first record.")
  _IMAGE_ROOT = flags.DEFINE_string("image_root", "", "Image paths are relative to it (default: "
                                    "each input file's directory); local, gs://, ...")
  _WORKERS = flags.DEFINE_integer("workers", 0, "Worker processes (0: os.cpu_count()).")
  _EXAMPLES_PER_SHARD = flags.DEFINE_integer("examples_per_shard", 1000, "Input records per shard.")
  _BAD_RECORDS = flags.DEFINE_string("bad_records", "fail", "fail: stop at the first bad record; "
                                     "skip: leave bad records out, count and list them.")
  _MAX_IMAGE_PIXELS = flags.DEFINE_integer("max_image_pixels", 50_000_000, "An image whose header "
                                           "says more pixels is refused (decompression bomb).")
  _ALLOW_OUTSIDE_ROOT = flags.DEFINE_bool("allow_outside_root", False, "Allow image paths that leave "
                                          "--image_root (../, absolute paths, symlinks out).")
  _TOKENIZER = flags.DEFINE_string("tokenizer", "", "A SentencePiece .model, a tokenizer.json or "
                                   "their directory: token length percentiles in the statistics.")
  _SHARD_INDEX = flags.DEFINE_integer("shard_index", 0, "This machine's part, of --num_shards.")
  _NUM_SHARDS = flags.DEFINE_integer("num_shards", 1, "Machines that share the output shards, each "
                                     "a contiguous range.")
  _MERGE = flags.DEFINE_string("merge", "", "Write the metadata of the import in this directory "
                               "once every part has finished (nothing else is read).")
  cli.run(PROG, main)

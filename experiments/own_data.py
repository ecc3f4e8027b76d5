r"""Your own data, measured: shapes exported as LLaVA JSON / messages JSONL + PNG files, imported with
mm_jax.data.prepare and trained through the general path, against the native shapes path; and the
multi-image task for the unified and cross families against their blind variants.

  python experiments/own_data.py --runs=native,llava,messages            # ~8 min per run on 2 cores
  python experiments/own_data.py --runs=mix_unified_ps,mix_unified_ps_blind,mix_cross_ps,mix_cross_ps_blind
                                        # ~11-14 min per run: the multi-image task, both families

Each run is the real commands in fresh processes (export, prepare, train, eval) with the default model
and budget (configs/shapes_tiny.py); one JSON line per run is printed and appended to
experiments/own_data.jsonl: the test scores, per kind, and the wall time.
"""
import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
CONFIG = "configs/shapes_tiny.py"

# run -> (export format or None for the native path, export task, extra --config flags)
MULTI = ["--config.data.max_images=2", "--config.data.text_len=52", "--config.model.max_answer_len=10"]
RUNS = {
    "native": (None, None, []),
    "llava": ("llava", "qa", []),
    "messages": ("messages", "qa", []),
    "multi_unified": ("llava", "multi_image", MULTI),
    "multi_unified_blind": ("llava", "multi_image", MULTI + ["--config.data.blind=True"]),
    "multi_cross": ("llava", "multi_image", MULTI + ["--config.model.family=cross"]),
    "multi_cross_blind": ("llava", "multi_image",
                          MULTI + ["--config.model.family=cross", "--config.data.blind=True"]),
    # the multi-image task mixed with the single-image questions (tested on the multi-image task)
    "mix_unified": ("llava", "qa+multi_image", MULTI),
    "mix_unified_blind": ("llava", "qa+multi_image", MULTI + ["--config.data.blind=True"]),
    "mix_cross": ("llava", "qa+multi_image", MULTI + ["--config.model.family=cross"]),
    "mix_cross_blind": ("llava", "qa+multi_image",
                        MULTI + ["--config.model.family=cross", "--config.data.blind=True"]),
    # the cross family at twice the default budget (its loss still falls at 3000 steps)
    "mix_cross_6k": ("llava", "qa+multi_image",
                     MULTI + ["--config.model.family=cross", "--config.total_steps=6000"]),
    "mix_cross_blind_6k": ("llava", "qa+multi_image",
                           MULTI + ["--config.model.family=cross", "--config.data.blind=True",
                                    "--config.total_steps=6000"]),
    # the cross family with the pixel-shuffle connector, its best on shapes (0.889 against linear's 0.677)
    "mix_cross_ps": ("llava", "qa+multi_image",
                     MULTI + ["--config.model.family=cross", "--config.model.connector=pixel_shuffle"]),
    "mix_cross_ps_blind": ("llava", "qa+multi_image",
                           MULTI + ["--config.model.family=cross", "--config.model.connector=pixel_shuffle",
                                    "--config.data.blind=True"]),
    # the unified family with the pixel-shuffle connector (4x fewer image tokens per image)
    "mix_unified_ps": ("llava", "qa+multi_image", MULTI + ["--config.model.connector=pixel_shuffle"]),
    "mix_unified_ps_blind": ("llava", "qa+multi_image",
                             MULTI + ["--config.model.connector=pixel_shuffle", "--config.data.blind=True"]),
    # the default at other seeds (init, data order): the spread of the native score
    **{f"native_seed{s}": (None, None, [f"--config.seed={s}"]) for s in (1, 2, 3)},
}


def _run(cmd: list[str]) -> str:
  out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, check=False)
  if out.returncode:
    raise SystemExit(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  return out.stdout


def _tokenizer(work: str) -> str:
  """The native shapes tokenizer (built with the data), so both paths tokenize alike."""
  code = ("from mm_jax.config import files; from mm_jax.data import shapes; "
          f"c = files.get_config('shapes_tiny', ''); c.data.data_dir = {os.path.join(work, 'data')!r}; "
          "print(shapes.tokenizer_path(shapes.build(c.data)))")
  return _run([PY, "-c", code]).strip().splitlines()[-1]


def _exported(work: str, fmt: str, task: str) -> str:
  export = os.path.join(work, f"export_{fmt}_{task}")
  if not os.path.exists(os.path.join(export, "test." + ("json" if fmt == "llava" else "jsonl"))):
    _run([PY, "-m", "mm_jax.data.export", f"--out={export}", f"--format={fmt}", f"--task={task}"])
  return export


def _prepared(work: str, fmt: str, task: str) -> str:
  """task "a+b": training on both exports (mixed), validation and test from b alone."""
  out = os.path.join(work, f"prepared_{fmt}_{task}")
  if not os.path.exists(os.path.join(out, "dataset_info.json")):
    tasks, ext = task.split("+"), "json" if fmt == "llava" else "jsonl"
    exports = [_exported(work, fmt, t) for t in tasks]
    inputs = [f"--input=train={os.path.join(e, f'train.{ext}')}" for e in exports]
    inputs += [f"--input={s}={os.path.join(exports[-1], f'{s}.{ext}')}" for s in ("validation", "test")]
    _run([PY, "-m", "mm_jax.data.prepare", *inputs, f"--out={out}"])
  return out


def run(name: str, work: str) -> dict:
  fmt, task, extra = RUNS[name]
  flags = [f"--config.data.data_dir={os.path.join(work, 'data')}", *extra]
  if fmt:
    flags += ["--config.data.name=conversations", f"--config.data.path={_prepared(work, fmt, task)}",
              f"--config.data.tokenizer={_tokenizer(work)}"]
  workdir = os.path.join(work, name)
  start = time.time()
  _run([PY, "-m", "mm_jax.train", f"--config={CONFIG}", f"--workdir={workdir}", *flags])
  _run([PY, "-m", "mm_jax.eval", f"--config={CONFIG}", f"--workdir={workdir}", *flags])
  with open(os.path.join(workdir, "eval", "test.json")) as f:
    scores = json.load(f)
  return {"run": name, "format": fmt or "native", "task": task or "qa",
          "vqa_exact_match": scores["vqa_exact_match"], "per_kind": scores["per_kind"],
          "num_examples": scores["num_examples"], "wall_s": round(time.time() - start, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--runs", default="native,llava,messages", help=f"comma-separated of {list(RUNS)}")
  parser.add_argument("--work", default=os.path.join(ROOT, "workdirs", "own_data"))
  args = parser.parse_args()
  for name in args.runs.split(","):
    result = run(name, args.work)
    print(json.dumps(result), flush=True)
    with open(os.path.join(ROOT, "experiments", "own_data.jsonl"), "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()

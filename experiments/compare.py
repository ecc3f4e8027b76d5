r"""Families, connectors and stage recipes on shapes at one step budget (experiments/README.md).

  python experiments/compare.py run --group=families,connectors [--parallel=4] [--root=workdirs/compare]
  python experiments/compare.py run --variant=cross_mlp --steps=3000
  python experiments/compare.py recipes [--parallel=3]      # every recipe of configs/recipes.py
  python experiments/compare.py report [--step_time]        # table + experiments/compare.png

`run`: for each variant (configs/shapes_tiny.py + the overrides in VARIANTS), `python -m mm_jax.train`
with a checkpoint every 250 steps (all kept), then `curve`: every checkpoint scored on the validation
split (800 questions), the last also on test (2000); scores go to <workdir>/curve.json. Runs that
already have a curve.json are skipped. `recipes`: `python -m mm_jax.recipe` per recipe (one shared
pretraining dir); recipe.json holds each stage's checks and test score (the plot's points for recipes,
at the step counted from the recipe's first multimodal stage).
`report`: collects the curves into experiments/compare.json, prints the Markdown table (test EM,
train step time on this machine's CPU, the decoder's sequence length, trainable / total params) and
plots validation EM vs step per variant into experiments/compare.png. --step_time measures each
variant's train step (one device, fixed batch, all variants alternated in the one run, median of 3).
"""
import argparse
import concurrent.futures
import json
import os
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(HERE))
_RESULTS, _PLOT = HERE / "compare.json", HERE / "compare.png"
_CONFIG = "configs/shapes_tiny.py"

# name -> (group, overrides of configs/shapes_tiny.py). "unified_linear" is the default config.
VARIANTS = {
    "unified_linear": ("families connectors seeds", {}),
    "cross_linear": ("families", {"model.family": "cross"}),
    "hybrid_linear": ("families", {"model.family": "hybrid"}),
    "fuyu_linear": ("families", {"model.family": "fuyu"}),
    "unified_mlp": ("connectors", {"model.connector": "mlp"}),
    "unified_resampler": ("connectors", {"model.connector": "resampler"}),
    "unified_pixel_shuffle": ("connectors", {"model.connector": "pixel_shuffle"}),
    "unified_linear_seed1": ("seeds", {"seed": 1}),  # how far one seed moves the result
    "cross_mlp": ("cross", {"model.family": "cross", "model.connector": "mlp"}),
    "cross_resampler": ("cross", {"model.family": "cross", "model.connector": "resampler"}),
    "cross_pixel_shuffle": ("cross", {"model.family": "cross", "model.connector": "pixel_shuffle"}),
    # Image tokens skip the decoder's 3 blocks in the cross family: give the encoder 3 more.
    "cross_linear_enc6": ("cross", {"model.family": "cross", "model.encoder.depth": 6}),
}
RECIPES = ("llava", "llama32_vision", "molmo", "baichuan_omni", "qwen2_vl", "nvlm_x")


def _flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _sh(cmd: list[str], log: pathlib.Path) -> None:
  log.parent.mkdir(parents=True, exist_ok=True)
  with log.open("a") as f:
    f.write("$ " + " ".join(cmd) + "\n")
    f.flush()
    subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, cwd=REPO)


def _train_and_curve(name: str, overrides: dict, root: pathlib.Path, steps: int) -> str:
  workdir = root / name
  if (workdir / "curve.json").exists():
    return f"{name}: done before"
  start = time.time()
  flags = _flags({"total_steps": steps, "checkpoint_every": 250, "keep_checkpoints": 1000, **overrides})
  _sh([sys.executable, "-m", "mm_jax.train", f"--config={_CONFIG}", f"--workdir={workdir}", *flags],
      workdir / "log.txt")
  train_s = time.time() - start
  _sh([sys.executable, __file__, "curve", f"--workdir={workdir}", f"--train_seconds={train_s:.0f}"],
      workdir / "log.txt")
  return f"{name}: test EM {json.loads((workdir / 'curve.json').read_text())['test']['vqa_exact_match']}"


def curve(workdir: str, train_seconds: float) -> dict:
  """Scores every checkpoint of `workdir` on validation and the newest on test; writes curve.json."""
  import ml_collections as mlc  # pylint: disable=g-import-not-at-top
  from mm_jax.eval import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  from mm_jax.checkpoint import Checkpoints  # pylint: disable=g-import-not-at-top
  ckpt = Checkpoints(workdir, read_only=True)
  steps = ckpt.all_steps()
  config = mlc.ConfigDict(ckpt.meta(steps[-1])["config"])
  ckpt.close()
  val = {s: eval_lib.evaluate(config, workdir, "validation", s)["vqa_exact_match"] for s in steps}
  test = eval_lib.evaluate(config, workdir, "test", steps[-1])
  out = {"validation": val, "test": test, "train_seconds": train_seconds}
  pathlib.Path(workdir, "curve.json").write_text(json.dumps(out, indent=1))
  return out


def _recipe(name: str, root: pathlib.Path) -> str:
  """`python -m mm_jax.recipe` (trains, checks and test-scores every stage; recipe.json)."""
  workdir = root / "recipes" / name
  _sh([sys.executable, "-m", "mm_jax.recipe", f"--config=configs/recipes.py:{name}",
       f"--workdir={workdir}", f"--pretrain_dir={root / 'pretrain'}"], workdir / "log.txt")
  return f"{name}: done"


def _pool(jobs, parallel: int) -> None:
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    for fut in concurrent.futures.as_completed([pool.submit(*job) for job in jobs]):
      print(fut.result(), flush=True)


def _prebuild(root: pathlib.Path) -> None:
  """Builds the dataset and tokenizer once, before parallel runs could race to build them."""
  from mm_jax import data  # pylint: disable=g-import-not-at-top
  config = _load_config({})
  for split in ("train", "validation", "test"):
    data.open_split(config, split)
  root.mkdir(parents=True, exist_ok=True)


def _load_config(overrides: dict):
  from mm_jax.config import files  # pylint: disable=g-import-not-at-top
  config = files.load(str(REPO / _CONFIG))
  config.update_from_flattened_dict(overrides)
  return config


def _describe(overrides: dict) -> dict:
  """Decoder sequence length and trainable / total params of a variant (abstract, nothing computed)."""
  import jax  # pylint: disable=g-import-not-at-top
  from mm_jax.train import optim  # pylint: disable=g-import-not-at-top
  from mm_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from mm_jax.train.state import ModelOnMesh  # pylint: disable=g-import-not-at-top
  config = _load_config(overrides)
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  mm = ModelOnMesh.create(config, config.data.vocab_size, mesh)
  labels = optim.param_labels(mm.abstract_params, config.optim.rules)
  sizes = [(x.size, lab) for x, lab in zip(jax.tree.leaves(mm.abstract_params), jax.tree.leaves(labels))]
  s = config.data.image_size
  return {"seq_len": config.data.text_len + mm.model.num_image_tokens((1, s, s, 3)),
          "trainable": sum(n for n, lab in sizes if lab == "trainable"), "total": sum(n for n, _ in sizes)}


def report(root: pathlib.Path, step_time: bool) -> None:
  results = json.loads(_RESULTS.read_text()) if _RESULTS.exists() else {}
  for name, (group, overrides) in VARIANTS.items():
    path = root / name / "curve.json"
    if path.exists():
      old = {k: v for k, v in results.get(name, {}).items() if k == "ms_per_step"}
      results[name] = {"group": group, "overrides": overrides, **json.loads(path.read_text()),
                       **_describe(overrides), **old}
  for name in RECIPES:
    path = root / "recipes" / name / "recipe.json"
    if path.exists():
      new = _recipe_result(name, json.loads(path.read_text()))
      before = {s["name"]: s.get("ms_per_step") for s in results.get(f"recipe_{name}", {}).get("stages", [])}
      for stage in new["stages"]:  # keep measured step times until --step_time measures them again
        if before.get(stage["name"]) is not None:
          stage["ms_per_step"] = before[stage["name"]]
      results[f"recipe_{name}"] = new
  if step_time:
    from step_time import step_timer  # pylint: disable=g-import-not-at-top
    names = [n for n in results if n in VARIANTS]
    timers = {n: [step_timer(_load_config(VARIANTS[n][1]))] for n in names}
    timers.update({n: _recipe_timers(results[n]["recipe"]) for n in results
                   if results[n].get("recipe") in RECIPES})
    times = {n: [[] for _ in ts] for n, ts in timers.items()}
    for _ in range(3):  # alternated, so machine noise hits every variant alike
      for n, ts in timers.items():
        for i, timer in enumerate(ts):
          times[n][i].append(timer(10))
    for n, ts in times.items():
      if n in VARIANTS:
        results[n]["ms_per_step"] = sorted(ts[0])[1]
      else:
        for stage, t in zip(results[n]["stages"], ts):
          stage["ms_per_step"] = sorted(t)[1]
  _RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
  _table(results)
  _plot(results)


def _recipe_result(name: str, summary: dict) -> dict:
  """A recipe's multimodal stages: steps, params, checks and the test score at each stage's end (the
  plot's points, at the step counted from the first multimodal stage)."""
  stages, offset, points = [], 0, {}
  for st in summary["stages"]:
    if st.get("pretrain"):
      continue
    offset += st["total_steps"]
    points[str(offset)] = st["eval"]["vqa_exact_match"]
    stages.append({k: st[k] for k in ("name", "total_steps", "trainable_params", "total_params",
                                      "frozen_params_unchanged", "opt_state_elements", "train_seconds")}
                  | {"test": st["eval"]["vqa_exact_match"]})
  return {"group": "recipes", "recipe": name, "validation": {}, "stage_ends": points,
          "test": summary["stages"][-1]["eval"], "stages": stages,
          "trainable": stages[-1]["trainable_params"], "total": stages[-1]["total_params"]}


def _recipe_timers(name: str) -> list:
  """A step timer per multimodal stage of recipe `name` (its train config; params random)."""
  from mm_jax import recipe as recipe_lib  # pylint: disable=g-import-not-at-top
  from mm_jax.config import files  # pylint: disable=g-import-not-at-top
  from step_time import step_timer  # pylint: disable=g-import-not-at-top
  cfg = files.load(f"configs/recipes.py:{name}")
  workdirs = recipe_lib.stage_workdirs(cfg, "/nonexistent")
  return [step_timer(recipe_lib.stage_config(cfg, i, workdirs)[0])
          for i, st in enumerate(cfg.stages) if not st.pretrain]


def _kinds(test: dict) -> str:
  return " / ".join(f"{test.get('per_kind', {}).get(k, float('nan')):.2f}"
                    for k in ("color", "count", "presence", "shape"))


def _table(results: dict) -> None:
  print("| variant | test EM | colour / count / presence / shape | ms/step (CPU) | decoder seq | "
        "trainable / total params |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, r in results.items():
    if "recipe" in r:
      continue
    ms = f"{r['ms_per_step']:.0f}" if "ms_per_step" in r else "–"
    print(f"| {name} | {r['test']['vqa_exact_match']:.3f} | {_kinds(r['test'])} | {ms} | "
          f"{r.get('seq_len', '–')} | {r['trainable']:,} / {r['total']:,} |")
  print("\n| recipe | stages (steps, trainable / total params) | test EM after each stage | "
        "final colour / count / presence / shape | ms/step per stage (CPU) | checks per stage: frozen "
        "arrays unchanged, optimizer-state elements |")
  print("| --- | --- | --- | --- | --- | --- |")
  for name, r in results.items():
    if "recipe" not in r:
      continue
    st = r["stages"]
    print(f"| {r['recipe']} | " + " → ".join(
        f"{s['name']} ({s['total_steps']}, {s['trainable_params']:,} / {s['total_params']:,})" for s in st)
          + " | " + " → ".join(f"{s['test']:.3f}" for s in st) + f" | {_kinds(r['test'])} | "
          + " / ".join(f"{s['ms_per_step']:.0f}" if "ms_per_step" in s else "–" for s in st) + " | "
          + "; ".join(f"{s['frozen_params_unchanged']}, {s['opt_state_elements']:,}" for s in st) + " |")


def _plot(results: dict) -> None:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  groups = sorted({g for r in results.values() for g in r["group"].split()})
  cols = 3
  rows = -(-len(groups) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(5 * cols, 3.8 * rows), squeeze=False)
  for ax in axes.flat[len(groups):]:
    ax.axis("off")
  for ax, group in zip(axes.flat, groups):
    for name, r in results.items():
      if group in r["group"].split():
        pts = sorted((int(s), v) for s, v in (r["validation"] or r["stage_ends"]).items())
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="." if r["validation"] else "o",
                label=r.get("recipe", name))
    ax.axhline(0.85, color="grey", lw=0.8, ls="--")
    ax.set(title=group, xlabel="training step", ylim=(0.2, 1), xlim=(0, 3100),
           ylabel="test EM at stage ends" if group.startswith("recipes") else "validation EM")
    ax.legend(fontsize=7, loc="upper left" if group.startswith("recipes") else "lower right")
  fig.tight_layout()
  fig.savefig(_PLOT, dpi=110)
  print(f"wrote {_PLOT}")


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("command", choices=("run", "recipes", "curve", "report"))
  parser.add_argument("--root", default="workdirs/compare")
  parser.add_argument("--group", default="", help="comma-separated groups of VARIANTS")
  parser.add_argument("--variant", default="", help="comma-separated names of VARIANTS")
  parser.add_argument("--recipe", default=",".join(RECIPES))
  parser.add_argument("--steps", type=int, default=3000)
  parser.add_argument("--parallel", type=int, default=1)
  parser.add_argument("--workdir", default="")
  parser.add_argument("--train_seconds", type=float, default=0.0)
  parser.add_argument("--step_time", action="store_true")
  args = parser.parse_args()
  root = pathlib.Path(args.root).resolve()
  if args.command == "curve":
    curve(args.workdir, args.train_seconds)
  elif args.command == "run":
    groups, names = set(filter(None, args.group.split(","))), set(filter(None, args.variant.split(",")))
    chosen = [n for n, (g, _) in VARIANTS.items() if n in names or groups & set(g.split())]
    _prebuild(root)
    _pool([(_train_and_curve, n, VARIANTS[n][1], root, args.steps) for n in chosen], args.parallel)
  elif args.command == "recipes":
    _prebuild(root)
    _pool([(_recipe, n, root) for n in args.recipe.split(",")], args.parallel)
  else:
    report(root, args.step_time)


if __name__ == "__main__":
  os.environ.setdefault("PYTHONUNBUFFERED", "1")
  main()

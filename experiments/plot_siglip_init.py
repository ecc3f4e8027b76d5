r"""Accuracy vs step of shapes_tiny from scratch and from a SigLIP-pretrained encoder (experiments/README.md).

  python experiments/plot_siglip_init.py --run=scratch:workdirs/tiny_scratch \
      --run=siglip:workdirs/tiny_from_siglip [--split=validation] [--bar=0.85]

Evaluates every checkpoint of each run (mm_jax.eval.evaluate, the same code as `python -m mm_jax.eval
--step=N`) that experiments/siglip_init.json does not hold yet, stores the scores there, prints the
first step at or above --bar per run, and plots vqa_exact_match vs step to experiments/siglip_init.png.
Needs matplotlib (pip install matplotlib; not a dependency of mm_jax).
"""
import argparse
import json
import pathlib
import sys

HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
# pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.eval import evaluate as eval_lib
from mm_jax.checkpoint import Checkpoints

_RESULTS = HERE / "siglip_init.json"
_PLOT = HERE / "siglip_init.png"


def _config_of(workdir: str, step: int):
  """The config that wrote the checkpoint (the eval needs the same model and data)."""
  import ml_collections as mlc
  meta = Checkpoints(workdir, read_only=True).meta(step)
  return mlc.ConfigDict(meta["config"])


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--run", action="append", default=[], help="label:workdir of a shapes_tiny run")
  parser.add_argument("--split", default="validation", help="split the checkpoints are scored on")
  parser.add_argument("--bar", type=float, default=0.85, help="report the first step reaching it")
  args = parser.parse_args()
  results = json.loads(_RESULTS.read_text()) if _RESULTS.exists() else {}
  for run in args.run:
    label, workdir = run.split(":", 1)
    scores = results.setdefault(f"{label}/{args.split}", {})
    for step in Checkpoints(workdir, read_only=True).all_steps():
      if str(step) not in scores:
        config = _config_of(workdir, step)
        scores[str(step)] = eval_lib.evaluate(config, workdir, args.split, step)["vqa_exact_match"]
        _RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
    curve = sorted((int(s), v) for s, v in scores.items())
    first = next((s for s, v in curve if v >= args.bar), None)
    print(f"{label}: first step with {args.split} vqa_exact_match >= {args.bar}: {first}; "
          f"last {curve[-1] if curve else None}")

  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  fig, ax = plt.subplots(figsize=(7, 4.5))
  labels = sorted({key.split("/")[0] for key in results})
  for key, scores in sorted(results.items()):
    label, split = key.split("/")
    curve = sorted((int(s), v) for s, v in scores.items())
    ax.plot([s for s, _ in curve], [v for _, v in curve], marker="o", ms=3, label=f"{label} ({split})",
            color=f"C{labels.index(label)}", ls="-" if split == "test" else ":")
  ax.axhline(args.bar, color="grey", ls="--", lw=1)
  ax.set_xlabel("step")
  ax.set_ylabel("vqa_exact_match")
  ax.set_title("shapes_tiny: encoder from scratch vs from SigLIP (init.parts)")
  ax.grid(alpha=0.3)
  ax.legend()
  fig.tight_layout()
  fig.savefig(_PLOT, dpi=120)
  print(f"wrote {_PLOT} and {_RESULTS}")


if __name__ == "__main__":
  main()

r"""Images at their own resolution and video, measured: the varied-size shapes_sizes data read at a fixed
64 px, natively and tiled; the shapes_video clips read whole and as their middle frame. Equal steps and
batch within each comparison.

  python experiments/resolution.py --runs=fixed,native,anyres --steps=1500    # ~15 / 29 / 50 min, 2 cores
  python experiments/resolution.py --runs=video,middle --steps=3000           # ~21 / 18 min

Each run is the real commands in fresh processes (train, then eval on the test split); one JSON line per
run is printed and appended to experiments/resolution.jsonl: the test scores, per kind, the train-step
programs compiled, the wall time.
"""
import argparse
import json
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from mm_jax.data import shapes_sizes, shapes_video  # pylint: disable=wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RUNS = {"fixed": "shapes_native", "native": "shapes_native", "anyres": "shapes_native",
        "video": "shapes_video", "middle": "shapes_video"}


def run(name: str, steps: int, root: str) -> dict:
  config = f"configs/{RUNS[name]}.py:{name}"
  work, data = os.path.join(root, name), os.path.join(root, "data")
  flags = [f"--config={config}", f"--workdir={work}", f"--config.data.data_dir={data}"]
  t0 = time.time()
  subprocess.run([sys.executable, "-m", "mm_jax.train", *flags, f"--config.total_steps={steps}"],
                 cwd=ROOT, check=True, capture_output=True)
  train_s = time.time() - t0
  out = subprocess.run([sys.executable, "-m", "mm_jax.eval", *flags], cwd=ROOT, check=True,
                       capture_output=True, text=True).stdout
  line = [l for l in out.splitlines() if "vqa_exact_match" in l][-1]
  scores = dict(re.findall(r"(\w+) (\d\.\d+)", line.split("|", 2)[2]))
  last = json.loads(open(os.path.join(work, "metrics.jsonl")).read().splitlines()[-1])
  builder = {"shapes_native": shapes_sizes.ShapesSizes, "shapes_video": shapes_video.ShapesVideo}[RUNS[name]]
  return {"data": f"{builder.name} {builder.VERSION}", "run": name, "config": config, "steps": steps,
          "test": {k: float(v) for k, v in scores.items()},
          "train_programs": last.get("train_programs"), "train_s": round(train_s)}


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--runs", default="fixed,native,anyres,video,middle")
  p.add_argument("--steps", type=int, default=1200)
  p.add_argument("--root", default="/tmp/mm_jax_resolution")
  a = p.parse_args()
  for name in a.runs.split(","):
    result = run(name, a.steps, a.root)
    print(json.dumps(result), flush=True)
    with open(os.path.join(ROOT, "experiments", "resolution.jsonl"), "a") as f:
      f.write(json.dumps(result) + "\n")


if __name__ == "__main__":
  main()

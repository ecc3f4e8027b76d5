r"""Import speed of mm_jax.data.prepare: examples/s for one 64 px PNG per example.

  python experiments/bench_prepare.py [--examples=6000] [--workers=0] [--examples_per_shard=1000]

Writes the input first (LLaVA JSONL, one 64x64 RGB noise PNG per record, about 12 KB: incompressible,
so PIL's verify() reads every byte) into a temp dir, untimed; then times prepare.run (reading the
input, the shards over --workers processes, 0: os.cpu_count(), and the metadata) and prints one JSON
line. The command's own start (~1.5 s of imports) is not in it.
"""
import argparse
import io
import json
import os
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import mm_jax.data.prepare as prepare  # pylint: disable=wrong-import-position


def write_input(root: str, n: int) -> str:
  rng = np.random.default_rng(0)
  os.makedirs(os.path.join(root, "img"))
  distinct = []
  for _ in range(64):
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(buf, format="PNG")
    distinct.append(buf.getvalue())
  path = os.path.join(root, "train.jsonl")
  with open(path, "w") as f:
    for i in range(n):
      with open(os.path.join(root, "img", f"{i}.png"), "wb") as img:
        img.write(distinct[i % len(distinct)])
      f.write(json.dumps({"id": f"ex{i}", "image": f"img/{i}.png", "conversations": [
          {"from": "human", "value": f"<image>\nWhat is in image {i}?"},
          {"from": "gpt", "value": "Coloured noise, 64 by 64 pixels."}]}) + "\n")
  return path


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--examples", type=int, default=6000)
  parser.add_argument("--workers", type=int, default=0)
  parser.add_argument("--examples_per_shard", type=int, default=1000)
  args = parser.parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    path = write_input(tmp, args.examples)
    size = os.path.getsize(os.path.join(tmp, "img", "0.png"))
    opts = prepare.Options(inputs=(("train", path),), out=os.path.join(tmp, "out"),
                           workers=args.workers, examples_per_shard=args.examples_per_shard)
    start = time.perf_counter()
    stats = prepare.run(opts)
    seconds = time.perf_counter() - start
  assert stats["train"]["examples"] == args.examples
  print(json.dumps({"examples": args.examples, "workers": args.workers or os.cpu_count(),
                    "cpu_count": os.cpu_count(), "examples_per_shard": args.examples_per_shard,
                    "png_bytes": size, "seconds": round(seconds, 2),
                    "examples_per_s": round(args.examples / seconds)}))


if __name__ == "__main__":
  main()

r"""Peak host memory of `python -m mm_jax.convert` against the size of the checkpoint it reads, and of
`python -m mm_jax.export` writing it back (--export).

  python experiments/convert_memory.py [--layers=4] [--dtype=float32] [--export]

Writes a random Llama-style HF checkpoint (float32, hidden 2048, vocab 32000, untied head: ~1.25 GB with
4 layers) as two safetensors shards + model.safetensors.index.json in a temp dir, converts it in a
subprocess (one CPU device) and prints one JSON line: checkpoint_bytes, peak_rss_bytes (the child's
ru_maxrss), ratio; with --export also export_peak_rss_bytes and export_ratio: the peak of a separate
export process (measured by a wrapper process around it) over the same checkpoint size, and whether
the exported files hold bitwise the same tensors (exported_equal). Everything it wrote is deleted
afterwards.
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

import torch
import transformers
from safetensors.torch import save_file

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_checkpoint(path: str, layers: int) -> int:
  """A random LlamaForCausalLM checkpoint, written shard by shard (never the whole model in memory)."""
  config = transformers.LlamaConfig(vocab_size=32000, hidden_size=2048, intermediate_size=5632,
                                    num_hidden_layers=layers, num_attention_heads=16,
                                    num_key_value_heads=4, tie_word_embeddings=False)
  config.architectures = ["LlamaForCausalLM"]
  config.save_pretrained(path)
  d, f, kv = 2048, 5632, 4 * 128
  shapes = {"model.embed_tokens.weight": (32000, d), "model.norm.weight": (d,), "lm_head.weight": (32000, d)}
  for i in range(layers):
    p = f"model.layers.{i}."
    shapes.update({p + "self_attn.q_proj.weight": (d, d), p + "self_attn.k_proj.weight": (kv, d),
                   p + "self_attn.v_proj.weight": (kv, d), p + "self_attn.o_proj.weight": (d, d),
                   p + "mlp.gate_proj.weight": (f, d), p + "mlp.up_proj.weight": (f, d),
                   p + "mlp.down_proj.weight": (d, f), p + "input_layernorm.weight": (d,),
                   p + "post_attention_layernorm.weight": (d,)})
  names = sorted(shapes)
  weight_map = {}
  for i, part in enumerate((names[:len(names) // 2], names[len(names) // 2:])):
    file = f"model-0000{i + 1}-of-00002.safetensors"
    save_file({n: torch.randn(shapes[n]) * 0.02 for n in part}, os.path.join(path, file),
              metadata={"format": "pt"})
    weight_map.update({n: file for n in part})
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
    json.dump({"weight_map": weight_map}, fh)
  return sum(os.path.getsize(os.path.join(path, f)) for f in set(weight_map.values()))


def main() -> None:
  parser = argparse.ArgumentParser()
  parser.add_argument("--layers", type=int, default=4)
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--export", action="store_true")
  args = parser.parse_args()
  tmp = tempfile.mkdtemp(prefix="convert_memory_", dir="/tmp")
  try:
    hf_dir, out = os.path.join(tmp, "hf"), os.path.join(tmp, "out")
    size = write_checkpoint(hf_dir, args.layers)
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as a user runs it
    start = time.time()
    r = subprocess.run([sys.executable, "-m", "mm_jax.convert", f"--hf_dir={hf_dir}", f"--out={out}",
                        f"--dtype={args.dtype}"], cwd=REPO, env=env, capture_output=True, text=True)
    seconds = time.time() - start
    if r.returncode:
      sys.exit(r.stderr[-3000:])
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux
    result = {"checkpoint_bytes": size, "peak_rss_bytes": peak, "ratio": round(peak / size, 3),
              "dtype": args.dtype, "convert_seconds": round(seconds, 1)}
    if args.export:
      result.update(_export(out, os.path.join(tmp, "exported"), env, size))
    print(json.dumps(result))
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


_WRAPPER = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024); sys.exit(r.returncode)")


def _export(out: str, exported: str, env: dict, size: int) -> dict:
  """Exports `out` in a grandchild whose peak RSS its parent (the wrapper) reports."""
  start = time.time()
  r = subprocess.run([sys.executable, "-c", _WRAPPER, sys.executable, "-m", "mm_jax.export",
                      f"--workdir={out}", f"--out={exported}"], cwd=REPO, env=env, capture_output=True,
                     text=True)
  if r.returncode:
    sys.exit(r.stderr[-3000:])
  peak = int(r.stdout.strip().splitlines()[-1])
  written = sum(os.path.getsize(os.path.join(exported, f)) for f in os.listdir(exported)
                if f.endswith(".safetensors"))
  return {"export_peak_rss_bytes": peak, "export_ratio": round(peak / size, 3),
          "exported_bytes": written, "export_seconds": round(time.time() - start, 1),
          "exported_equal": _same_tensors(os.path.join(os.path.dirname(out), "hf"), exported)}


def _same_tensors(a: str, b: str) -> bool:
  """Whether two safetensors directories hold the same names and bitwise the same tensors."""
  from safetensors import safe_open  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top

  def index(d):
    out = {}
    for f in sorted(os.listdir(d)):
      if f.endswith(".safetensors"):
        with safe_open(os.path.join(d, f), framework="numpy") as h:
          out.update({n: os.path.join(d, f) for n in h.keys()})
    return out
  ia, ib = index(a), index(b)
  if set(ia) != set(ib):
    return False
  for n in ia:
    with safe_open(ia[n], framework="numpy") as x, safe_open(ib[n], framework="numpy") as y:
      if not np.array_equal(x.get_tensor(n), y.get_tensor(n)):
        return False
  return True


if __name__ == "__main__":
  main()

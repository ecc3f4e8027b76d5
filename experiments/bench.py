r"""Every speed benchmark, one after another, each in its own process.

  python experiments/bench.py                      # all of them
  python experiments/bench.py --only=stages,decode # some of them (names below)

Runs, in turn: bench_hf.py (mm_jax vs transformers), bench_stages.py (frozen stages), bench_decode.py
(KV cache), bench_input.py (input pipeline) and gpu_mfu.py (MFU; only where jax sees a GPU, with
experiments/gpu_env.sh sourced there). A script that does not exist, or gpu_mfu without a GPU, gets a
note line instead ({"bench": NAME, "skipped": why}). Each child's JSON lines are forwarded to stdout as
they come (and each appends them to its own experiments/<name>.jsonl); other output goes to stderr.
Last, one line {"bench": "all", "results": {NAME: "ok" | "failed (exit N)" | "skipped"}, "seconds"}.
Exits 1 if a benchmark failed (a non-zero exit), 0 otherwise (a missed target is not a failure: it is
in the benchmark's summary line, "ok": false).

Takes about 8.5 minutes on the shared 2-core CPU (measured: bench_hf 254 s, bench_stages 182 s with
configs/bench_paligemma.py, bench_decode 34 s, bench_input 28 s).
"""
import argparse
import json
import pathlib
import subprocess
import sys
import time

HERE = pathlib.Path(__file__).resolve().parent
BENCHMARKS = (  # name, script, needs a GPU
    ("hf", "bench_hf.py", False),
    ("stages", "bench_stages.py", False),
    ("decode", "bench_decode.py", False),
    ("input", "bench_input.py", False),
    ("gpu_mfu", "gpu_mfu.py", True),
)


def backend() -> str:
  """jax's default backend, asked in a child (the parent never takes the accelerator's memory)."""
  out = subprocess.run([sys.executable, "-c", "import jax; print(jax.default_backend())"],
                       capture_output=True, text=True, check=False)
  return out.stdout.strip().splitlines()[-1] if out.returncode == 0 and out.stdout.strip() else "unknown"


def run(name: str, script: pathlib.Path) -> int:
  """Runs the script, forwarding its JSON lines to stdout and the rest to stderr; its exit status."""
  proc = subprocess.Popen([sys.executable, str(script)], cwd=HERE.parent, stdout=subprocess.PIPE,
                          text=True, bufsize=1)
  for line in proc.stdout:
    try:
      json.loads(line)
      print(line, end="", flush=True)
    except ValueError:
      print(f"[{name}] {line}", end="", file=sys.stderr, flush=True)
  return proc.wait()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--only", default="", help="comma-separated names: "
                      + ",".join(name for name, _, _ in BENCHMARKS))
  args = parser.parse_args(argv)
  only = set(filter(None, args.only.split(",")))
  unknown = only - {name for name, _, _ in BENCHMARKS}
  if unknown:
    parser.error(f"unknown benchmark(s) {sorted(unknown)}")
  start, results, gpu = time.perf_counter(), {}, None
  for name, script, needs_gpu in BENCHMARKS:
    if only and name not in only:
      continue
    path, skipped = HERE / script, None
    if not path.exists():
      skipped = f"experiments/{script} does not exist"
    elif needs_gpu:
      gpu = backend() if gpu is None else gpu
      if gpu != "gpu":
        skipped = f"no GPU (jax backend {gpu})"
    if skipped:
      print(json.dumps({"bench": name, "skipped": skipped}), flush=True)
      results[name] = "skipped"
      continue
    t0 = time.perf_counter()
    rc = run(name, path)
    results[name] = "ok" if rc == 0 else f"failed (exit {rc})"
    print(f"[bench] {script}: {results[name]} in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
          flush=True)
  print(json.dumps({"bench": "all", "results": results,
                    "seconds": round(time.perf_counter() - start, 1)}), flush=True)
  return 1 if any(r.startswith("failed") for r in results.values()) else 0


if __name__ == "__main__":
  sys.exit(main())

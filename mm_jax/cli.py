"""What every entry point shares: flag parsing whose errors are one line, quiet logs, multi-host init,
and UserError -> one line on stderr and exit code 1 (nothing is written before inputs are checked)."""
import ctypes
import importlib.util
import os
import pkgutil
import re
import sys
from typing import Callable

from absl import app, flags, logging

from mm_jax.train import sharding
from mm_jax.errors import UserError
from mm_jax.checkpoint.integrity import SaveFailed


def one_line(e: BaseException) -> str:
  """The message on one line; of an embedded traceback only its last line (the error itself)."""
  msg = str(e).replace("\\n", "\n").replace("\\'", "'")
  if "Traceback (most recent call last)" in msg:
    head, tail = msg.split("Traceback (most recent call last)", 1)
    msg = head + tail.strip().splitlines()[-1]
  return " ".join(msg.split())


def _config_load_error(prog: str, argv: list[str], raised: BaseException | None = None) -> None:
  """Exits with one line if --config's file failed to load (ml_collections defers that error to the
  first attribute access, e.g. while applying a --config.x=y override)."""
  value = flags.FLAGS["config"].value if "config" in flags.FLAGS else None
  if type(value).__name__ == "_ErrorConfig":
    error = object.__getattribute__(value, "_error")
    error = error.__cause__ or error
  elif raised is not None and "failure to load" in str(raised):
    error = raised
  else:
    return
  path = ([a.split("=", 1)[1] for a in argv[1:] if a.startswith("--config=")] or ["?"])[-1]
  cause = "no such file" if not os.path.exists(path.split(":")[0]) else one_line(error)
  sys.exit(f"{prog}: error: --config={path}: the config file cannot be loaded ({cause[:200]}); "
           "give a path like configs/shapes_tiny.py[:variant]")


def _parse_flags(prog: str, argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"{prog}: error: {one_line(e)}")
  except (ImportError, SyntaxError, NameError) as e:  # raised by the config file itself
    sys.exit(f"{prog}: error: the config file cannot be loaded ({type(e).__name__}: {one_line(e)}); "
             "fix it, or give another --config")
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    _config_load_error(prog, argv, e)
    # A --config.a.b=v override that names no field or has a value of the wrong type (ml_collections
    # raises these while applying overrides during parsing).
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    detail = one_line(e).replace("'", "")
    key = re.sub(r"\W", "", detail.split()[0])
    named = [o for o in overrides if o.rsplit(".", 1)[-1] == key] or overrides
    sys.exit(f"{prog}: error: {', '.join(named)} names no field of the config ({detail}); "
             "the config file lists its fields")
  _config_load_error(prog, argv)
  return rest


def _accelerator_plugin() -> bool:
  """Whether jax may run on a TPU or GPU here (libtpu or a CUDA/ROCm plugin installed, or
  JAX_PLATFORMS naming one), judged without starting jax's backends."""
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if platforms:
    return platforms.split(",")[0] != "cpu"
  return importlib.util.find_spec("libtpu") is not None or any(
      m.name.startswith(("jax_cuda", "jax_rocm")) for m in pkgutil.iter_modules())


def keep_freed_memory() -> bool:
  """On a CPU-only host, glibc malloc keeps freed memory for reuse (one arena, no mmap, no trim).

  XLA:CPU allocates a step's temporaries (1.8 GB at configs/bench_paligemma.py) afresh every step; by
  default glibc maps and unmaps them, so each step page-faults them all in again (435 k faults, ~0.4 s
  of kernel time in a ~2.2 s step). Resident memory then stays at its peak. It must precede the start
  of jax's backend (threads that already hold an arena keep it). Not done where an accelerator may
  run (the step's memory is the device's there, and the host's stays as glibc manages it) nor for
  one-shot commands (mm_jax.convert); False where it is not done or the C library is not glibc."""
  if _accelerator_plugin():
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
  except OSError:
    return False
  m_trim_threshold, m_mmap_max, m_arena_max = -1, -4, -8  # malloc.h
  return all(libc.mallopt(opt, value) == 1 for opt, value in
             ((m_arena_max, 1), (m_mmap_max, 0), (m_trim_threshold, 2 ** 31 - 1)))


def run(prog: str, main: Callable[[], None], steps: bool = False) -> None:
  """Runs `main()` as program `prog` (e.g. 'mm_jax.train') under absl. steps: it runs a jitted
  step many times (train, eval, sweep, recipe): keep_freed_memory() first."""
  if steps:
    keep_freed_memory()

  def _main(argv):
    if len(argv) > 1:
      sys.exit(f"{prog}: error: unexpected arguments {argv[1:]}")
    if not flags.FLAGS["verbosity"].present:  # orbax and tfds log every detail at INFO
      logging.set_verbosity(logging.WARNING)
    try:
      sharding.maybe_initialize_distributed()  # MM_JAX_* environment (sharding's docstring)
      main()
    except SaveFailed as e:
      # orbax's other writes of the failed save go on failing in background threads, which print
      # tracebacks until the process ends: those threads are silenced (stderr to /dev/null) and the
      # process ends at once, so the error is the last line. Nothing is left to write: the lock and the
      # checkpoint manager were released as the run unwound.
      sys.stdout.flush()
      sys.stderr.flush()
      stderr = os.dup(2)
      os.dup2(os.open(os.devnull, os.O_WRONLY), 2)
      os.write(stderr, f"\n{prog}: error: {e}\n".encode())  # on a line of its own
      os._exit(1)  # pylint: disable=protected-access
    except UserError as e:
      sys.exit(f"{prog}: error: {e}")

  app.run(_main, flags_parser=lambda argv: _parse_flags(prog, argv))

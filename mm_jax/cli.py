"""What every entry point shares: flag parsing whose errors are one line, quiet logs, multi-host init,
and UserError -> one line on stderr and exit code 1 (nothing is written before inputs are checked)."""
import os
import re
import sys
from typing import Callable

from absl import app, flags, logging

from mm_jax import sharding
from mm_jax.errors import UserError
from mm_jax.integrity import SaveFailed


def _one_line(e: BaseException) -> str:
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
  cause = "no such file" if not os.path.exists(path.split(":")[0]) else _one_line(error)
  sys.exit(f"{prog}: error: --config={path}: the config file cannot be loaded ({cause[:200]}); "
           "give a path like configs/shapes_tiny.py[:variant]")


def _parse_flags(prog: str, argv: list[str]) -> list[str]:
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"{prog}: error: {_one_line(e)}")
  except (ImportError, SyntaxError, NameError) as e:  # raised by the config file itself
    sys.exit(f"{prog}: error: the config file cannot be loaded ({type(e).__name__}: {_one_line(e)}); "
             "fix it, or give another --config")
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    _config_load_error(prog, argv, e)
    # A --config.a.b=v override that names no field or has a value of the wrong type (ml_collections
    # raises these while applying overrides during parsing).
    overrides = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    detail = _one_line(e).replace("'", "")
    key = re.sub(r"\W", "", detail.split()[0])
    named = [o for o in overrides if o.rsplit(".", 1)[-1] == key] or overrides
    sys.exit(f"{prog}: error: {', '.join(named)} names no field of the config ({detail}); "
             "the config file lists its fields")
  _config_load_error(prog, argv)
  return rest


def run(prog: str, main: Callable[[], None]) -> None:
  """Runs `main()` as program `prog` (e.g. 'mm_jax.train') under absl."""

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

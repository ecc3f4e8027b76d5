"""What makes a checkpoint trustworthy and a workdir one trainer's: step manifests and the workdir lock.

Manifest: <step>/manifest.json lists every file of a checkpoint with its size and crc32 (sizes only when
checksums are off) and whether the checkpoint is temporary. mm_jax.checkpoint writes it from orbax's
post-finalization callback: on process 0, after every process has written its files and before orbax
commits the step (renames <step>.orbax-checkpoint-tmp, or writes commit_success.txt where renames are
not atomic). So a committed step always has its manifest, and a step whose files no longer match it was
damaged after the commit (files removed, truncated or altered).

Lock: WorkdirLock, an flock on <workdir>/.lock. The kernel drops it when its process dies (kill -9
included), so a killed run never blocks its own resume.
"""
import fcntl
import json
import os
import re
import socket
import time
import zlib

import jax
from etils import epath
from jax.experimental import multihost_utils

from mm_jax.errors import UserError

MANIFEST = "manifest.json"
# Written by orbax after the manifest (the commit time, the commit marker), so not listed in it.
_UNLISTED = (MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt")


def _files(root: epath.Path) -> dict[str, epath.Path]:
  """relative path -> path of every file under root."""
  return {str((d / n).relative_to(root)): d / n for d, _, names in root.walk() for n in names}


def _crc32(path: epath.Path) -> int:
  crc = 0
  with path.open("rb") as f:
    while chunk := f.read(1 << 22):
      crc = zlib.crc32(chunk, crc)
  return crc


def write_manifest(step_dir: epath.Path, *, temporary: bool = False, checksums: bool = True) -> None:
  files = {rel: [p.stat().length, _crc32(p) if checksums else None]
           for rel, p in sorted(_files(step_dir).items()) if rel not in _UNLISTED}
  (step_dir / MANIFEST).write_text(json.dumps({"temporary": temporary, "files": files}, indent=1))


def read_manifest(step_dir: epath.Path) -> dict | None:
  try:
    manifest = json.loads((step_dir / MANIFEST).read_text())
  except (FileNotFoundError, ValueError):
    return None
  return manifest if isinstance(manifest, dict) and isinstance(manifest.get("files"), dict) else None


def manifest_problem(step_dir: epath.Path) -> str | None:
  """Why the files of step_dir do not match its manifest (None: they all do)."""
  if not (step_dir / MANIFEST).exists():
    return f"{MANIFEST} is missing"
  manifest = read_manifest(step_dir)
  if manifest is None:
    return f"{MANIFEST} is unreadable"
  for rel, (size, crc) in manifest["files"].items():
    path = step_dir / rel
    if not path.exists():
      return f"{rel} is missing"
    actual = path.stat().length
    if actual != size:
      return f"{rel} is {actual} bytes, {size} when saved"
    if crc is not None and _crc32(path) != crc:
      return f"{rel} differs from what was saved (crc32)"
  return None


class SaveFailed(UserError):
  """A save did not commit (disk full, permissions, storage errors); earlier checkpoints are intact."""


def short_error(e: BaseException) -> str:
  """An orbax / tensorstore error on one short line (their messages embed whole tensorstore specs)."""
  msg = " ".join(str(e).split()).split(" [tensorstore_spec=")[0] or type(e).__name__
  # tensorstore puts the OS's reason last, after long paths: brought to the front so it survives the cut
  os_error = re.search(r":\s*([^:\[]+?)\s*\[os_error_code='?(\d+)", msg)
  if os_error and not msg.startswith("[Errno"):
    msg = f"[Errno {os_error.group(2)}] {os_error.group(1)}: {msg}"
  return msg if len(msg) <= 300 else msg[:300] + "..."


class WorkdirLock:
  """One trainer per workdir: an exclusive, non-blocking flock on <workdir>/.lock.

  acquire(create=False) takes it only if the file exists and writes nothing (so a run refused for bad
  input leaves the workdir as it was); acquire(create=True) creates it if need be and writes the holder
  (pid, host, time) into it, which a refused trainer quotes. Multi-host: process 0 holds it for the
  whole job and every process raises together. Remote workdirs (gs://...) have no flock: not locked.
  """

  def __init__(self, workdir: epath.Path):
    self.workdir = workdir
    self.path = workdir / ".lock"
    self._fd = None
    self._named = False
    self._local = "://" not in str(workdir)

  def acquire(self, create: bool) -> None:
    holder = None
    if self._fd is None and self._local and jax.process_index() == 0 and (create or self.path.exists()):
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd = fd
      except OSError:  # EWOULDBLOCK: held by another open file (process, or this one's other run)
        holder = os.pread(fd, 300, 0).decode(errors="replace").strip() or "another process"
        os.close(fd)
    refused = holder is not None
    if jax.process_count() > 1:
      refused = bool(multihost_utils.broadcast_one_to_all(int(refused)))
    if refused:
      raise UserError(f"another trainer is running in {self.workdir} ({holder or 'process 0 says who'}"
                      f" holds {self.path}); wait for it to end or stop it, or use another --workdir")
    if create and self._fd is not None and not self._named:
      os.ftruncate(self._fd, 0)
      os.pwrite(self._fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                          f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
      self._named = True

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None

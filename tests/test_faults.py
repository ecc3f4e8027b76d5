"""Fault injection on the command line: kill -9 and SIGTERM at random moments, damaged checkpoints, a full
disk and a second trainer. Every interrupted run, resumed by the same command, must end with params
bitwise equal to an uninterrupted run's, and no run may restore a checkpoint that did not finish.

Seeded: the moments are the same on every run. MM_JAX_STRESS=1 runs the long variant (10 kills, 6
SIGTERMs; ~4 min more on 2 cores); the default (4 kills, 2 SIGTERMs) keeps the suite's budget.
Launches share a jax compilation cache that the uninterrupted run fills, so each costs ~8 s instead of
~20 (an entry a kill cuts short is only a warning and a recompile for jax).
"""
import os
import pathlib
import random
import re
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from conftest import REPO, command_env, make_run
from mm_jax.checkpoint import Checkpoints
from mm_jax.checkpoint.integrity import MANIFEST, WorkdirLock

pytestmark = pytest.mark.slow  # end to end through the commands

STRESS = os.environ.get("MM_JAX_STRESS") == "1"
KILLS, TERMS = (10, 6) if STRESS else (4, 2)
STEPS = 60
OVERRIDES = [f"--config.total_steps={STEPS}", "--config.checkpoint_every=4",
             "--config.keep_checkpoints=3", "--config.log_every=1"]
TMP = ".orbax-checkpoint-tmp"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = tmp_path_factory.mktemp("jax_cache")
  return command_env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                     JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _cmd(workdir, data_dir, *extra):
  return [sys.executable, "-m", "mm_jax.train", f"--config={REPO}/configs/shapes_tiny.py:test",
          f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *OVERRIDES, *extra]


def _run(cmd, env, timeout=300):
  return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _params(workdir, config, vocab_size):
  mm, _ = make_run(config, jax.devices()[:1], vocab_size)
  ckpt = Checkpoints(workdir, read_only=True)
  params = jax.tree.map(np.asarray, ckpt.restore_params(STEPS, mm.abstract_params))
  ckpt.close()
  return params


def _committed(ck: pathlib.Path) -> list[int]:
  """Step directories orbax has committed (its temporary ones end in .orbax-checkpoint-tmp)."""
  return sorted(int(p.name) for p in ck.iterdir() if p.name.isdigit()) if ck.is_dir() else []


@pytest.fixture(scope="module")
def reference(test_config, tokenizer, env, tmp_path_factory):
  """(workdir, final params) of the uninterrupted run."""
  workdir = tmp_path_factory.mktemp("straight")
  r = _run(_cmd(workdir, test_config.data.data_dir), env)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir, _params(workdir, test_config, tokenizer.vocab_size)


class _Launch:
  """One `mm_jax.train` process, its output in a file."""

  def __init__(self, cmd, env, log: pathlib.Path):
    self.log = log
    with open(log, "w") as f:
      self.proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT)

  def text(self) -> str:
    return self.log.read_text()

  def wait_until(self, cond, timeout=180.0, poll=0.01) -> bool:
    """Polls cond() until true or the process ends; True if cond() held while it ran."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and self.proc.poll() is None:
      if cond():
        return True
      time.sleep(poll)
    return False

  def stepping(self) -> bool:
    return re.search(r"^step \d+/", self.text(), re.M) is not None


def _resumed_from(out: str):
  m = re.search(r"Resuming from the checkpoint at step (\d+)\.", out)
  return int(m.group(1)) if m else None


def _finish(cmd, env, ck, reference, test_config, tokenizer, workdir):
  """The last launch: runs to the end from the newest committed step; params bitwise the reference's."""
  newest = _committed(ck)[-1]
  r = _run(cmd, env)
  assert r.returncode == 0, r.stderr[-3000:]
  assert _resumed_from(r.stdout) == newest and "Skipped" not in r.stdout
  jax.tree.map(np.testing.assert_array_equal, reference[1], _params(workdir, test_config,
                                                                    tokenizer.vocab_size))


def _newer_commit(ck, before):
  return lambda: any(int(s) > max(before, default=0) for s in _committed(ck))


def test_kill_9_at_random_moments_resumes_bitwise(reference, test_config, tokenizer, env, tmp_path):
  """Kills cycle through three kinds of moment: during a checkpoint write (as soon as a new step's tmp
  dir appears, after one new checkpoint has committed), at a random time after that commit, and at a
  random time from the launch (startup, restore, compile, first steps)."""
  rng = random.Random(9)
  workdir = tmp_path / "killed"
  ck = workdir / "checkpoints"
  cmd = _cmd(workdir, test_config.data.data_dir)
  mid_write, kills = 0, []
  for i in range(KILLS):
    mode = ("write", "random", "startup")[i % 3]
    before = _committed(ck)
    launch = _Launch(cmd, env, tmp_path / f"launch_{i}.log")
    if mode == "startup":
      time.sleep(rng.uniform(0.5, 8.0))
    else:
      assert launch.wait_until(_newer_commit(ck, before)), launch.text()[-3000:]
      if mode == "write":
        done = set(_committed(ck))
        writing = lambda: any(p.name.endswith(TMP) and int(p.name.split(".")[0]) not in done
                              for p in ck.iterdir())
        assert launch.wait_until(writing, poll=0.002), launch.text()[-3000:]
      else:
        time.sleep(rng.uniform(0.0, 1.0))
    os.kill(launch.proc.pid, signal.SIGKILL)
    launch.proc.wait()
    writing = sorted(p.name for p in ck.iterdir() if p.name.endswith(TMP)) if ck.is_dir() else []
    mid_write += mode == "write" and bool(writing)
    out = launch.text()
    assert launch.proc.returncode == -signal.SIGKILL, f"launch {i} ended before the kill:\n{out[-2000:]}"
    # Resumed from the newest committed step at launch (from scratch if none): never from a save that
    # had not finished; and no committed checkpoint was ever found damaged.
    steps = [int(x) for x in re.findall(r"^step (\d+)/", out, re.M)]
    if steps or _resumed_from(out) is not None:
      assert _resumed_from(out) == (before[-1] if before else None), out[-2000:]
    assert "Skipped" not in out
    kills.append((mode, _resumed_from(out), steps[-1] if steps else None, writing))
  print("kills (moment, resumed from, last logged step, being written at the kill):", kills)
  assert mid_write >= sum(k[0] == "write" for k in kills) - 1, kills  # one may lose the race to the commit
  _finish(cmd, env, ck, reference, test_config, tokenizer, workdir)


def test_sigterm_at_random_moments_saves_exits_0_and_resumes_bitwise(
    reference, test_config, tokenizer, env, tmp_path):
  rng = random.Random(15)
  workdir = tmp_path / "terminated"
  ck = workdir / "checkpoints"
  cmd = _cmd(workdir, test_config.data.data_dir)
  seconds = []
  for i in range(TERMS):
    before = _committed(ck)
    launch = _Launch(cmd, env, tmp_path / f"launch_{i}.log")
    assert launch.wait_until(_newer_commit(ck, before)), launch.text()[-3000:]
    time.sleep(rng.uniform(0.0, 1.0))
    t0 = time.monotonic()
    os.kill(launch.proc.pid, signal.SIGTERM)
    launch.proc.wait(timeout=120)
    seconds.append(round(time.monotonic() - t0, 2))
    out = launch.text()
    assert launch.proc.returncode == 0, out[-3000:]
    assert _resumed_from(out) == (before[-1] if before else None), out[-2000:]
    if "Preempted" not in out and f"step {STEPS}/{STEPS}" in out:
      break  # the signal came after the last step: a normal end
    m = re.search(r"^Preempted \(SIGTERM\) at step (\d+): saved a checkpoint; run the same command to "
                  r"resume\.$", out, re.M)
    assert m, out[-2000:]
    step = int(m.group(1))
    assert int(re.findall(r"^step (\d+)/", out, re.M)[-1]) <= step  # stopped after the current step
    assert _committed(ck)[-1] == step and (ck / str(step) / MANIFEST).exists()
  print("SIGTERM to exit, s:", seconds)
  # One step (~0.2 s) plus the save (~1 s; the first save of a process sets orbax up, ~3 s) and one
  # save in flight; generous for a loaded 2-core machine.
  assert max(seconds) < 20, seconds
  _finish(cmd, env, ck, reference, test_config, tokenizer, workdir)


def test_damaged_newest_checkpoints_are_skipped_and_resume_is_bitwise(
    reference, test_config, tokenizer, env, tmp_path):
  workdir = tmp_path / "damaged"
  shutil.copytree(reference[0], workdir)
  ck = workdir / "checkpoints"
  assert _committed(ck) == [52, 56, 60]
  largest = max((p for p in (ck / "60" / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  with open(largest, "r+b") as f:
    f.truncate(largest.stat().st_size // 2)
  (ck / "56" / "data" / "process_0-of-1.json").unlink()
  r = _run(_cmd(workdir, test_config.data.data_dir), env)
  assert r.returncode == 0, r.stderr[-3000:]
  rel = largest.relative_to(ck / "60")
  assert re.search(rf"^Skipped the checkpoint at step 60: {re.escape(str(rel))} is \d+ bytes, \d+ when "
                   r"saved; moved it to .*damaged\.$", r.stdout, re.M), r.stdout[-2000:]
  assert re.search(r"^Skipped the checkpoint at step 56: data/process_0-of-1.json is missing; moved",
                   r.stdout, re.M), r.stdout[-2000:]
  assert _resumed_from(r.stdout) == 52
  assert sorted(p.name.split("-")[0] for p in (ck / "damaged").iterdir()) == ["56", "60"]
  jax.tree.map(np.testing.assert_array_equal, reference[1], _params(workdir, test_config,
                                                                    tokenizer.vocab_size))


def _snapshot(root: pathlib.Path) -> dict:
  import hashlib  # pylint: disable=g-import-not-at-top
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_second_trainer_is_refused_and_writes_nothing(reference, test_config, env, tmp_path):
  workdir = tmp_path / "busy"
  shutil.copytree(reference[0], workdir)
  lock = WorkdirLock(workdir)  # this process is the first trainer
  lock.acquire(create=True)
  try:
    before = _snapshot(workdir)
    r = _run(_cmd(workdir, test_config.data.data_dir), env)
  finally:
    lock.release()
  assert r.returncode == 1
  last = r.stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf"mm_jax.train: error: another trainer is running in {workdir} \(pid {os.getpid()} "
                      rf"on \S+ since [\d: -]+ holds {workdir}/.lock\); wait for it to end or stop it, or "
                      r"use another --workdir", last), last
  assert "Traceback" not in r.stderr
  assert _snapshot(workdir) == before


def _tmpfs_works(where: pathlib.Path) -> str | None:
  """None if `unshare -rm` can mount a tmpfs here (a user namespace: root not needed), else why not."""
  if not shutil.which("unshare"):
    return "no unshare command"
  r = subprocess.run(["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=64k tmpfs {where}"],
                     capture_output=True, text=True, check=False)
  return None if r.returncode == 0 else f"unshare -rm cannot mount a tmpfs: {r.stderr.strip()}"


FILL_AFTER_FIRST_CHECKPOINT = r"""
mount -t tmpfs -o size=8m tmpfs "$CK" || exit 90
"$@" > "$OUT/stdout" 2> "$OUT/stderr" &
pid=$!
while [ ! -d "$CK/4" ] && kill -0 $pid 2>/dev/null; do sleep 0.01; done
head -c 100000000 /dev/zero > "$CK/.fill" 2>/dev/null
wait $pid
rc=$?
rm -f "$CK/.fill"
cp -a "$CK" "$OUT/checkpoints"
exit $rc
"""


def test_disk_full_during_a_save_is_one_line_and_the_previous_checkpoint_survives(
    reference, test_config, tokenizer, env, tmp_path):
  """The workdir's checkpoints/ is a small tmpfs (in a user and mount namespace), filled up once step 4
  has committed: the save of step 8 fails."""
  workdir, out = tmp_path / "full", tmp_path / "out"
  (workdir / "checkpoints").mkdir(parents=True)
  out.mkdir()
  why = _tmpfs_works(workdir / "checkpoints")
  if why:
    pytest.skip(why)
  r = subprocess.run(["unshare", "-rm", "sh", "-c", FILL_AFTER_FIRST_CHECKPOINT, "sh",
                      *_cmd(workdir, test_config.data.data_dir)], cwd=REPO, capture_output=True, text=True,
                     timeout=300, env=dict(env, CK=str(workdir / "checkpoints"), OUT=str(out)))
  stderr = (out / "stderr").read_text()
  assert r.returncode == 1, stderr[-3000:]
  last = stderr.strip().splitlines()[-1]
  assert re.fullmatch(rf"mm_jax.train: error: saving the checkpoint at step 8 to {workdir}/checkpoints "
                      r"failed: .*No space left on device.*; the checkpoint at step 4 is intact and the "
                      r"same command resumes from it once the cause \(e\.g\. a full disk\) is fixed", last), last
  saved = Checkpoints(out, read_only=True)  # what the tmpfs held
  assert saved.all_steps() == [4] and saved.newest_good() == (4, [])
  mm, _ = make_run(test_config, jax.devices()[:1], tokenizer.vocab_size)
  saved.restore_params(4, mm.abstract_params)
  saved.close()


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, data_dir, env, tmp_path, name):
  """mm_jax.train as 2 processes of 2 CPU devices each over loopback (tests/test_multihost.py's way)."""
  env = command_env(None, env)
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", MM_JAX_COORDINATOR=f"127.0.0.1:{_free_port()}",
             MM_JAX_NUM_PROCESSES="2", MM_JAX_INIT_TIMEOUT="60")
  return [_Launch(_cmd(workdir, data_dir), dict(env, MM_JAX_PROCESS_ID=str(i)), tmp_path / f"{name}_{i}.log")
          for i in range(2)]


@pytest.mark.skipif(not STRESS, reason="2 x 3 processes, ~2 min: MM_JAX_STRESS=1")
def test_sigterm_to_one_of_two_processes_stops_both_at_one_step(test_config, tokenizer, env, tmp_path):
  """jax's preemption sync point: the process that got SIGTERM and the one that did not save the same
  step and exit 0; two processes resume it to the params of an uninterrupted 2-process run."""
  data_dir = test_config.data.data_dir
  straight, workdir = tmp_path / "straight", tmp_path / "preempted"
  runs = _two_processes(straight, data_dir, env, tmp_path, "straight")
  runs += _two_processes(workdir, data_dir, env, tmp_path, "preempted")
  assert runs[2].wait_until(_newer_commit(workdir / "checkpoints", [])), runs[2].text()[-3000:]
  time.sleep(random.Random(2).uniform(0.0, 1.0))
  os.kill(runs[3].proc.pid, signal.SIGTERM)  # process 1 only
  for run in runs:
    run.proc.wait(timeout=300)
    assert run.proc.returncode == 0, run.text()[-3000:]
  m = re.search(r"^Preempted \(SIGTERM\) at step (\d+): saved a checkpoint", runs[2].text(), re.M)
  assert m, runs[2].text()[-2000:]
  step = int(m.group(1))
  assert _committed(workdir / "checkpoints")[-1] == step < STEPS
  resumed = _two_processes(workdir, data_dir, env, tmp_path, "resumed")
  for run in resumed:
    run.proc.wait(timeout=300)
    assert run.proc.returncode == 0 and _resumed_from(run.text()) == step, run.text()[-3000:]
  jax.tree.map(np.testing.assert_array_equal, _params(straight, test_config, tokenizer.vocab_size),
               _params(workdir, test_config, tokenizer.vocab_size))

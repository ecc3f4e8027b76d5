"""Preemption and checkpoint retention, in-process: SIGTERM saves the current step and raises Preempted
(exit code 0), releasing the lock and the handler, and train() resumes to the uninterrupted params; on
several processes jax's preemption sync point decides; time-based temporary checkpoints alongside
permanent ones, only the newest temporary kept. (tests/test_faults.py sends real signals to real runs.)"""
import copy
import os
import signal

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import pytest

from conftest import make_run
from mm_jax.train import loop as train_lib
from mm_jax.checkpoint import Checkpoints
from mm_jax.data import pipeline
from mm_jax.config import files
from mm_jax.errors import UserError
from mm_jax.checkpoint.integrity import WorkdirLock, read_manifest

pytestmark = pytest.mark.slow  # end to end through the commands


def _config(test_config, **fields):
  config = copy.deepcopy(test_config)
  config.update(dict(total_steps=8, checkpoint_every=4, log_every=1, keep_checkpoints=2), **fields)
  return config


def _params(workdir, config, vocab_size, step):
  mm, _ = make_run(config, jax.devices()[:1], vocab_size)
  ckpt = Checkpoints(workdir, read_only=True)
  params = jax.tree.map(np.asarray, ckpt.restore_params(step, mm.abstract_params))
  ckpt.close()
  return params


def _temporary(workdir, step) -> bool:
  return read_manifest(workdir / "checkpoints" / str(step))["temporary"]


@pytest.fixture(scope="module")
def with_temporaries(test_config, tmp_path_factory):
  """(workdir, config, [(step, temporary) kept after each save]) of a run whose checkpoint_minutes is
  tiny: a temporary checkpoint at every step that is not a permanent one. Also the uninterrupted run
  the preempted one is compared with (the checkpoint fields change no number)."""
  workdir = tmp_path_factory.mktemp("temporaries")
  config = _config(test_config, checkpoint_every=2, keep_checkpoints=1, keep_every=4,
                   checkpoint_minutes=1e-9)
  seen = []
  prune = Checkpoints.prune

  def recording_prune(self):
    prune(self)
    seen.append([(s, _temporary(workdir, s)) for s in self.all_steps()])
  with pytest.MonkeyPatch.context() as m:
    m.setattr(Checkpoints, "prune", recording_prune)
    train_lib.train(config, str(workdir))
  return workdir, config, seen


def test_time_based_temporaries_beside_permanent_ones(with_temporaries):
  # After each save: the newest permanent (keep_checkpoints=1) and those at multiples of keep_every=4;
  # the newest temporary only while it is the newest checkpoint.
  assert with_temporaries[2] == [
      [(1, True)], [(2, False)], [(2, False), (3, True)], [(4, False)], [(4, False), (5, True)],
      [(4, False), (6, False)], [(4, False), (6, False), (7, True)], [(4, False), (8, False)]]


def test_sigterm_saves_the_step_exits_0_and_the_same_call_resumes_bitwise(
    test_config, tokenizer, with_temporaries, tmp_path, monkeypatch, capsys):
  config, workdir = _config(test_config), tmp_path / "preempted"
  write = train_lib.MetricWriter.write

  def write_then_sigterm(self, step, metrics):  # the signal arrives during step 5's logging
    write(self, step, metrics)
    if step == 5:
      os.kill(os.getpid(), signal.SIGTERM)
  monkeypatch.setattr(train_lib.MetricWriter, "write", write_then_sigterm)
  handler = signal.getsignal(signal.SIGTERM)
  with pytest.raises(train_lib.Preempted) as stopped:
    train_lib.train(config, str(workdir))
  assert stopped.value.code == 0 and stopped.value.step == 5
  assert ("Preempted (SIGTERM) at step 5: saved a checkpoint; run the same command to resume."
          in capsys.readouterr().out)
  assert signal.getsignal(signal.SIGTERM) is handler  # the previous handler is back
  lock = WorkdirLock(workdir)  # and the workdir is free
  lock.acquire(create=True)
  lock.release()
  ckpt = Checkpoints(workdir, read_only=True)
  assert ckpt.all_steps() == [4, 5] and ckpt.newest_good() == (5, []) and _temporary(workdir, 5)
  ckpt.close()

  monkeypatch.setattr(train_lib.MetricWriter, "write", write)
  train_lib.train(config, str(workdir))
  assert "Resuming from the checkpoint at step 5." in capsys.readouterr().out
  ckpt = Checkpoints(workdir, read_only=True)
  assert ckpt.all_steps() == [4, 8]  # the temporary one went once a newer one was complete
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, _params(with_temporaries[0], config, tokenizer.vocab_size, 8),
               _params(workdir, config, tokenizer.vocab_size, 8))


def test_retention_keeps_the_newest_permanent_every_kth_and_the_newest_temporary(
    test_config, tokenizer, train_source, tmp_path):
  it = pipeline.train_iterator(test_config, tokenizer, train_source, process_index=0, process_count=1)
  ckpt = Checkpoints(tmp_path, keep=2, keep_every=4)
  kept = []
  for step in range(1, 11):
    ckpt.save(step, {"params": {"w": jnp.full((3,), step)}}, it, test_config, temporary=step % 2 == 1)
    ckpt.wait()
    kept.append(ckpt.all_steps())
  ckpt.close()
  assert kept[-2:] == [[4, 6, 8, 9], [4, 8, 10]]
  for steps in kept:  # at most one temporary (odd) step, and only as the newest
    assert all(s % 2 == 0 for s in steps[:-1])


class _FakeGather:
  def __init__(self, flags):
    self.flags = flags

  def __call__(self, x):
    return np.array([int(x)] + self.flags)


def test_several_processes_stop_at_the_preemption_sync_point(monkeypatch):
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(train_lib.multihost_utils, "reached_preemption_sync_point", lambda step: step == 3)
  handler = signal.getsignal(signal.SIGTERM)
  p = train_lib._Preemption()  # pylint: disable=protected-access
  assert signal.getsignal(signal.SIGTERM) is handler  # jax's own handler stays in place
  assert [p.requested(s, True) for s in (1, 2, 3)] == [False, False, True] and p.signal == "SIGTERM"
  p.close()
  # Without jax's preemption service: a Python handler, and the processes agree at log steps.
  monkeypatch.setattr(train_lib.multihost_utils, "process_allgather", _FakeGather([1]))  # another got it
  jax.config.update("jax_enable_preemption_service", False)
  try:
    p = train_lib._Preemption()  # pylint: disable=protected-access
    assert signal.getsignal(signal.SIGTERM) == p._on_signal  # pylint: disable=protected-access
    assert not p.requested(4, False) and p.requested(5, True)
    p.close()
  finally:
    jax.config.update("jax_enable_preemption_service", True)
  assert signal.getsignal(signal.SIGTERM) is handler


@pytest.mark.parametrize("field, value, message", [
    ("keep_every", -1, r"keep_every=-1 must be a number >= 0 \(0: off\); set --config.keep_every"),
    ("checkpoint_minutes", "soon", r"checkpoint_minutes='soon' must be a number >= 0"),
    ("checkpoint_checksums", 1, r"checkpoint_checksums=1 must be True or False"),
])
def test_bad_checkpoint_fields_are_one_line_errors(field, value, message):
  config = files.complete(mlc.ConfigDict({"keep_checkpoints": 2, field: value}))
  with pytest.raises(UserError, match=message):
    train_lib._checkpoint_fields(config)  # pylint: disable=protected-access

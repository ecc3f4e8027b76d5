"""Checkpoint integrity and the workdir lock, in-process: manifests, damaged steps refused (restore, eval,
init.parts) and skipped (newest_good), pre-manifest checkpoints trusted, a save that does not commit,
and one trainer per workdir. (tests/test_faults.py does the same through the command line.)"""
import copy
import os
import pathlib
import shutil
import time

import jax
import numpy as np
import pytest

from conftest import make_run
from mm_jax.checkpoint import integrity
from mm_jax.train import sharding
from mm_jax.checkpoint import Checkpoints
from mm_jax.checkpoint.parts import map_parts
from mm_jax.data import pipeline
from mm_jax.errors import UserError
from mm_jax.checkpoint.integrity import MANIFEST, SaveFailed, WorkdirLock

pytestmark = pytest.mark.slow  # end to end through the commands


@pytest.fixture(scope="module")
def saved(test_config, tokenizer, train_source, tmp_path_factory):
  """(workdir with complete checkpoints at steps 1, 2, 3, the test config, mm, tx, host params of 3)."""
  config = copy.deepcopy(test_config)
  workdir = tmp_path_factory.mktemp("saved")
  mm, tx = make_run(config, jax.devices()[:1], tokenizer.vocab_size)
  state, step = mm.init_train_state(tx, seed=0), mm.make_train_step(tx)
  it = pipeline.train_iterator(config, tokenizer, train_source, process_index=0, process_count=1)
  ckpt = Checkpoints(workdir, keep=3)
  for k in (1, 2, 3):
    state, _ = step(state, sharding.to_global(next(it), mm.mesh))
    ckpt.save(k, state, it, config)
  ckpt.close()
  return workdir, config, mm, tx, jax.tree.map(np.asarray, state["params"])


@pytest.fixture
def copied(saved, tmp_path):
  shutil.copytree(saved[0], tmp_path / "w")
  return tmp_path / "w"


def test_every_committed_step_lists_its_files_sizes_and_checksums(saved):
  workdir = saved[0]
  ckpt = Checkpoints(workdir, read_only=True)
  assert ckpt.all_steps() == [1, 2, 3] and ckpt.newest_good() == (3, [])
  for step in (1, 2, 3):
    step_dir = ckpt.directory / str(step)
    manifest = integrity.read_manifest(step_dir)
    on_disk = {str(p.relative_to(step_dir)) for p in pathlib.Path(step_dir).rglob("*") if p.is_file()}
    assert set(manifest["files"]) == on_disk - {MANIFEST, "_CHECKPOINT_METADATA", "commit_success.txt"}
    assert {"state/_METADATA", "data/process_0-of-1.json", "meta/metadata"} <= set(manifest["files"])
    for rel, (size, crc) in manifest["files"].items():
      assert (step_dir / rel).stat().length == size and isinstance(crc, int)
    assert manifest["temporary"] is False
  ckpt.close()


def _damage(step_dir, kind):
  """Damages the checkpoint at step_dir as `kind` says; returns the reason newest_good should give."""
  data = max((p for p in (step_dir / "state").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
  rel = str(data.relative_to(step_dir))
  if kind == "truncated":
    size = data.stat().st_size
    os.truncate(data, size - 100)
    return f"{rel} is {size - 100} bytes, {size} when saved"
  if kind == "removed":
    data.unlink()
    return f"{rel} is missing"
  if kind == "altered":  # same size, one byte changed
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    return f"{rel} differs from what was saved (crc32)"
  (step_dir / MANIFEST).unlink()
  return f"{MANIFEST} is missing"


@pytest.mark.parametrize("kind", ["truncated", "removed", "altered", "no manifest"])
def test_a_damaged_step_is_skipped_and_refused(saved, copied, kind, tokenizer, train_source):
  _, _, mm, tx, _ = saved
  why = _damage(copied / "checkpoints" / "3", kind)
  ckpt = Checkpoints(copied, read_only=True)
  assert ckpt.newest_good() == (2, [(3, why)])
  refusal = (rf"the checkpoint at step 3 in {copied}/checkpoints is damaged \({why}\), it cannot be "
             r"restored; the newest complete one is at step 2")
  with pytest.raises(UserError, match=refusal.replace("(crc32)", r"\(crc32\)")):
    ckpt.restore_params(3, mm.abstract_params)
  it = pipeline.train_iterator(saved[1], tokenizer, train_source, process_index=0, process_count=1)
  with pytest.raises(UserError, match="is damaged"):
    ckpt.restore(3, mm.abstract_train_state(tx), it)
  with pytest.raises(UserError, match="is damaged"):
    ckpt.meta(3)
  ckpt.restore_params(2, mm.abstract_params)  # the older one still restores
  ckpt.close()


def test_eval_and_init_parts_refuse_a_damaged_checkpoint(saved, copied):
  from mm_jax.eval import evaluate as eval_lib  # pylint: disable=g-import-not-at-top
  _, _, mm, _, _ = saved
  why = _damage(copied / "checkpoints" / "3", "truncated")
  with pytest.raises(UserError, match=rf"step 3 .* is damaged \({why}\).*newest complete one is at step 2"):
    eval_lib.restore_params(str(copied), mm, None)
  step, _ = eval_lib.restore_params(str(copied), mm, 2)  # an explicit older step is fine
  assert step == 2
  with pytest.raises(UserError, match=rf"step 3 .* is damaged \({why}\)"):
    map_parts(((str(copied), "encoder/", "encoder/"),), mm.abstract_params)


def test_checkpoints_written_before_manifests_are_trusted(saved, copied):
  _, _, mm, _, params = saved
  for step in (1, 2, 3):
    (copied / "checkpoints" / str(step) / MANIFEST).unlink()
  ckpt = Checkpoints(copied, read_only=True)
  assert ckpt.newest_good() == (3, [])
  jax.tree.map(np.testing.assert_array_equal, params,
               jax.tree.map(np.asarray, ckpt.restore_params(3, mm.abstract_params)))
  ckpt.close()


def test_a_save_killed_midway_is_only_a_tmp_dir_ignored_then_cleaned(copied):
  tmp = copied / "checkpoints" / "4.orbax-checkpoint-tmp"
  shutil.copytree(copied / "checkpoints" / "3", tmp)  # what a kill -9 mid-save leaves: never renamed
  os.truncate(next(p for p in tmp.rglob("*") if p.is_file() and p.stat().st_size > 1000), 10)
  reader = Checkpoints(copied, read_only=True)
  assert reader.all_steps() == [1, 2, 3] and reader.newest_good() == (3, [])
  reader.close()
  writer = Checkpoints(copied)  # the next trainer's manager removes it (in the background)
  deadline = time.monotonic() + 30
  while tmp.exists() and time.monotonic() < deadline:
    time.sleep(0.05)
  writer.close()
  assert not tmp.exists()


def test_a_save_that_does_not_commit_raises_and_keeps_the_earlier_ones(saved, copied, monkeypatch,
                                                                        tokenizer, train_source):
  _, config, mm, tx, _ = saved
  state = mm.init_train_state(tx, seed=0)
  it = pipeline.train_iterator(config, tokenizer, train_source, process_index=0, process_count=1)

  def no_space(*args, **kwargs):
    raise OSError(28, "No space left on device")
  monkeypatch.setattr("mm_jax.checkpoint.manager.write_manifest", no_space)  # fails in orbax's commit thread
  ckpt = Checkpoints(copied, keep=1)
  ckpt.save(4, state, it, config)
  with pytest.raises(SaveFailed, match=rf"saving the checkpoint at step 4 to {copied}/checkpoints failed: "
                                       r".*; the checkpoint at step 3 is intact and the same command "
                                       r"resumes from it once the cause \(e\.g\. a full disk\) is fixed"):
    ckpt.wait()
  ckpt.close(quiet=True)
  reader = Checkpoints(copied, read_only=True)  # nothing was pruned for the save that failed
  assert reader.all_steps() == [1, 2, 3] and reader.newest_good() == (3, [])
  reader.close()


def test_the_workdir_lock_admits_one_holder(tmp_path):
  workdir = tmp_path / "w"
  workdir.mkdir()
  first, second = WorkdirLock(workdir), WorkdirLock(workdir)
  first.acquire(create=False)  # no lock file: nothing taken, nothing written
  assert not (workdir / ".lock").exists()
  first.acquire(create=True)
  holder = (workdir / ".lock").read_text()
  assert holder.startswith(f"pid {os.getpid()} on ")
  for create in (False, True):
    with pytest.raises(UserError, match=rf"another trainer is running in {workdir} \({holder.strip()} "
                                        rf"holds {workdir}/.lock\); wait for it to end or stop it, or use "
                                        "another --workdir"):
      second.acquire(create=create)
  first.release()
  second.acquire(create=False)
  second.release()


def test_train_refuses_a_workdir_held_by_another_trainer(saved, copied):
  from mm_jax.train.loop import train  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(saved[1])
  config.total_steps = 5
  lock = WorkdirLock(copied)
  lock.acquire(create=True)
  before = {p: p.read_bytes() for p in copied.rglob("*") if p.is_file()}
  try:
    with pytest.raises(UserError, match="another trainer is running in"):
      train(config, str(copied))
  finally:
    lock.release()
  assert {p: p.read_bytes() for p in copied.rglob("*") if p.is_file()} == before

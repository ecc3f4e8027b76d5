"""Multi-host: the global batch sequence whatever the process count, iterator states across counts,
the MM_JAX_* init, and two real processes over loopback: the 1-process losses, and their checkpoint
restored in one process."""
import copy
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import chex
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import REPO, command_env, make_run
from mm_jax import data
from mm_jax.train import sharding
from mm_jax.checkpoint import Checkpoints
from mm_jax.data import pipeline
from mm_jax.errors import UserError

pytestmark = pytest.mark.slow  # end to end through the commands

NUM = 20  # elements: 8-row batches straddle epochs


def _ids(config, count, index, n=8):
  make = lambda j: {"id": np.int64(j)}
  it = pipeline.shuffled_batches(config, NUM, make, process_index=index, process_count=count)
  return [next(it)["id"] for _ in range(n)]


def test_one_process_sequence_is_the_recorded_one(test_config, tokenizer, train_source):
  # The pipeline before multi-host order mattered (recorded results were trained on it).
  old = grain.MapDataset.range(NUM)[0::1].shuffle(seed=test_config.seed).repeat(None)
  old = old.map(lambda j: {"id": np.int64(j)}).batch(8, drop_remainder=True)
  assert [old[k]["id"].tolist() for k in range(8)] == [b.tolist() for b in _ids(test_config, 1, 0)]
  first = np.concatenate([old[k]["id"] for k in range(3)])[:NUM]
  assert sorted(first.tolist()) == list(range(NUM)) and first.tolist() != list(range(NUM))
  # Real elements: the old pipeline's batches, array for array.
  row = pipeline.row_layout(test_config, tokenizer)
  example = pipeline._TrainExample(test_config, row, train_source)  # pylint: disable=protected-access
  make = lambda j: row.pad(example(j))
  num = len(train_source) * data.get(test_config.data.name).num_questions
  old = grain.MapDataset.range(num)[0::1].shuffle(seed=test_config.seed).repeat(None).map(make)
  old = old.batch(8, drop_remainder=True)
  it = pipeline.train_iterator(test_config, tokenizer, train_source, process_index=0, process_count=1)
  chex.assert_trees_all_equal([next(it) for _ in range(2)], [old[0], old[1]])


@pytest.mark.parametrize("count", [2, 4])
def test_processes_concatenate_to_the_one_process_batches(test_config, count):
  one = _ids(test_config, 1, 0)
  parts = [_ids(test_config, count, p) for p in range(count)]
  for k, batch in enumerate(one):
    np.testing.assert_array_equal(np.concatenate([part[k] for part in parts]), batch)
    assert len(parts[0][k]) == 8 // count


def test_state_of_2_processes_resumes_in_1(test_config, tmp_path):
  make = lambda j: {"id": np.int64(j)}
  its = [pipeline.shuffled_batches(test_config, NUM, make, process_index=p, process_count=2)
         for p in range(2)]
  for it in its:
    [next(it) for _ in range(3)]
  with ocp.CheckpointManager(tmp_path) as mngr:  # One process writes process_0-of-1.json ...
    mngr.save(3, args=ocp.args.Composite(data=pipeline.IteratorSave(its[0])))
  data = tmp_path / "3" / "data"
  (data / "process_0-of-1.json").rename(data / "process_0-of-2.json")  # ... as 2 processes would.
  (data / "process_1-of-2.json").write_text(json.dumps(its[1].get_state(), indent=4))
  one = pipeline.shuffled_batches(test_config, NUM, make, process_index=0, process_count=1)
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=pipeline.IteratorRestore(one)))
  np.testing.assert_array_equal(next(one)["id"], _ids(test_config, 1, 0, 4)[3])
  (data / "process_1-of-2.json").write_text(json.dumps({"next_index": 5}))
  with pytest.raises(UserError, match="resume with the process count that wrote them"):
    with ocp.CheckpointManager(tmp_path) as mngr:
      mngr.restore(3, args=ocp.args.Composite(data=pipeline.IteratorRestore(one)))


@pytest.mark.parametrize("env, msg", [
    ({"MM_JAX_COORDINATOR": "127.0.0.1:1234"},
     "MM_JAX_COORDINATOR set but MM_JAX_NUM_PROCESSES, MM_JAX_PROCESS_ID not"),
    ({"MM_JAX_COORDINATOR": "127.0.0.1:1234", "MM_JAX_NUM_PROCESSES": "two",
      "MM_JAX_PROCESS_ID": "0"}, "must be integers"),
    ({"MM_JAX_COORDINATOR": "127.0.0.1:1234", "MM_JAX_NUM_PROCESSES": "2",
      "MM_JAX_PROCESS_ID": "2"}, r"an id in \[0, count\)"),
])
def test_half_specified_coordinates_are_a_user_error(monkeypatch, env, msg):
  for k, v in env.items():
    monkeypatch.setenv(k, v)
  with pytest.raises(UserError, match=msg):
    sharding.maybe_initialize_distributed()
  assert not jax.distributed.is_initialized()


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_unreachable_coordinator_is_a_user_error_in_bounded_time(monkeypatch):
  port = _free_port()  # nothing listens there
  monkeypatch.setenv("MM_JAX_COORDINATOR", f"127.0.0.1:{port}")
  monkeypatch.setenv("MM_JAX_NUM_PROCESSES", "2")
  monkeypatch.setenv("MM_JAX_PROCESS_ID", "1")
  monkeypatch.setenv("MM_JAX_INIT_TIMEOUT", "1")
  start = time.time()
  with pytest.raises(UserError, match=f"process 1 of 2 could not reach the coordinator at "
                                      f"127.0.0.1:{port} within 1 s"):
    sharding.maybe_initialize_distributed()
  assert time.time() - start < 10 and not jax.distributed.is_initialized()


# --- two processes over loopback ---

OVERRIDES = ("--config.model.decoder.depth=1", "--config.log_every=1")  # total_steps 4, checkpoints 2, 4
TIMEOUT_S = 240


def _launch(workdir, data_dir, port, tmp_path):
  """Two `mm_jax.train` processes with 2 CPU devices each, one coordinator on loopback."""
  env = command_env(None)  # not the tests' 8 devices
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="2", MM_JAX_COORDINATOR=f"127.0.0.1:{port}",
             MM_JAX_NUM_PROCESSES="2", MM_JAX_INIT_TIMEOUT="60")
  cmd = [sys.executable, "-m", "mm_jax.train", f"--config={REPO}/configs/shapes_tiny.py:test",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *OVERRIDES]
  procs = []
  for i in range(2):
    log = open(tmp_path / f"process_{i}.log", "w")  # pylint: disable=consider-using-with
    procs.append((subprocess.Popen(cmd, cwd=REPO, env=dict(env, MM_JAX_PROCESS_ID=str(i)), stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True), log))
  return procs


def _wait(procs, tmp_path, deadline):
  """Waits for both until the deadline; kills both (their process groups) on timeout or failure."""
  try:
    for p, _ in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    for p, log in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
      log.close()
  tails = "\n".join(f"--- process {i} (rc {p.returncode}):\n" +
                    (tmp_path / f"process_{i}.log").read_text()[-2000:] for i, (p, _) in enumerate(procs))
  assert all(p.returncode == 0 for p, _ in procs), f"2-process run failed or passed {TIMEOUT_S} s:\n{tails}"


def test_two_processes_train_as_one_and_their_checkpoint_restores_in_one(
    test_config, tokenizer, train_source, tmp_path):
  workdir = tmp_path / "two"
  deadline = time.time() + TIMEOUT_S
  procs = _launch(workdir, test_config.data.data_dir, _free_port(), tmp_path)
  try:
    # Meanwhile, the same run in this process on 4 devices: what the 2 x 2 devices must reproduce.
    config = copy.deepcopy(test_config)
    config.model.decoder.depth = 1
    mm, tx = make_run(config, jax.devices()[:4], tokenizer.vocab_size)
    state, step, expected = mm.init_train_state(tx, seed=config.seed), mm.make_train_step(tx), []
    it = pipeline.train_iterator(config, tokenizer, train_source, process_index=0, process_count=1)
    for _ in range(config.total_steps):
      state, out = step(state, sharding.to_global(next(it), mm.mesh))
      expected.append(float(out["loss"]))
  finally:
    _wait(procs, tmp_path, deadline)

  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  two = [json.loads(line)["loss"] for line in lines]
  assert len(two) == 4 and expected[-1] < expected[0]
  np.testing.assert_allclose(two, expected, atol=1e-6, rtol=0)
  print(f"2-process losses {two}\n1-process losses {expected}")

  # The step-2 checkpoint, written by both processes, resumes here: the same next losses.
  data = workdir / "checkpoints" / "2" / "data"
  assert sorted(p.name for p in data.glob("*.json")) == ["process_0-of-2.json", "process_1-of-2.json"]
  resumed_dir = tmp_path / "resumed"
  shutil.copytree(workdir / "checkpoints" / "2", resumed_dir / "checkpoints" / "2")
  it = pipeline.train_iterator(config, tokenizer, train_source, process_index=0, process_count=1)
  ckpt = Checkpoints(resumed_dir, read_only=True)
  state = ckpt.restore(2, mm.abstract_train_state(tx), it)
  ckpt.close()
  assert int(state["step"]) == 2
  resumed = []
  for _ in range(2):
    state, out = step(state, sharding.to_global(next(it), mm.mesh))
    resumed.append(float(out["loss"]))
  np.testing.assert_allclose(resumed, expected[2:], atol=1e-6, rtol=0)
  print(f"resumed in 1 process {resumed}")

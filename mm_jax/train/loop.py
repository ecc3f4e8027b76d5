r"""Trains a model described by a config: one trainer for every family and stage.

  python -m mm_jax.train --config=configs/shapes_tiny.py --workdir=workdirs/tiny
  python -m mm_jax.train --config=configs/shapes_tiny.py:blind --workdir=workdirs/blind \
      --config.total_steps=500 --config.optim.lr=1e-3

Resumes from the newest complete checkpoint in <workdir>/checkpoints when there is one (same command
again); damaged ones newer than it are moved to checkpoints/damaged/, each with a line saying why.
Writes <workdir>/checkpoints, <workdir>/metrics.jsonl and TensorBoard events in <workdir>/tensorboard:
at every log step loss, lr, steps_per_sec, tokens_per_s and mfu (from the second log step; mm_jax.perf.mfu).
Every input is checked before anything is written; bad input exits with one line naming the fix.
One trainer per workdir (<workdir>/.lock). On SIGTERM the current step finishes, a checkpoint is saved
and the process exits 0; the same command resumes. A save that fails stops the run with one line.
Checkpoint retention: mm_jax.checkpoint; the reliability table in README.md has the rest.
"""
import contextlib
import dataclasses
import signal
import threading
import time

import jax
import ml_collections as mlc
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from mm_jax import data
from mm_jax.perf import mfu
from mm_jax.train import optim
from mm_jax.train import sharding
from mm_jax.config import validate
from mm_jax.checkpoint import Checkpoints, signature, workdir_path
from mm_jax.config import files
from mm_jax.errors import UserError
from mm_jax.checkpoint.integrity import WorkdirLock
from mm_jax.train.metrics import MetricWriter, parameter_table, write_samples
from mm_jax.checkpoint.parts import load_parts, map_parts
from mm_jax.tasks import TASKS
from mm_jax.train.state import ModelOnMesh

def initial_params(config: mlc.ConfigDict, mm: ModelOnMesh, parts=None, needed=None) -> dict:
  """The params a run starts from at step 0: the init of config.seed, then config.init.parts over it.

  train() and mm_jax.recipe's frozen-params check both call this, so both see the same values.
  parts: map_parts' mappings (planned here if None). needed: the param paths the caller reads (default
  all); the seeded init is computed only if one of them is not loaded, else the rest stay abstract.
  """
  parts = map_parts(config.init.parts, mm.abstract_params) if parts is None else parts
  loaded = {path for plan in parts for path in plan["mapping"]}
  needed = set(signature(mm.abstract_params) if needed is None else needed)
  params = mm.abstract_params if needed <= loaded else mm.init_params(config.seed)
  return load_parts(parts, params) if parts else params


class Preempted(SystemExit):
  """Raised once a preemption's checkpoint is saved: a SystemExit with code 0, so the command exits 0
  (and a recipe or sweep running train() in-process stops too; the same command resumes it)."""

  def __init__(self, step: int):
    super().__init__(0)
    self.step = step


class _Preemption:
  """SIGTERM asks the loop to stop after the current step; the handler only sets a flag.

  Several processes: jax's preemption sync point tells every process to stop at the same step (jax
  installs its own SIGTERM handler with jax.distributed, which a Python one would replace). Without
  jax's preemption service, the processes agree on their flags at log steps.
  """

  def __init__(self):
    self.signal = None
    self._sync = jax.process_count() > 1 and jax.config.jax_enable_preemption_service
    self._installed = not self._sync and threading.current_thread() is threading.main_thread()
    if self._installed:
      self._previous = signal.signal(signal.SIGTERM, self._on_signal)

  def _on_signal(self, signum, frame):  # pylint: disable=unused-argument
    self.signal = signal.Signals(signum).name

  def requested(self, step: int, log_step: bool) -> bool:
    if self._sync:
      if multihost_utils.reached_preemption_sync_point(step):
        self.signal = "SIGTERM"  # the notice jax listens for
      return self.signal is not None
    if jax.process_count() > 1:
      return log_step and bool(np.any(multihost_utils.process_allgather(np.int32(bool(self.signal)))))
    return self.signal is not None

  def close(self) -> None:
    if self._installed:  # None: the previous handler was not set from Python; the default then
      signal.signal(signal.SIGTERM, signal.SIG_DFL if self._previous is None else self._previous)
      self._installed = False


def _checkpoint_fields(config: mlc.ConfigDict) -> dict:
  """Checkpoints' retention and integrity options, checked."""
  out = dict(keep=config.keep_checkpoints, keep_every=config.keep_every, checksums=config.checkpoint_checksums)
  for name in ("keep_every", "checkpoint_minutes"):
    v = config[name]
    if isinstance(v, bool) or not isinstance(v, (int, float)) or v < 0:
      raise UserError(f"{name}={v!r} must be a number >= 0 (0: off); set --config.{name}")
  if not isinstance(out["checksums"], bool):
    raise UserError(f"checkpoint_checksums={out['checksums']!r} must be True or False; set "
                    "--config.checkpoint_checksums")
  return out


def _temporary_due(config: mlc.ConfigDict, ckpt: Checkpoints, step: int) -> bool:
  """checkpoint_minutes since the last save started. Several processes decide at log steps only (process
  0's clock, broadcast where the loop syncs anyway)."""
  minutes = config.checkpoint_minutes
  if not minutes:
    return False
  due = time.monotonic() - ckpt.last_save_time >= 60 * minutes
  if jax.process_count() > 1:
    return step % config.log_every == 0 and bool(multihost_utils.broadcast_one_to_all(int(due)))
  return due


def _stop_preempted(preemption, step, state, data_iter, config, ckpt, mm) -> None:
  """Saves the state of `step` (unless just saved), waits for the commit, says so and raises Preempted."""
  if ckpt.last_saved_step != step:
    mm.check_numerics(state, ckpt)
    ckpt.save(step, state, data_iter, config, temporary=True)
  ckpt.wait()
  if jax.process_index() == 0:
    print(f"Preempted ({preemption.signal}) at step {step}: saved a checkpoint; run the same command "
          "to resume.", flush=True)
  raise Preempted(step)


def _throughput(config: mlc.ConfigDict, mm: ModelOnMesh, labels) -> mfu.Throughput | None:
  """tokens_per_s and mfu for the writer (FLOPs frozen-aware by the optimizer's labels); None, with a
  warning, for a model mm_jax.perf.flops cannot count: the run goes on without them."""
  try:
    return mfu.Throughput(config, mm.model, mm.abstract_params, labels, mm.mesh.devices.flat)
  except ValueError as e:
    logging.warning("no mfu / tokens_per_s in the metrics: %s", e)
    return None


def train(config: mlc.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics. On SIGTERM: saves, then Preempted."""
  config = files.complete(config)  # a config written before a field gets base's default
  with contextlib.ExitStack() as stack:  # lets go of what the run holds, however it ends
    preemption = _Preemption()
    stack.callback(preemption.close)
    return _train(config, workdir, stack, preemption)


@dataclasses.dataclass
class _Run:
  """What the checks before a run found: the model on its mesh, the optimizer, where to start."""
  mm: ModelOnMesh
  tokenizer: object
  source: object
  labels: dict
  tx: object
  lock: WorkdirLock
  existing: Checkpoints  # closed; moves damaged checkpoints aside
  resume_step: int | None
  damaged: list[tuple[int, str]]  # (step, why) of damaged checkpoints newer than resume_step
  parts: list


def _train(config: mlc.ConfigDict, workdir: str, stack: contextlib.ExitStack, preemption) -> dict:
  run = _check(config, workdir, stack)  # everything that can fail on bad input: nothing written yet
  ckpt, data_iter, state = _start(config, workdir, stack, run)
  return _loop(config, workdir, run, ckpt, data_iter, state, stack, preemption)


def _check(config: mlc.ConfigDict, workdir: str, stack: contextlib.ExitStack) -> _Run:
  """The config, the data, the model and the workdir's checkpoints, before the workdir is touched."""
  validate.check_config(config)  # fields, rules against the param tree, text_len against the data
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.global_batch_size, mesh)
  tokenizer, source = data.open_split(config, "train")
  if config.eval.every_steps:  # evaluating during training: its split and batch checked now
    splits = data.get(config.data.name).splits
    if config.eval.split not in splits:
      raise UserError(f"eval.split={config.eval.split!r} is not a split of {config.data.name}; use "
                      f"--config.eval.split= one of {', '.join(splits)}")
    validate.check_config(config, config.eval.split, train=False)
    sharding.check_batch(config.eval.batch_size, mesh, field="eval.batch_size")
  mm = ModelOnMesh.create(config, tokenizer.vocab_size, mesh)
  TASKS[mm.model.task].check(config)  # the task's loss fields (optim.loss_norm, optim.loss)
  labels = optim.param_labels(mm.abstract_params, config.optim.rules)
  tx = optim.make_optimizer(config.optim, config.total_steps, labels)
  _checkpoint_fields(config)
  lock = WorkdirLock(workdir_path(workdir))  # taken here if its file exists (writing nothing), else in _start
  stack.callback(lock.release)
  lock.acquire(create=False)
  existing = Checkpoints(workdir, read_only=True)
  resume_step, damaged = existing.newest_good()
  if damaged and resume_step is None:
    raise UserError(f"no complete checkpoint in {existing.directory} (" + "; ".join(
        f"step {s}: {why}" for s, why in damaged) + "); move them away or use another --workdir")
  if resume_step is not None:
    existing.check_compatible(resume_step, mm.abstract_params)
    existing.check_state(resume_step, mm.abstract_train_state(tx))  # e.g. optim.rules changed
  existing.close()
  parts = map_parts(config.init.parts, mm.abstract_params) if resume_step is None else []
  return _Run(mm, tokenizer, source, labels, tx, lock, existing, resume_step, damaged, parts)


def _start(config: mlc.ConfigDict, workdir: str, stack: contextlib.ExitStack, run: _Run):
  """Takes the workdir; (checkpoints, the data iterator, the state resumed or at step 0)."""
  workdir_path(workdir).mkdir(parents=True, exist_ok=True)
  run.lock.acquire(create=True)
  if run.damaged:  # out of the way of the saves that will write those steps again
    aside = run.existing.move_aside([s for s, _ in run.damaged])
    for s, why in run.damaged:
      if jax.process_index() == 0:
        print(f"Skipped the checkpoint at step {s}: {why}; moved it to {aside}.", flush=True)
  ckpt = Checkpoints(workdir, **_checkpoint_fields(config))
  stack.callback(ckpt.close, quiet=True)  # on an error: the save in flight completes first
  mm, tx = run.mm, run.tx
  data_iter = TASKS[mm.model.task].train_iterator(
      config, run.tokenizer, run.source, process_index=jax.process_index(),
      process_count=jax.process_count())
  if run.resume_step is not None:
    state = ckpt.restore(run.resume_step, mm.abstract_train_state(tx), data_iter, verified=True)
    logging.info("Resumed from step %d of %s", run.resume_step, ckpt.directory)
    print(f"Resuming from the checkpoint at step {run.resume_step}.", flush=True)
  else:
    state = mm.init_train_state(tx, config.seed, initial_params(config, mm, run.parts))
  if jax.process_index() == 0:
    print(parameter_table(mm.abstract_params, run.labels), flush=True)
  return ckpt, data_iter, state


def _evaluate(config, workdir, mm, params, step: int, writer: MetricWriter) -> None:
  """The task's evaluator on eval.split during training: its scores logged as <split>_<name>, and its
  samples (images, question, prediction) written to TensorBoard beside mm_jax.eval's."""
  split, start = config.eval.split, time.time()
  tokenizer, source = data.open_split(config, split)
  scores, _ = TASKS[mm.model.task].evaluate(config, mm, params, tokenizer, source)
  scores.pop("predictions", None)
  summaries = scores.pop("summaries", [])
  if jax.process_index() == 0:
    write_samples(workdir_path(workdir) / "tensorboard" / "eval", split, step, scores, summaries)
  writer.write(step, {f"{split}_{k}": v for k, v in scores.items()
                      if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "num_examples"},
               timed=False)
  writer.pause(time.time() - start)


def _loop(config, workdir, run: _Run, ckpt, data_iter, state, stack, preemption) -> dict:
  """The steps, logs and saves. Only log and checkpoint steps read values back to the host."""
  mm, mesh = run.mm, run.mm.mesh
  train_step = mm.make_train_step(run.tx)
  lr_at = optim.schedule(config.optim, config.total_steps)
  writer = MetricWriter(workdir_path(workdir), config.total_steps, _throughput(config, mm, run.labels))
  stack.callback(writer.close)
  writer.text("parameters", parameter_table(mm.abstract_params, run.labels), int(state["step"]))
  metrics, skips = {}, data.SkipMeter(config)  # data.bad_records=skip: replaced rows, per log interval
  step = int(state["step"])
  while step < config.total_steps:
    state, out = train_step(state, skips.add(sharding.to_global(next(data_iter), mesh)))
    step += 1
    log, save = step % config.log_every == 0, step % config.checkpoint_every == 0
    last = step == config.total_steps
    if log or save or last:
      numerics = mm.check_numerics(state, ckpt)  # a non-finite step stops the run here, before a save
    if log or last:
      metrics = {"loss": float(out["loss"]), "lr": float(lr_at(step - 1)), **skips.pop(), **numerics}
      if last:  # the train-step programs this run compiled: one per batch shape (native: per bucket)
        metrics["train_programs"] = train_step.programs()
      writer.write(step, metrics)
    if save or last:
      ckpt.save(step, state, data_iter, config)
    elif _temporary_due(config, ckpt, step):
      mm.check_numerics(state, ckpt)
      ckpt.save(step, state, data_iter, config, temporary=True)
    if config.eval.every_steps and (step % config.eval.every_steps == 0 or last):
      _evaluate(config, workdir, mm, state["params"], step, writer)  # after the save: it overlaps it
    ckpt.poll()  # a save done in the background: its failure stops the run now
    if not last and preemption.requested(step, log):
      _stop_preempted(preemption, step, state, data_iter, config, ckpt, mm)
  ckpt.wait()
  ckpt.close()
  writer.close()
  return metrics

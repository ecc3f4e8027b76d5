r"""Trains a model described by a config: one trainer for every family and stage.

  python -m mm_jax.train --config=configs/shapes_tiny.py --workdir=workdirs/tiny
  python -m mm_jax.train --config=configs/shapes_tiny.py:blind --workdir=workdirs/blind \
      --config.total_steps=500 --config.optim.lr=1e-3

Resumes from the newest checkpoint in <workdir>/checkpoints when there is one (same command again).
Writes <workdir>/checkpoints, <workdir>/metrics.jsonl and TensorBoard events in <workdir>/tensorboard.
Every input is checked before anything is written; bad input exits with one line naming the fix.
"""
import jax
import ml_collections as mlc
import numpy as np
from absl import flags, logging
from ml_collections import config_flags

from mm_jax import cli, data, optim, sharding, validate
from mm_jax.checkpoint import Checkpoints, load_parts, plan_parts, signature, workdir_path
from mm_jax.errors import UserError
from mm_jax.metrics import MetricWriter, parameter_table
from mm_jax.models import CONNECTORS, FAMILIES
from mm_jax.state import TASKS, ModelOnMesh

def initial_params(config: mlc.ConfigDict, mm: ModelOnMesh, parts=None, needed=None) -> dict:
  """The params a run starts from at step 0: the init of config.seed, then config.init.parts over it.

  train() and mm_jax.recipe's frozen-params check both call this, so both see the same values.
  parts: plan_parts' plans (planned here if None). needed: the param paths the caller reads (default
  all); the seeded init is computed only if one of them is not loaded, else the rest stay abstract.
  """
  parts = plan_parts(config.init.parts, mm.abstract_params) if parts is None else parts
  loaded = {path for plan in parts for path in plan["mapping"]}
  needed = set(signature(mm.abstract_params) if needed is None else needed)
  params = mm.abstract_params if needed <= loaded else mm.init_params(config.seed)
  return load_parts(parts, params) if parts else params


def train(config: mlc.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) training; returns the last logged metrics."""
  # 1. Everything that can fail on bad input, before the workdir is touched.
  validate.check_config(config)  # fields, rules against the param tree, text_len against the data
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.global_batch_size, mesh)
  tokenizer, source = data.prepare(config, "train")
  mm = ModelOnMesh.create(config, tokenizer.vocab_size, mesh)
  TASKS[mm.model.task].check(config)  # the task's loss fields (optim.loss_norm, optim.loss)
  labels = optim.param_labels(mm.abstract_params, config.optim.rules)
  tx = optim.make_optimizer(config.optim, config.total_steps, labels)
  existing = Checkpoints(workdir, read_only=True)
  resume_step = existing.latest_step()
  if resume_step is not None:
    existing.check_compatible(resume_step, mm.abstract_params)
  existing.close()
  parts = plan_parts(config.init.parts, mm.abstract_params) if resume_step is None else []

  # 2. Build the run.
  workdir_path(workdir).mkdir(parents=True, exist_ok=True)
  ckpt = Checkpoints(workdir, keep=config.keep_checkpoints)
  data_iter = data.TRAIN_ITERATORS[mm.model.task](
      config, tokenizer, source, process_index=jax.process_index(), process_count=jax.process_count())
  if resume_step is not None:
    state = ckpt.restore(resume_step, mm.abstract_train_state(tx), data_iter)
    logging.info("Resumed from step %d of %s", resume_step, ckpt.directory)
    print(f"Resuming from the checkpoint at step {resume_step}.", flush=True)
  else:
    state = mm.init_train_state(tx, config.seed, initial_params(config, mm, parts))
  if jax.process_index() == 0:
    print(parameter_table(mm.abstract_params, labels), flush=True)
  train_step = mm.make_train_step(tx)
  lr_at = optim.schedule(config.optim, config.total_steps)
  writer = MetricWriter(workdir_path(workdir), config.total_steps)

  # 3. The loop. Only log steps read values back to the host.
  metrics, skips = {}, data.SkipMeter(config)  # data.bad_records=skip: replaced rows, per log interval
  step = int(state["step"])
  try:
    while step < config.total_steps:
      state, out = train_step(state, skips.add(sharding.to_global(next(data_iter), mesh)))
      step += 1
      if step % config.log_every == 0 or step == config.total_steps:
        loss = float(out["loss"])
        if not np.isfinite(loss):
          raise UserError(f"the loss is {loss} at step {step}; nothing was saved after the last "
                          "checkpoint; lower --config.optim.lr or check the data")
        metrics = {"loss": loss, "lr": float(lr_at(step - 1)), **skips.pop()}
        writer.write(step, metrics)
      if step % config.checkpoint_every == 0 or step == config.total_steps:
        ckpt.save(step, state, data_iter, config)
  finally:  # also when a fault stops the run: an async save in flight finishes before the exit
    ckpt.wait()
    ckpt.close()
    writer.close()
  return metrics


def main() -> None:
  if _CONFIG.value is None or not _WORKDIR.value:
    raise UserError("--config and --workdir are required")
  train(_CONFIG.value, _WORKDIR.value)


if __name__ == "__main__":
  # Flags only when run as a program: importing train() (mm_jax.recipe does) defines none.
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None,
      f"Config file (configs/*.py[:variant]). Registries: model.family in {sorted(FAMILIES)}, "
      f"model.connector in {sorted(CONNECTORS)}.", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints and metrics go.")
  cli.run("mm_jax.train", main)

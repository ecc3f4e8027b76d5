r"""Evaluates a checkpoint with the evaluator of its model's task (mm_jax.tasks: Task.evaluate): VQA
models answer every question of a split by greedy KV-cached decoding, scored by exact match;
contrastive models give image->text and text->image recall@1 over the split's images whose caption is
unique.

  python -m mm_jax.eval --config=configs/shapes_tiny.py --workdir=workdirs/tiny [--split=test] [--step=N]

Restores the params (no optimizer state) of the newest checkpoint, or of --step, onto the current mesh,
whatever mesh wrote it. Prints the score and writes <workdir>/eval/<split>.json (and, for VQA models,
every prediction with its scores to <workdir>/eval/<split>.predictions.jsonl), and to TensorBoard
(<workdir>/tensorboard/eval) the scores and eval.num_summaries samples: images, question, prediction.
"""
import json

import jax
import ml_collections as mlc

from mm_jax import data
from mm_jax.tasks import TASKS
from mm_jax.train import sharding
from mm_jax.config import validate
from mm_jax.checkpoint import Checkpoints, OtherLayout, workdir_path
from mm_jax.config import files
from mm_jax.errors import UserError
from mm_jax.checkpoint.parts import restore_params_by_name
from mm_jax.train.metrics import write_samples
from mm_jax.train.state import ModelOnMesh


def restore_params(workdir: str, mm: ModelOnMesh, step: int | None):
  ckpt = Checkpoints(workdir, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise UserError(f"no checkpoint in {ckpt.directory}; train first: python -m mm_jax.train "
                    f"--config=... --workdir={workdir}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise UserError(f"no checkpoint at step {step} in {ckpt.directory}; available: {steps}")
  try:
    ckpt.check_compatible(step, mm.abstract_params)
    params = ckpt.restore_params(step, mm.abstract_params)
  except OtherLayout:
    params = restore_params_by_name(workdir, step, mm.abstract_params)  # the other layer layout
  ckpt.close()
  return step, params


def stored_config(workdir: str, step: int | None) -> tuple[mlc.ConfigDict, int]:
  """(the config stored with the newest checkpoint, or --step's, completed with base's newer fields;
  its step): what predict and export run a workdir's model with."""
  ckpt = Checkpoints(workdir, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise UserError(f"no checkpoint in {ckpt.directory}; train first: python -m mm_jax.train "
                    f"--config=... --workdir={workdir}")
  if step is not None and step not in steps:
    raise UserError(f"no checkpoint at step {step} in {ckpt.directory}; available: {steps}")
  step = steps[-1] if step is None else step
  config = files.complete(mlc.ConfigDict(ckpt.meta(step)["config"]))
  ckpt.close()
  return config, step


def evaluate(config: mlc.ConfigDict, workdir: str, split: str = "test", step: int | None = None) -> dict:
  """Runs the evaluator of the model's task (Task.evaluate); writes <workdir>/eval/<split>.json."""
  config = files.complete(config)  # a config written before a field gets base's default
  splits = data.get(config.data.name).splits
  if split not in splits:
    raise UserError(f"unknown split {split!r}; use --split= one of {', '.join(splits)}")
  validate.check_config(config, split, train=False)  # fields, text_len against the split
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.eval.batch_size, mesh, field="eval.batch_size")
  tokenizer, source = data.open_split(config, split)
  mm = ModelOnMesh.create(config, tokenizer.vocab_size, mesh)
  step, params = restore_params(workdir, mm, step)
  scores, line = TASKS[mm.model.task].evaluate(config, mm, params, tokenizer, source)
  predictions = scores.pop("predictions", None)
  summaries = scores.pop("summaries", [])
  result = {"step": step, "split": split, **scores}
  if jax.process_index() == 0:
    write_samples(workdir_path(workdir) / "tensorboard" / "eval", split, step, scores, summaries)
    out = workdir_path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    if predictions is not None:  # every prediction, one JSON line each, beside the scores
      (out / f"{split}.predictions.jsonl").write_text(
          "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions))
    (out / f"{split}.json").write_text(json.dumps(result, indent=1))
    print(f"step {step} | {split} | {line}", flush=True)
  return result


"""Tasks: what a model is trained and evaluated on, one Task record per module, found by model.task.

  task = TASKS[model.task]
  loss = task.loss(model, params, batch, config.optim)

A new task: one module whose TASK is a Task, and its line in TASKS.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.experimental import multihost_utils

from mm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class Task:
  """What the trainer, the evaluator, mm_jax.mfu and the config checks need of a model's task."""
  inputs: tuple[str, ...]   # the batch keys model.__call__ takes, in order
  loss: Callable            # (model, params, batch, optim_cfg) -> the scalar loss
  check: Callable[[mlc.ConfigDict], None]  # config -> raises UserError for a bad loss field
  example_batch: Callable   # (config, batch=1) -> zeros shaped like a training batch
  train_iterator: Callable  # (config, tokenizer, source, *, process_index, process_count) -> batches
  evaluate: Callable        # (config, mm, params, tokenizer, source) -> (scores, the line to print)
  tokens_per_example: Callable  # (config, model) -> the tokens of one example's sequence(s)
  text_elements: Callable   # (config, data source, texts, length, train) -> (tokens, prefix tokens or
                            # None, record, what) of every element the pipeline makes of a split
  # config -> (flop_count.Sizes, count_flops keywords) of a training row; None: (image_size, text_len)
  flop_layout: Callable | None = None


def choice(field: str, known) -> Callable[[mlc.ConfigDict], None]:
  """A Task.check: config.optim.<field> is one of `known`."""
  def check(config):
    value = config.optim[field]
    if value not in known:
      raise UserError(f"optim.{field}={value!r} is unknown; use one of {tuple(known)} "
                      f"(--config.optim.{field}=...)")
  return check


def forward(model, params, batch: dict) -> jax.Array:
  """The model on the batch keys of its task."""
  inputs = getattr(model, "inputs", None) or TASKS[model.task].inputs  # native: its own keys
  return model.apply({"params": params}, *(batch[k] for k in inputs))


def image_text_batch(config: mlc.ConfigDict, batch: int = 1) -> dict:
  """Zeros shaped like the image and text of a training batch."""
  s, t = config.data.image_size, config.data.text_len
  return {"image": jnp.zeros((batch, s, s, 3), jnp.float32), "text": jnp.zeros((batch, t), jnp.int32)}


def local_rows(x, mesh, spec) -> np.ndarray:
  """This process's rows of a batch-sharded global array."""
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


# The task modules build their records with the definitions above, so they are imported after them.
# pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.tasks import contrastive, vqa  # isort: skip
# pylint: enable=g-import-not-at-top,wrong-import-position

TASKS = {"vqa": vqa.TASK, "contrastive": contrastive.TASK}

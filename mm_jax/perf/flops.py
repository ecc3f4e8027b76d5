"""Analytic model FLOPs of a forward pass and of a train step (matmuls: models/flop_count.py says what
is counted and how the backward follows the freeze rules), from the config and the param tree.

  forward_flops(config, abstract_params) -> {"total", "by_part": {part: flops}}
  train_flops(config, abstract_params, labels) -> {"total", "forward", "backward",
                                                   "by_part": {part: {"forward", "backward", "total"}}}
Global numbers for one step of config.global_batch_size examples (batch_size= overrides; model= the
built model, else rebuilt from the config); divide by
the chip count for per chip. labels: optim.param_labels of the real param tree. The model
(models.build_model) walks its own forward (count_flops); its parts are its subtrees (encoder,
connector, cross: the cross blocks and their image k/v, decoder: the self-attention blocks, head: the
final logits, ...). A model without count_flops: ValueError (the trainer then logs no MFU).
"""
import math

import jax
import ml_collections as mlc

from mm_jax.models import build_model, stack
from mm_jax.models.flop_count import Sizes, Tally, counter
from mm_jax.models.stack import path_str
from mm_jax.tasks import TASKS


def _vocab(config, abstract_params) -> int:
  """The vocabulary the params were built with: the rows of their token embedding table."""
  tables = [x.shape[0] for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]
            if path_str(p).endswith("embedding") and len(x.shape) == 2]
  return max(tables, default=config.data.vocab_size)


def _trainable_fn(labels, forward_only: bool):
  """prefix -> whether any param at or under that module prefix is labelled trainable (always False
  for a forward count); a prefix with no param is an error (the walk no longer matches the model)."""
  flat = {path_str(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0]}

  def under(prefix: str) -> list[str]:
    return [lab for path, lab in flat.items() if path == prefix or path.startswith(prefix + "/")]

  def trainable(prefix: str) -> bool:
    # Scanned layers (models/stack.py): P/block_i/R is P/blocks/R, one label for every layer.
    hits = under(prefix) or under(stack.as_scanned(prefix))
    if not hits:
      raise ValueError(f"flops: the model has no parameter under {prefix!r}; its count_flops does "
                       "not match its param tree")
    return not forward_only and "trainable" in hits
  return trainable


def _tally(config, abstract_params, labels, batch_size, model) -> Tally:
  model = model or build_model(config.model, _vocab(config, abstract_params))
  count = counter(model)
  forward_only = labels is None
  labels = jax.tree.map(lambda _: "frozen", abstract_params) if forward_only else labels
  t = Tally(_trainable_fn(labels, forward_only))
  # the model's own rows (native: patches) or its task's (e.g. image slots inside the sequence)
  layout = getattr(model, "flop_layout", None) or TASKS[model.task].flop_layout
  sizes, kw = layout(config) if layout else (Sizes(config.data.image_size, config.data.text_len), {})
  count(t, sizes, config.global_batch_size if batch_size is None else batch_size, **kw)
  return t


def forward_flops(config: mlc.ConfigDict, abstract_params, batch_size: int | None = None,
                  model=None) -> dict:
  """Matmul FLOPs of one forward pass over the global batch: {"total", "by_part": {part: flops}}."""
  t = _tally(config, abstract_params, None, batch_size, model)
  by_part = {part: fwd for part, (fwd, _) in t.by_part.items()}
  return {"total": math.fsum(by_part.values()), "by_part": by_part}


def train_flops(config: mlc.ConfigDict, abstract_params, labels, batch_size: int | None = None,
                model=None) -> dict:
  """Matmul FLOPs of one train step over the global batch, frozen parts per `labels`
  (optim.param_labels): {"total", "forward", "backward", "by_part": {part: {forward, backward, total}}}."""
  t = _tally(config, abstract_params, labels, batch_size, model)
  by_part = {part: {"forward": f, "backward": b, "total": f + b} for part, (f, b) in t.by_part.items()}
  fwd = math.fsum(r["forward"] for r in by_part.values())
  bwd = math.fsum(r["backward"] for r in by_part.values())
  return {"total": fwd + bwd, "forward": fwd, "backward": bwd, "by_part": by_part}

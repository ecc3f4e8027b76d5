"""The optimizer: AdamW with warmup + cosine decay, and per-parameter freezing from ordered regex rules.

`config.optim.rules` is an ordered list of (regex, "trainable" | "frozen"); a parameter's path
('decoder/block_0/attn/q/kernel') takes the label of the first regex that matches it in full, and every
parameter must be matched. Frozen parameters go through optax.set_to_zero: they get no optimizer state,
and XLA drops their backward pass. Gradient clipping sits inside the trainable branch, so the frozen
gradients are never read (a global clip outside would keep the whole backward alive).
"""
import re

import jax
import ml_collections as mlc
import optax

from mm_jax.errors import UserError

LABELS = ("trainable", "frozen")


def path_str(path) -> str:
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def param_labels(params, rules) -> dict:
  """A tree of "trainable" / "frozen" labels; raises UserError for bad rules or uncovered params."""
  compiled = []
  for rule in rules:
    if len(rule) != 2 or rule[1] not in LABELS:
      raise UserError(f"optim.rules entry {tuple(rule)!r} must be (regex, 'trainable' | 'frozen')")
    try:
      compiled.append((re.compile(rule[0]), rule[1]))
    except re.error as e:
      raise UserError(f"optim.rules regex {rule[0]!r} is invalid: {e}") from None
  uncovered = []

  def label(path, _):
    name = path_str(path)
    for regex, lab in compiled:
      if regex.fullmatch(name):
        return lab
    uncovered.append(name)
    return "frozen"

  labels = jax.tree_util.tree_map_with_path(label, params)
  if uncovered:
    shown = ", ".join(uncovered[:3]) + (f" and {len(uncovered) - 3} more" if len(uncovered) > 3 else "")
    raise UserError(f"optim.rules leave {len(uncovered)} parameters uncovered ({shown}); "
                    "add a rule that matches them, e.g. ('.*', 'frozen') last")
  return labels


def schedule(cfg: mlc.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=cfg.lr * cfg.end_lr_factor)


def make_optimizer(cfg: mlc.ConfigDict, total_steps: int, labels) -> optax.GradientTransformation:
  # Weight decay on matrices only, not on norms, biases or position tables of rank 1.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  trainable = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule(cfg, total_steps), b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=decay_mask))
  return optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)

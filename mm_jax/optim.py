"""The optimizer: AdamW with warmup + cosine decay, and per-parameter freezing from ordered regex rules.

`config.optim.rules` is an ordered list of (regex, "trainable" | "frozen"); a parameter's path
('decoder/block_0/attn/q/kernel') takes the label of the first regex that matches it in full, and every
parameter must be matched. Frozen parameters go through optax.set_to_zero: they get no optimizer state,
and XLA drops their backward pass. Gradient clipping sits inside the trainable branch, so the frozen
gradients are never read (a global clip outside would keep the whole backward alive).

`config.optim.lr_scales` (ordered (regex, factor), first full match wins, default factor 1) scales the
learning rate of trainable parameters by group, e.g. (("encoder/.*", 0.1),) for a pretrained encoder
fine-tuned more gently than the rest (PaliGemma; big_vision's lr_mults). The factor multiplies the
AdamW update (weight decay included), after one global gradient clip over all trainable parameters.
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


def lr_factors(labels, scales) -> dict[str, float]:
  """'path' -> learning-rate factor for every trainable param whose factor is not 1; raises UserError
  for a malformed entry or a regex that matches no trainable parameter (a typo would be silent)."""
  compiled = []
  for entry in scales:
    if len(entry) != 2 or isinstance(entry[1], str) or not float(entry[1]) >= 0:
      raise UserError(f"optim.lr_scales entry {tuple(entry)!r} must be (regex, factor >= 0)")
    try:
      compiled.append((re.compile(entry[0]), float(entry[1])))
    except re.error as e:
      raise UserError(f"optim.lr_scales regex {entry[0]!r} is invalid: {e}") from None
  trainable = [path_str(p) for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0]
               if lab == "trainable"]
  factors, used = {}, set()
  for name in trainable:
    for regex, factor in compiled:
      if regex.fullmatch(name):
        used.add(regex.pattern)
        if factor != 1.0:
          factors[name] = factor
        break
  unused = [r.pattern for r, _ in compiled if r.pattern not in used]
  if unused:
    raise UserError(f"optim.lr_scales regex {unused[0]!r} matches no trainable parameter (or only ones "
                    "an earlier entry took); fix it or remove it")
  return factors


def _scale_by_path(factors: dict[str, float]) -> optax.GradientTransformation:
  """Multiplies the update of param 'path' by factors[path] (the frozen ones are masked out here)."""
  def update(updates, state, params=None):
    del params
    scale = lambda p, u: u * factors[path_str(p)] if path_str(p) in factors else u
    return jax.tree_util.tree_map_with_path(scale, updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def schedule(cfg: mlc.ConfigDict, total_steps: int) -> optax.Schedule:
  warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      0.0, cfg.lr, warmup, max(total_steps, warmup + 1), end_value=cfg.lr * cfg.end_lr_factor)


def make_optimizer(cfg: mlc.ConfigDict, total_steps: int, labels) -> optax.GradientTransformation:
  # Weight decay on matrices only, not on norms, biases or position tables of rank 1.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  factors = lr_factors(labels, cfg.get("lr_scales", ()))
  trainable = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule(cfg, total_steps), b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=decay_mask),
      *([_scale_by_path(factors)] if factors else []))
  return optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)

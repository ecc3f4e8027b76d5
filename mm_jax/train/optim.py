"""The optimizer: AdamW with warmup + cosine decay, and per-parameter freezing from ordered regex rules.

`config.optim.rules` is an ordered list of (regex, "trainable" | "frozen"); a parameter's path
('decoder/block_0/attn/q/kernel') takes the label of the first regex that matches it in full, and every
parameter must be matched. Frozen parameters go through optax.set_to_zero (no optimizer state, and
XLA drops their backward); clipping sits in the trainable branch, so frozen gradients are never read.

`config.optim.lr_scales` (ordered (regex, factor), first full match wins, default factor 1) scales the
learning rate of trainable parameters by group, e.g. (("encoder/.*", 0.1),) for a pretrained encoder.
The factor multiplies the AdamW update (weight decay included), after one global gradient clip over
all trainable parameters.

`config.optim.nonfinite` says what a step whose loss or trainable gradients hold a NaN or Inf does
(NONFINITE); `param_groups` names the parameter groups such a step reports (mm_jax.train.state applies both).
"""
import dataclasses
import re

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from mm_jax.errors import UserError
from mm_jax.models import stack
from mm_jax.models.stack import path_str

LABELS = ("trainable", "frozen")


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
  nonfinite_policy(cfg)  # checked with the other optim fields, before anything is written
  # Weight decay on matrices only, not on norms, biases or position tables of rank 1.
  decay_mask = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)
  factors = lr_factors(labels, cfg.lr_scales)
  trainable = optax.chain(
      optax.clip_by_global_norm(cfg.grad_clip),
      optax.adamw(schedule(cfg, total_steps), b2=cfg.b2, weight_decay=cfg.weight_decay,
                  mask=decay_mask),
      *([_scale_by_path(factors)] if factors else []))
  return optax.multi_transform({"trainable": trainable, "frozen": optax.set_to_zero()}, labels)


# "stop": the bad step's update is dropped, the run stops at the next check (and never saves after it).
# "skip": the update is dropped, the step counted, training goes on (up to max_consecutive_skips in a row).
NONFINITE = ("stop", "skip")


def nonfinite_policy(cfg: mlc.ConfigDict) -> tuple[str, int]:
  """(optim.nonfinite, optim.max_consecutive_skips), checked."""
  policy, max_skips = cfg.nonfinite, cfg.max_consecutive_skips
  if policy not in NONFINITE:
    raise UserError(f"optim.nonfinite={policy!r} is unknown; use one of {NONFINITE} "
                    "(--config.optim.nonfinite=...)")
  if isinstance(max_skips, bool) or not isinstance(max_skips, int) or max_skips < 1:
    raise UserError(f"optim.max_consecutive_skips={max_skips!r} must be an integer >= 1")
  return policy, max_skips


def _natural(name: str):
  return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


@dataclasses.dataclass(frozen=True)
class ParamGroups:
  """Parameter groups for reports: a layer ('decoder/block_1', also for a scanned stack's layer 1) or
  the first two path components ('decoder/embedder', 'connector/proj', 'encoder/pos_embedding').

  names: the groups in natural order; checked: whether each holds a trainable param; leaves: per param
  (flattened order) its groups (one per layer for a scanned param, else one) and whether it is trainable.
  """
  names: tuple[str, ...]
  checked: tuple[bool, ...]
  leaves: tuple[tuple[tuple[int, ...], bool], ...]

  def finite(self, grads) -> jax.Array:
    """bool[len(names)]: whether each group's trainable gradients are all finite. Frozen gradients are
    never read (XLA still drops their backward pass); their groups stay True."""
    flags = [jnp.bool_(True)] * len(self.names)
    for g, (groups, trainable) in zip(jax.tree.leaves(grads), self.leaves):
      if not trainable:
        continue
      if len(groups) > 1:  # scanned: one flag per layer (reducing the other axes, no reshape/reshard)
        per_layer = jnp.all(jnp.isfinite(g), axis=tuple(range(1, g.ndim)))
        for i, index in enumerate(groups):
          flags[index] = flags[index] & per_layer[i]
      else:
        flags[groups[0]] = flags[groups[0]] & jnp.all(jnp.isfinite(g))
    return jnp.stack(flags)

  def describe(self, bad) -> str:
    """The names of the bad groups, 'decoder/block_1, connector/proj'; a subtree whose checked groups
    are all bad is named alone ('encoder')."""
    bad, shown = [bool(b) for b in bad], []
    for top in dict.fromkeys(n.split("/")[0] for n in self.names):
      mine = [i for i, n in enumerate(self.names) if n.split("/")[0] == top and self.checked[i]]
      if len(mine) > 1 and all(bad[i] for i in mine):
        shown.append(top)
      else:
        shown += [self.names[i] for i in mine if bad[i]]
    return ", ".join(shown[:8]) + (f" and {len(shown) - 8} more" if len(shown) > 8 else "")


def param_groups(params, labels) -> ParamGroups:
  """The ParamGroups of `params` (arrays or ShapeDtypeStructs) labelled by param_labels."""
  per_leaf = []  # the group names of each param
  for path, x in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_str(path)
    scanned, unrolled = stack.split_scanned(name), stack.split_unrolled(name)
    if scanned and x.ndim:  # a leading axis over the layers
      per_leaf.append([stack.unrolled_path(scanned[0], i) for i in range(x.shape[0])])
    else:
      per_leaf.append([stack.unrolled_path(*unrolled[:2]) if unrolled else "/".join(name.split("/")[:2])])
  names = tuple(sorted({n for groups in per_leaf for n in groups}, key=_natural))
  index = {n: i for i, n in enumerate(names)}
  trainable = [lab == "trainable" for lab in jax.tree.leaves(labels)]
  leaves = tuple((tuple(index[n] for n in groups), t) for groups, t in zip(per_leaf, trainable))
  checked = {i for groups, t in leaves if t for i in groups}
  return ParamGroups(names, tuple(i in checked for i in range(len(names))), leaves)

"""Repeated blocks, unrolled or scanned, under a remat policy: how the encoder, the decoder and the
cross-attention blocks run their layers (config: model.encoder.* and model.decoder.* scan / remat /
remat_names; the decoder's also apply to the cross blocks).

  scan=False  modules block_0 .. block_{n-1}; XLA compiles every copy.
  scan=True   one module `blocks` whose params carry a leading "layers" axis of length n, run by
              nn.scan: one compiled body whatever the depth.

Remat, what the backward pass keeps of each block's forward (the rest is recomputed): none
(everything), full (only the block's input), dots (the outputs of the weight matmuls), custom (only
the tensors tagged with the names in remat_names, NAMES).
Param paths of the two layouts, P/block_i/R and P/blocks/R[i] (checkpoints convert between them, and
optimizer reports and FLOP counts read them, by name): split_scanned / split_unrolled take a path
apart, unrolled_path / scanned_path put one together.
"""
import re

import flax.linen as nn
import jax

from mm_jax.errors import UserError

# checkpoint_name tags set in layers.Attention and the blocks' MLPs.
NAMES = ("query", "key", "value", "attn_out", "mlp_hidden")
REMAT = ("none", "full", "dots", "custom")
LAYERS = "layers"  # the logical name of the stacked axis (no rule: replicated)

_SCANNED = re.compile(r"((?:.*/)?)blocks/(.*)")        # P/blocks/R
_UNROLLED = re.compile(r"((?:.*/)?)block_(\d+)/(.*)")  # P/block_i/R
_LAYER = re.compile(r"/block_\d+(?=/|$)")


def path_str(path) -> str:
  """A jax tree path as the param's name, 'decoder/block_0/attn/q/kernel'."""
  return "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def split_scanned(path: str) -> tuple[str, str] | None:
  """P/blocks/R -> (P/, R) (P/ empty for a top-level stack); None for a path of no scanned stack."""
  m = _SCANNED.fullmatch(path)
  return (m.group(1), m.group(2)) if m else None


def split_unrolled(path: str) -> tuple[str, int, str] | None:
  """P/block_i/R -> (P/, i, R); None for a path of no unrolled layer."""
  m = _UNROLLED.fullmatch(path)
  return (m.group(1), int(m.group(2)), m.group(3)) if m else None


def unrolled_path(prefix: str, i: int, rest: str | None = None) -> str:
  """(P/, i) -> P/block_i, the layer; with rest R, P/block_i/R."""
  return f"{prefix}block_{i}" if rest is None else f"{prefix}block_{i}/{rest}"


def scanned_path(prefix: str, rest: str) -> str:
  """(P/, R) -> P/blocks/R."""
  return f"{prefix}blocks/{rest}"


def as_scanned(path: str) -> str:
  """Every P/block_i in a path (module prefix or param) as P/blocks: where a scanned stack keeps it."""
  return _LAYER.sub("/blocks", path)


def check(section: str, remat: str, remat_names) -> None:
  """UserError for an unknown policy or tag (section: 'model.decoder' or 'model.encoder')."""
  if remat not in REMAT:
    raise UserError(f"{section}.remat={remat!r} is unknown; use one of {REMAT}")
  unknown = sorted(set(remat_names) - set(NAMES))
  if unknown:
    raise UserError(f"{section}.remat_names has unknown tags {unknown}; known: {', '.join(NAMES)}")
  if remat == "custom" and not remat_names:
    raise UserError(f"{section}.remat='custom' needs {section}.remat_names, e.g. "
                    "('attn_out', 'mlp_hidden')")


def policy(remat: str, remat_names=()):
  """The jax.checkpoint policy of a remat name (None for 'full': save nothing)."""
  if remat == "dots":
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable
  if remat == "custom":
    return jax.checkpoint_policies.save_only_these_names(*remat_names)
  return None


def remat_module(cls, remat: str, remat_names=(), scanned: bool = False):
  """The block class, rematerialised by the policy (unchanged for 'none'); params keep their names."""
  if remat == "none":
    return cls
  # Under scan the loop already stops XLA from merging recomputation with the forward (prevent_cse off).
  return nn.remat(cls, policy=policy(remat, remat_names), prevent_cse=not scanned)


def remat_fn(fn, remat: str, remat_names=()):
  """A pure function rematerialised by the policy (for the functional scans of cross_attention)."""
  if remat == "none":
    return fn
  return jax.checkpoint(fn, policy=policy(remat, remat_names), prevent_cse=False)


def scan(body, module: nn.Module, length: int, carry, *args, in_axes, remat: str = "none",
         remat_names=()):
  """Runs body(module, carry, *args) -> (carry, ys) `length` times with the module's params stacked on
  a leading "layers" axis; in_axes per arg: nn.broadcast (same every layer) or 0 (sliced per layer).
  Returns (carry, ys stacked on axis 0)."""
  if remat != "none":
    body = nn.remat(body, policy=policy(remat, remat_names), prevent_cse=False)
  scanned = nn.scan(body, variable_axes={"params": 0}, split_rngs={"params": True}, in_axes=in_axes,
                    length=length, metadata_params={nn.PARTITION_NAME: LAYERS})
  return scanned(module, carry, *args)

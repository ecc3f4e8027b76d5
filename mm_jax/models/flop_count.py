"""Matmul FLOPs, counted by each model class of itself (count_flops); mm_jax.perf.flops sums them up.

Counted: every matmul as 2 x its multiply-adds (the patch-embedding conv: a matmul of the flattened
patches; the logits head at the positions where the model computes it) and attention's two products
over the full LxS grid, masked or not. Not counted: elementwise work, gathers, remat (*model* FLOPs,
the MFU convention). Backward: for Y = A @ B of F FLOPs, F more per operand that needs a gradient: a
weight iff it is trainable, an activation iff a trainable param lies upstream (a flag per stream). So a
trainable layer costs 3F, a frozen encoder upstream of everything trainable F, a frozen LLM that the
gradient crosses to a trainable connector 2F (dX, no dW) and 3F for its attention products.

A model's count_flops(t: Tally, sizes: Sizes, batch) walks its forward in data-flow order: t.source (an
input), t.dense (x @ W, W the params under a path), t.product (activation @ activation), t.ew (no FLOPs;
carries the gradient flag); submodules count themselves (counter(m) for a pluggable one), attention()
and vit_block() count the shared layers. A part ("encoder", "head", ...) groups FLOPs in the report.
"""
import dataclasses
from typing import Callable


@dataclasses.dataclass(frozen=True)
class Sizes:
  """The input sizes a count needs, from the config (data.image_size, data.text_len)."""
  image_size: int
  text_len: int


class Tally:
  """Matmul FLOPs in data-flow order, with a needs-gradient flag per named activation stream.

  by_part: part -> [forward FLOPs, backward FLOPs]."""

  def __init__(self, trainable: Callable[[str], bool]):
    self._trainable = trainable  # module prefix -> bool (False everywhere for a forward count)
    self.grad: dict[str, bool] = {}
    self.by_part: dict[str, list[float]] = {}

  def source(self, stream: str) -> None:
    """An input (pixels, token ids): no gradient."""
    self.grad[stream] = False

  def ew(self, out: str, streams=(), params=()) -> None:
    """Elementwise (norm, bias, position table, gate, residual add, concat): no FLOPs counted."""
    self.grad[out] = (any(self.grad[s] for s in streams)
                      or any(self._trainable(p) for p in params))

  def _add(self, part: str, fwd: float, n_grads: int) -> None:
    row = self.by_part.setdefault(part, [0.0, 0.0])
    row[0] += fwd
    row[1] += fwd * n_grads

  def dense(self, part: str, path: str, x: str, out: str, tokens: int, d_in: int, d_out: int) -> None:
    """out = x @ W (+ b): W the params under `path`. Backward: dX if x needs a gradient, dW if W does."""
    gx, gw = self.grad[x], self._trainable(path)
    self._add(part, 2.0 * tokens * d_in * d_out, int(gx) + int(gw))
    self.grad[out] = gx or gw

  def product(self, part: str, a: str, b: str, out: str, flops: float) -> None:
    """out = a @ b, both activations (attention scores, weighted sum, contrastive logits)."""
    ga, gb = self.grad[a], self.grad[b]
    self._add(part, flops, int(ga) + int(gb))
    self.grad[out] = ga or gb


def counter(module) -> Callable:
  """module.count_flops; a ValueError naming the class if it has none (the trainer then logs no MFU)."""
  count = getattr(module, "count_flops", None)
  if count is None:
    raise ValueError(f"flops: no count for {type(module).__name__} (it has no count_flops method)")
  return count


def attention(t: Tally, part: str, pre: str, xq: str, xkv: str | None, out: str, b: int, lq: int,
              lk: int, d: int, n: int, k: int, h: int, qk_norm: bool = False) -> None:
  """layers.Attention (q, k, v, o under `pre`) over the full lq x lk grid, masked or not; xkv None:
  the caller set streams "k" and "v" (cross-attention: the image k/v computed once)."""
  t.dense(part, f"{pre}/q", xq, "q", b * lq, d, n * h)
  if xkv is not None:
    t.dense(part, f"{pre}/k", xkv, "k", b * lk, d, k * h)
    t.dense(part, f"{pre}/v", xkv, "v", b * lk, d, k * h)
  if qk_norm:
    t.ew("q", ["q"], [f"{pre}/q_norm"])
  t.product(part, "q", "k", "s", 2.0 * b * n * lq * lk * h)
  t.product(part, "s", "v", "pv", 2.0 * b * n * lq * lk * h)
  t.dense(part, f"{pre}/o", "pv", out, b * lq, n * h, d)


def vit_block(t: Tally, part: str, pre: str, x: str, b: int, l: int, d: int, heads: int, mlp: int,
              kv: tuple[str, int] | None = None) -> None:
  """vit.EncoderBlock on stream x (b x l tokens of width d); with kv = (stream, length) the
  connectors.ResamplerBlock form: LN'd queries cross-attend to LN'd kv."""
  t.ew("h", [x], [f"{pre}/ln_attn" if kv is None else f"{pre}/ln_q"])
  if kv is None:
    lk, kv_in = l, "h"
  else:
    t.ew("hkv", [kv[0]], [f"{pre}/ln_kv"])
    lk, kv_in = kv[1], "hkv"
  attention(t, part, f"{pre}/attn", "h", kv_in, "a", b, l, lk, d, heads, heads, d // heads)
  t.ew(x, [x, "a"])
  t.ew("h", [x], [f"{pre}/ln_mlp"])
  t.dense(part, f"{pre}/mlp_in", "h", "m", b * l, d, mlp)
  t.dense(part, f"{pre}/mlp_out", "m", "m", b * l, mlp, d)
  t.ew(x, [x, "m"])

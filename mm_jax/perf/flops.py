r"""Analytic model FLOPs of a forward pass and of a train step, from the config and the param tree.

Counted: every matmul, as 2 x its multiply-adds (2*M*K*N for an MxK @ KxN product; the patch-embedding
conv is a matmul of the flattened patches): the projections (q, k, v, o, MLPs, connectors, the logits
head where the model computes it: at the text positions in the unified family) and the two attention
products (scores q.k and the weighted sum p.v, computed over the full LxS grid, masked or not: the
model computes them in full). Not counted: elementwise work (norms, softmax,
activations, RoPE, residual adds, the loss, the optimizer update), gathers (token embedding) and
rematerialisation (these are *model* FLOPs, the MFU convention: a remat'd forward is not counted twice).

The train step: for each matmul Y = A @ B, the forward costs F = 2*M*K*N and the backward costs F more
for each operand that needs a gradient (dA = dY @ B^T, dB = A^T @ dY). A weight needs one iff it is
trainable (optim.rules on the real param tree: optim.param_labels); an activation needs one iff a
trainable param lies upstream of it (the data flow is walked in order, one flag per activation stream).
So a trainable layer costs 3F (the usual 6 * params * tokens); a frozen part upstream of everything
trainable (a frozen encoder) costs F, forward only; a frozen part that a gradient must cross to reach a
trainable one (a frozen LLM below a trainable connector, LLaVA stage 1) costs 2F for its projections
(dX, no dW) and 3F for its attention products (both operands carry a gradient).

  forward_flops(config, abstract_params) -> {"total", "by_part": {part: flops}}
  train_flops(config, abstract_params, labels) -> {"total", "forward", "backward",
                                                   "by_part": {part: {"forward", "backward", "total"}}}
Global numbers for one step of config.global_batch_size examples (batch_size= overrides); divide by
the chip count for per chip. Parts: encoder, connector, cross (cross blocks and their image k/v),
decoder (self-attention blocks), head (final logits), and for siglip map_head, text, logits.
"""
import math
import re

import jax
import ml_collections as mlc

from mm_jax.models import build_model
from mm_jax.train.optim import path_str


class _Tally:
  """Matmul FLOPs in data-flow order, with a needs-gradient flag per named activation stream."""

  def __init__(self, trainable):
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
    """out = x @ W (+ b): W the params under `path`."""
    gx, gw = self.grad[x], self._trainable(path)
    self._add(part, 2.0 * tokens * d_in * d_out, int(gx) + int(gw))
    self.grad[out] = gx or gw

  def product(self, part: str, a: str, b: str, out: str, flops: float) -> None:
    """out = a @ b, both activations (attention scores, weighted sum, contrastive logits)."""
    ga, gb = self.grad[a], self.grad[b]
    self._add(part, flops, int(ga) + int(gb))
    self.grad[out] = ga or gb


def _attention(t: _Tally, part: str, pre: str, xq: str, xkv: str, out: str, b: int, lq: int, lk: int,
               d: int, n: int, k: int, h: int, qk_norm: bool = False) -> None:
  t.dense(part, f"{pre}/q", xq, "q", b * lq, d, n * h)
  if xkv is not None:  # else the caller set streams "k", "v" (cross-attention: image k/v computed once)
    t.dense(part, f"{pre}/k", xkv, "k", b * lk, d, k * h)
    t.dense(part, f"{pre}/v", xkv, "v", b * lk, d, k * h)
  if qk_norm:
    t.ew("q", ["q"], [f"{pre}/q_norm"])
  t.product(part, "q", "k", "s", 2.0 * b * n * lq * lk * h)
  t.product(part, "s", "v", "pv", 2.0 * b * n * lq * lk * h)
  t.dense(part, f"{pre}/o", "pv", out, b * lq, n * h, d)


def _vit_block(t: _Tally, part: str, pre: str, x: str, b: int, l: int, d: int, heads: int, mlp: int,
               kv: str | None = None) -> None:
  """vit.EncoderBlock (also the SigLIP text tower's blocks); with `kv`, a resampler block."""
  t.ew("h", [x], [f"{pre}/ln_attn" if kv is None else f"{pre}/ln_q"])
  if kv is None:
    lk, kv_in = l, "h"
  else:
    t.ew("hkv", [kv[0]], [f"{pre}/ln_kv"])
    lk, kv_in = kv[1], "hkv"
  _attention(t, part, f"{pre}/attn", "h", kv_in, "a", b, l, lk, d, heads, heads, d // heads)
  t.ew(x, [x, "a"])
  t.ew("h", [x], [f"{pre}/ln_mlp"])
  t.dense(part, f"{pre}/mlp_in", "h", "m", b * l, d, mlp)
  t.dense(part, f"{pre}/mlp_out", "m", "m", b * l, mlp, d)
  t.ew(x, [x, "m"])


def _encoder(t: _Tally, enc, n_images: int, size: int, out: str) -> int:
  """vit.ViT (or fuyu's RawPatches: no FLOPs) on n_images of size x size; returns the patch count."""
  p = enc.patch_size
  patches = (size // p) ** 2
  t.source(out)
  if not hasattr(enc, "width"):  # RawPatches
    return patches
  d = enc.width
  t.dense("encoder", "encoder/patch_embed", out, out, n_images * patches, p * p * 3, d)
  t.ew(out, [out], ["encoder/pos_embedding"])
  for i in range(enc.depth):
    _vit_block(t, "encoder", f"encoder/block_{i}", out, n_images, patches, d, enc.num_heads, enc.mlp_dim)
  if enc.final_norm:
    t.ew(out, [out], ["encoder/ln_final"])
  return patches


def _connector(t: _Tally, conn, x: str, n: int, patches: int, e: int) -> int:
  """models.connectors on n x patches features of width e -> stream x at the decoder's width."""
  name, d = type(conn).__name__, conn.width
  if name == "Linear":
    t.dense("connector", "connector/proj", x, x, n * patches, e, d)
  elif name == "MLP":
    t.dense("connector", "connector/fc1", x, x, n * patches, e, d)
    t.dense("connector", "connector/fc2", x, x, n * patches, d, d)
  elif name == "PixelShuffle":
    s2 = conn.scale ** 2
    t.dense("connector", "connector/proj", x, x, n * patches // s2, s2 * e, d)
  elif name == "Resampler":
    q = conn.num_queries
    t.ew("rq", [], ["connector/queries"])
    for i in range(conn.depth):
      _vit_block(t, "connector", f"connector/block_{i}", "rq", n, q, e, conn.num_heads,
                 conn.mlp_dim or 4 * e, kv=(x, patches))
    t.ew("rq", ["rq"], ["connector/ln_final"])
    t.dense("connector", "connector/proj", "rq", x, n * q, e, d)
  else:
    raise ValueError(f"flops: no count for connector {name}")
  return conn.num_tokens(patches)


def _decoder_block(t: _Tally, dec, i: int, x: str, b: int, l: int) -> None:
  pre, d, f = f"decoder/block_{i}", dec.width, dec.mlp_dim
  t.ew("h", [x], [f"{pre}/norm_attn"])
  _attention(t, "decoder", f"{pre}/attn", "h", "h", "a", b, l, l, d, dec.num_heads, dec.num_kv_heads,
             dec.head_dim)
  t.ew(x, [x, "a"])
  t.ew("h", [x], [f"{pre}/norm_mlp"])
  t.dense("decoder", f"{pre}/gate", "h", "g", b * l, d, f)
  t.dense("decoder", f"{pre}/up", "h", "u", b * l, d, f)
  t.ew("g", ["g", "u"])
  t.dense("decoder", f"{pre}/down", "g", "m", b * l, f, d)
  t.ew(x, [x, "m"])


def _head(t: _Tally, dec, x: str, b: int, l: int) -> None:
  t.ew(x, [x], ["decoder/final_norm"])
  path = "decoder/embedder" if dec.tie_embeddings else "decoder/head"
  t.dense("head", path, x, "logits", b * l, dec.width, dec.vocab_size)


def _cross_block(t: _Tally, blk: dict, j: int, x: str, b: int, l: int, s: int) -> None:
  pre, d = f"cross/block_{j}", blk["width"]
  t.ew("h", [x], [f"{pre}/norm_attn"])
  t.ew("k", [f"img_k{j}"])
  t.ew("v", [f"img_v{j}"])
  _attention(t, "cross", pre, "h", None, "a", b, l, s, d, blk["num_heads"], blk["num_kv_heads"],
             blk["head_dim"], qk_norm=True)
  t.ew("a", ["a"], [f"{pre}/attn_gate"])
  t.ew(x, [x, "a"])
  t.ew("h", [x], [f"{pre}/norm_mlp"])
  t.dense("cross", f"{pre}/gate", "h", "g", b * l, d, blk["mlp_dim"])
  t.dense("cross", f"{pre}/up", "h", "u", b * l, d, blk["mlp_dim"])
  t.ew("g", ["g", "u"])
  t.dense("cross", f"{pre}/down", "g", "m", b * l, blk["mlp_dim"], d)
  t.ew("m", ["m"], [f"{pre}/mlp_gate"])
  t.ew(x, [x, "m"])


def _cross_kv(t: _Tally, model, img: str, b: int, s: int) -> None:
  """Every cross block's image k (normalised) and v, computed once per step."""
  blk = model.cross.block
  for j in range(model.cross.count):
    pre, kh = f"cross/block_{j}", blk["num_kv_heads"] * blk["head_dim"]
    t.dense("cross", f"{pre}/k", img, f"img_k{j}", b * s, blk["width"], kh)
    t.ew(f"img_k{j}", [f"img_k{j}"], [f"{pre}/k_norm"])
    t.dense("cross", f"{pre}/v", img, f"img_v{j}", b * s, blk["width"], kh)


def _walk(t: _Tally, model, config: mlc.ConfigDict, b: int) -> None:
  """The forward of `model` (a models.FAMILIES member) on b examples, in data-flow order."""
  size, text_len, kind = config.data.image_size, config.data.text_len, type(model).__name__
  if kind == "SigLIP":
    enc, mh, tx = model.encoder, model.map_head, model.text
    patches = _encoder(t, enc, b, size, "img")
    t.ew("probe", [], ["map_head/probe"])
    _attention(t, "map_head", "map_head/attn", "probe", "img", "img", b, 1, patches, enc.width,
               mh.num_heads, mh.num_heads, enc.width // mh.num_heads)
    t.ew("h", ["img"], ["map_head/ln_mlp"])
    t.dense("map_head", "map_head/mlp_in", "h", "m", b, enc.width, mh.mlp_dim)
    t.dense("map_head", "map_head/mlp_out", "m", "m", b, mh.mlp_dim, enc.width)
    t.ew("img", ["img", "m"])
    t.ew("txt", [], ["text/embedder", "text/pos_embedding"])
    for i in range(tx.depth):
      _vit_block(t, "text", f"text/block_{i}", "txt", b, text_len, tx.width, tx.num_heads, tx.mlp_dim)
    t.ew("txt", ["txt"], ["text/ln_final"])
    t.dense("text", "text/head", "txt", "txt", b, tx.width, tx.out_dim)
    t.product("logits", "txt", "img", "logits", 2.0 * b * b * tx.out_dim)
    return
  dec = model.decoder
  t.ew("x", [], ["decoder/embedder"])  # text embeddings (a gather: no FLOPs)
  n_img = 0
  if kind == "UnifiedVLM" and model.encoder is not None:
    patches = _encoder(t, model.encoder, b, size, "img")
    e = getattr(model.encoder, "width", model.encoder.patch_size ** 2 * 3)
    n_img = _connector(t, model.connector, "img", b, patches, e)
    t.ew("x", ["x", "img"])
  elif kind in ("CrossAttentionVLM", "HybridVLM"):
    g = getattr(model, "tiles", 1)
    tile = size // g
    patches = _encoder(t, model.encoder, b * g * g, tile, "img")
    s = g * g * _connector(t, model.connector, "img", b * g * g, patches, model.encoder.width)
    if kind == "HybridVLM":
      t.ew("img", ["img"], ["tile_embed"])
      # The thumbnail: the same encoder and connector on one (size / G)^2 image per example.
      _encoder(t, model.encoder, b, tile, "thumb")
      n_img = _connector(t, model.connector, "thumb", b, patches, model.encoder.width)
      t.ew("x", ["x", "thumb"])
    _cross_kv(t, model, "img", b, s)
  elif kind != "UnifiedVLM":
    raise ValueError(f"flops: no count for model {kind}")
  l = text_len + n_img
  for i in range(dec.depth):
    if kind != "UnifiedVLM" and i % model.cross_every == 0:
      _cross_block(t, model.cross.block, i // model.cross_every, "x", b, l, s)
    _decoder_block(t, dec, i, "x", b, l)
  # The unified model's head runs on the text positions only (models/vlm.py); hybrid's on all.
  _head(t, dec, "x", b, text_len if kind == "UnifiedVLM" else l)


def _vocab(abstract_params) -> int:
  tower = abstract_params["text"] if "text" in abstract_params else abstract_params["decoder"]
  return tower["embedder"]["embedding"].shape[0]


def _trainable_fn(labels, forward_only: bool):
  """prefix -> whether any param at or under that module prefix is labelled trainable (always False
  for a forward count); a prefix with no param is an error (the walk no longer matches the model)."""
  flat = {path_str(p): lab for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0]}

  def under(prefix: str) -> list[str]:
    return [lab for path, lab in flat.items() if path == prefix or path.startswith(prefix + "/")]

  def trainable(prefix: str) -> bool:
    # Scanned layers (models/stack.py): P/block_i/R is P/blocks/R, one label for every layer.
    hits = under(prefix) or under(re.sub(r"/block_\d+(?=/|$)", "/blocks", prefix))
    if not hits:
      raise ValueError(f"flops: the model has no parameter under {prefix!r}; mm_jax/flops.py does "
                       "not match this model's param tree")
    return not forward_only and "trainable" in hits
  return trainable


def _tally(config, abstract_params, labels, batch_size) -> _Tally:
  model = build_model(config.model, _vocab(abstract_params))
  forward_only = labels is None
  labels = jax.tree.map(lambda _: "frozen", abstract_params) if forward_only else labels
  t = _Tally(_trainable_fn(labels, forward_only))
  _walk(t, model, config, config.global_batch_size if batch_size is None else batch_size)
  return t


def forward_flops(config: mlc.ConfigDict, abstract_params, batch_size: int | None = None) -> dict:
  """Matmul FLOPs of one forward pass over the global batch: {"total", "by_part": {part: flops}}."""
  t = _tally(config, abstract_params, None, batch_size)
  by_part = {part: fwd for part, (fwd, _) in t.by_part.items()}
  return {"total": math.fsum(by_part.values()), "by_part": by_part}


def train_flops(config: mlc.ConfigDict, abstract_params, labels, batch_size: int | None = None) -> dict:
  """Matmul FLOPs of one train step over the global batch, frozen parts per `labels`
  (optim.param_labels): {"total", "forward", "backward", "by_part": {part: {forward, backward, total}}}."""
  t = _tally(config, abstract_params, labels, batch_size)
  by_part = {part: {"forward": f, "backward": b, "total": f + b} for part, (f, b) in t.by_part.items()}
  fwd = math.fsum(r["forward"] for r in by_part.values())
  bwd = math.fsum(r["backward"] for r in by_part.values())
  return {"total": fwd + bwd, "forward": fwd, "backward": bwd, "by_part": by_part}

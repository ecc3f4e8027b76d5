"""Building blocks shared by the encoder and the decoder.

Every parameter is created through `partitioned(init, names)`, so it carries logical axis names that one
table of rules (config.axis_rules) maps to mesh axes. Activations carry `act_*` names at block boundaries.
Shapes in variable names: B batch, L query length, S key length, D width, N query heads, K kv heads,
G query heads per kv head, H head dim, F mlp width.

Dtypes: every module takes `dtype` (compute) and `param_dtype`. Norms, softmax and RoPE compute in
float32 whatever the compute dtype; the residual stream stays in the compute dtype.
"""
import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

Array = jax.Array
DType = Any


def partitioned(init, names: tuple[str | None, ...]):
  """An initializer whose params carry logical axis names (boxed as nn.LogicallyPartitioned)."""
  return nn.with_logical_partitioning(init, names)


def constrain(x: Array, names: tuple[str | None, ...]) -> Array:
  """Shards an activation by logical names (a no-op outside a mesh / rules context)."""
  return nn.with_logical_constraint(x, names)


def make_attn_mask(input_mask_BxL: Array, mask_ar_BxL: Array, segment_BxL: Array | None = None) -> Array:
  """Prefix-LM / causal / bidirectional attention mask from two per-token masks (big_vision convention).

  Token q attends to token k iff k is a real token and cumsum(mask_ar)[k] <= cumsum(mask_ar)[q].
  mask_ar = 0 puts a token in the same block as the one before it (they see each other), 1 starts a new
  block that sees only earlier blocks. Examples (L = 6):
    [0 0 0 1 1 1]  image + prefix see each other fully; the suffix is causal and sees the prefix
                   (PaliGemma); the prefix never sees the suffix.
    [1 1 1 1 1 1]  plain causal.      [0 0 0 0 0 0]  fully bidirectional.
  Padding: input_mask = 0 (and mask_ar = 1), so no real token attends to it.

  Packing: with segment_BxL (the example of each token, 1, 2, ...; 0 on padding) q also needs
  segment[q] == segment[k]. The cumsum runs over the whole row, but two tokens of one example compare
  blocks that differ from a per-example cumsum by the same offset, so each example keeps its own
  prefix-LM blocks; an example opening with mask_ar 0 would join the last block of the one before, and
  the segment term is what keeps it out. A padding query (segment 0) keeps the unsegmented mask, so no
  query row is all masked (its output is never scored).

  Returns: bool BxLxL, [b, q, k].
  """
  blocks_BxL = jnp.cumsum(mask_ar_BxL, axis=1)
  mask_BxLxL = (blocks_BxL[:, None, :] <= blocks_BxL[:, :, None]) & (input_mask_BxL[:, None, :] > 0)
  if segment_BxL is not None:
    q_BxLx1 = segment_BxL[:, :, None]
    mask_BxLxL = mask_BxLxL & ((segment_BxL[:, None, :] == q_BxLx1) | (q_BxLx1 == 0))
  return mask_BxLxL


def insert_tokens(seq_BxTx_: Array, tokens_BxNx_: Array, k: int) -> Array:
  """seq with the N tokens inserted before its position k (image tokens at image_position): BxT+Nx..."""
  return jnp.concatenate([seq_BxTx_[:, :k], tokens_BxNx_, seq_BxTx_[:, k:]], axis=1)


def drop_tokens(seq_BxLx_: Array, k: int, n: int) -> Array:
  """seq without its n positions from k (insert_tokens undone): BxL-Nx..."""
  return jnp.concatenate([seq_BxLx_[:, :k], seq_BxLx_[:, k + n:]], axis=1)


def scatter_tokens(seq_BxLxD: Array, tokens_BxMxNxD: Array, pos_BxM: Array) -> Array:
  """seq with tokens[:, m] written over its positions [pos[m], pos[m] + N): each image's tokens into the
  slots the row holds for them. A slot at or past L (an empty image: pos = L) falls off (mode="drop").
  Both laid out as activations first: the partitioner otherwise took the embedding lookup's layout
  (batch replicated) for the scatter and gathered the image tokens of the whole batch."""
  b, m, n, d = tokens_BxMxNxD.shape
  names = ("act_batch", "act_len", "act_embed")
  seq_BxLxD = constrain(seq_BxLxD, names)
  tokens_BxMNxD = constrain(tokens_BxMxNxD.reshape(b, m * n, d).astype(seq_BxLxD.dtype), names)
  at_BxMN = (pos_BxM[:, :, None] + jnp.arange(n)).reshape(b, m * n)
  rows_Bx1 = jnp.arange(b)[:, None]
  return constrain(seq_BxLxD.at[rows_Bx1, at_BxMN].set(tokens_BxMNxD, mode="drop"), names)


def fill_placeholders(x_BxLxD: Array, text_BxL: Array, tokens_BxNxD: Array, ids: tuple[int, ...]) -> Array:
  """x with the k-th placeholder of each row replaced by that row's k-th token (a gather: each
  position reads its token; rows hold at most N placeholders, the data path's count)."""
  is_ph_BxL = jnp.isin(text_BxL, jnp.asarray(ids, text_BxL.dtype))
  k_BxL = jnp.clip(jnp.cumsum(is_ph_BxL, axis=1) - 1, 0, tokens_BxNxD.shape[1] - 1)
  picked_BxLxD = jnp.take_along_axis(tokens_BxNxD.astype(x_BxLxD.dtype), k_BxL[..., None], axis=1)
  return constrain(jnp.where(is_ph_BxL[..., None], picked_BxLxD, x_BxLxD),
                   ("act_batch", "act_len", "act_embed"))


def row_positions(tokens_BxL: Array, positions_BxL: Array | None = None) -> Array:
  """positions_BxL if given (RoPE positions restarting per packed example), else the row's indices
  0 .. L-1 (one example per row)."""
  if positions_BxL is not None:
    return positions_BxL
  return jnp.broadcast_to(jnp.arange(tokens_BxL.shape[1]), tokens_BxL.shape[:2])


@dataclasses.dataclass(frozen=True)
class Rope:
  """RoPE frequencies: theta, and optionally Llama 3's long-context scaling (type "llama3").

  Positions with several axes (BxLxA: Qwen2-VL's M-RoPE (t, h, w), a native-resolution ViT's (row,
  column)) rotate each frequency pair by one axis: `sections` gives how many of the H/2 pairs each axis
  takes, in order. type "default" keeps one frequency table over H (M-RoPE: the first 16 pairs by t,
  the next 24 by h ...); type "axial" restarts the table per axis (a ViT's 2D RoPE: rows and columns
  get the same frequencies)."""
  theta: float = 10_000.0
  type: str = "default"  # "default" | "llama3" | "axial"
  factor: float = 8.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192
  sections: tuple[int, ...] = ()

  def inv_freq(self, head_dim: int) -> np.ndarray:
    if self.sections and sum(self.sections) != head_dim // 2:
      raise ValueError(f"rope sections {self.sections} must sum to head_dim / 2 = {head_dim // 2}")
    if self.type == "axial":
      if not self.sections:
        raise ValueError("rope type 'axial' needs sections (the frequency pairs of each axis)")
      return np.concatenate([Rope(self.theta).inv_freq(2 * s) for s in self.sections])
    inv = 1.0 / self.theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    if self.type == "default":
      return inv.astype(np.float32)
    if self.type != "llama3":
      raise ValueError(f"unknown rope type {self.type!r}; known: default, llama3, axial")
    # Llama 3: long wavelengths are divided by `factor`, short ones kept, a smooth blend between.
    wavelen = 2 * np.pi / inv
    low_wavelen = self.original_max_len / self.low_freq_factor
    high_wavelen = self.original_max_len / self.high_freq_factor
    smooth = ((self.original_max_len / wavelen - self.low_freq_factor)
              / (self.high_freq_factor - self.low_freq_factor))
    blended = (1 - smooth) * inv / self.factor + smooth * inv
    out = np.where(wavelen > low_wavelen, inv / self.factor, inv)
    mid = (wavelen <= low_wavelen) & (wavelen >= high_wavelen)
    return np.where(mid, blended, out).astype(np.float32)


def apply_rope(x_BxLxNxH: Array, positions_BxL: Array, rope: "Rope | float") -> Array:
  """Rotary embedding, half-split pairing (dim i rotates with i + H/2), as Gemma/Llama in HF.
  positions BxL, or BxLxA with rope.sections (one position per axis; BxL: the same on every axis,
  as text tokens under M-RoPE)."""
  rope = rope if isinstance(rope, Rope) else Rope(theta=rope)
  inv_freq = jnp.asarray(rope.inv_freq(x_BxLxNxH.shape[-1]))
  pos = positions_BxL.astype(jnp.float32)
  if rope.sections:  # each frequency pair takes its axis's position
    axis_H2 = np.repeat(np.arange(len(rope.sections)), rope.sections)
    pos_BxLxA = pos if pos.ndim == 3 else jnp.broadcast_to(pos[..., None], (*pos.shape, len(rope.sections)))
    angles_BxLxH2 = pos_BxLxA[..., axis_H2] * inv_freq
  else:
    angles_BxLxH2 = pos[..., None] * inv_freq
  angles_BxLx1xH2 = angles_BxLxH2[:, :, None, :]
  sin, cos = jnp.sin(angles_BxLx1xH2), jnp.cos(angles_BxLx1xH2)
  x1, x2 = jnp.split(x_BxLxNxH.astype(jnp.float32), 2, axis=-1)
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_BxLxNxH.dtype)


class RMSNorm(nn.Module):
  """RMSNorm in the two forms of HF, normalised in float32:
    "gemma": (x * rsqrt(mean(x^2) + eps) * (1 + w)).astype(x.dtype), w initialised to 0;
    "llama": w * (x * rsqrt(mean(x^2) + eps)).astype(x.dtype), w initialised to 1.
  """
  eps: float = 1e-6
  form: str = "gemma"
  param_dtype: DType = jnp.float32
  axis: str = "embed"  # the logical name of the normalised dim ("head_dim" for per-head q/k norms)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.form not in ("gemma", "llama"):
      raise ValueError(f"unknown norm {self.form!r}; known: gemma, llama")
    init = nn.initializers.zeros_init() if self.form == "gemma" else nn.initializers.ones_init()
    w = self.param("scale", partitioned(init, (self.axis,)), (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.form == "gemma":
      return (y * (1.0 + w.astype(jnp.float32))).astype(x.dtype)
    return w.astype(x.dtype) * y.astype(x.dtype)


def layer_norm(name: str, eps: float = 1e-6, dtype: DType = jnp.float32,
               param_dtype: DType = jnp.float32) -> nn.LayerNorm:
  """LayerNorm with statistics in float32, output in `dtype`."""
  return nn.LayerNorm(
      epsilon=eps, name=name, dtype=dtype, param_dtype=param_dtype,
      scale_init=partitioned(nn.initializers.ones_init(), ("embed",)),
      bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)))


class Projection(nn.Module):
  """y = x @ W over the last `n_in` dims of x, W of shape x.shape[-n_in:] + out_shape named `names`.

  Computed as one 2-D matmul over the flattened leading dims: on XLA:CPU the 3-D form's backward
  chose transposed layouts that cost ~2x the step (see experiments/README.md). (nn.DenseGeneral is
  not used: it builds its kernel flat and reshapes it, which breaks logical constraints.)
  """
  out_shape: tuple[int, ...]
  names: tuple[str | None, ...]
  n_in: int = 1
  use_bias: bool = False
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x: Array, weights_only: bool = False):
    """y = x @ W (+ b); weights_only: (W as a 2-D in x out matrix, b flat or None), nothing computed
    (fused_projections applies several at once)."""
    in_shape, out_shape = tuple(x.shape[-self.n_in:]), tuple(self.out_shape)
    init = nn.initializers.lecun_normal(in_axis=tuple(range(self.n_in)),
                                        out_axis=tuple(range(self.n_in, self.n_in + len(out_shape))))
    w = self.param("kernel", partitioned(init, self.names), in_shape + out_shape, self.param_dtype)
    w2 = w.reshape(math.prod(in_shape), -1).astype(self.dtype)
    b = None
    if self.use_bias:
      b = self.param("bias", partitioned(nn.initializers.zeros_init(), self.names[self.n_in:]),
                     out_shape, self.param_dtype).reshape(-1).astype(self.dtype)
    if weights_only:
      return w2, b
    lead = x.shape[:-self.n_in]
    y = (x.reshape(-1, math.prod(in_shape)).astype(self.dtype) @ w2).reshape(lead + out_shape)
    return y if b is None else y + b.reshape(out_shape)


def _tensor_parallel() -> bool:
  mesh = jax.sharding.get_abstract_mesh()
  return not mesh.empty and dict(mesh.shape).get("tensor", 1) > 1


def fused_projections(x: Array, projections) -> list[Array]:
  """[p(x) for p in projections] (Projections of one input, n_in 1) as one matmul of the concatenated
  kernels (q/k/v; an MLP's gate/up): the input is read once, one wider matmul forward and for dX
  (params keep their names and shapes). Under tensor parallelism each runs alone (concatenating
  tensor-sharded kernels would reshard them)."""
  if len(projections) == 1 or _tensor_parallel():
    return [p(x) for p in projections]
  ws, bs = zip(*(p(x, weights_only=True) for p in projections))
  y = x.reshape(-1, x.shape[-1]).astype(ws[0].dtype) @ jnp.concatenate(ws, axis=1)
  if bs[0] is not None:
    y = y + jnp.concatenate(bs)
  splits = np.cumsum([w.shape[1] for w in ws])[:-1]
  return [part.reshape(x.shape[:-1] + tuple(p.out_shape))
          for part, p in zip(jnp.split(y, splits, axis=1), projections)]


def attend(q_BxLxNxH: Array, k_BxSxKxH: Array, v_BxSxKxH: Array, mask_BxLxS: Array) -> Array:
  """Grouped-query softmax attention (logits and softmax in float32), scale head_dim^-0.5; query head i
  uses kv head i // G, as HF.

  Laid out for XLA:CPU: a query head group's L x G rows are one M dimension (BxKx(LG)xH), so both
  products are plain batched matmuls whose outputs need no transposes of the big score tensors (the
  bench step: 0.87x the CPU time of a 5-D einsum ordered BKGLS, then 0.95x that of
  jax.nn.dot_product_attention); only q, k, v and the output (small) are transposed.

  On an NVIDIA GPU, in bfloat16/float16, cuDNN's fused attention instead (jax.nn.dot_product_attention):
  the scores never reach memory (configs/bench_1b.py on an H100: MFU 0.408 -> 0.421 with dots remat,
  0.373 -> 0.391 with full remat; experiments/README.md)."""
  if _cudnn_attention(q_BxLxNxH.dtype, q_BxLxNxH.shape[-1]):
    (b, l), s = q_BxLxNxH.shape[:2], k_BxSxKxH.shape[1]
    mask_Bx1xLxS = jnp.broadcast_to(mask_BxLxS, (b, l, s))[:, None]
    return jax.nn.dot_product_attention(q_BxLxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xLxS,
                                        implementation="cudnn")
  return attend_kv_major(q_BxLxNxH, k_BxSxKxH.transpose(0, 2, 1, 3), v_BxSxKxH.transpose(0, 2, 1, 3),
                         mask_BxLxS)


@functools.cache
def _on_cuda() -> bool:
  device = jax.devices()[0]
  return device.platform == "gpu" and "cuda" in getattr(device.client, "platform_version", "").lower()


def _cudnn_attention(dtype, head_dim: int) -> bool:
  """Whether attend() uses cuDNN: CUDA devices, half-precision compute, a head_dim cuDNN supports."""
  return (jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16) and head_dim % 8 == 0 and head_dim <= 256
          and _on_cuda())


def attend_kv_major(q_BxLxNxH: Array, k_BxKxSxH: Array, v_BxKxSxH: Array, mask_BxLxS: Array) -> Array:
  """attend() on keys and values laid out BxKxSxH, as the KV cache keeps them: a decode step then
  transposes only its new token's k/v, not the whole cache (bench_decode: see experiments/README.md)."""
  (b, l, n, h), (k, s) = q_BxLxNxH.shape, k_BxKxSxH.shape[1:3]
  g = n // k
  q_BxKxMxH = q_BxLxNxH.reshape(b, l, k, g, h).transpose(0, 2, 1, 3, 4).reshape(b, k, l * g, h)
  logits_BxKxMxS = jnp.einsum("bkmh,bksh->bkms", q_BxKxMxH, k_BxKxSxH,
                              preferred_element_type=jnp.float32) * h ** -0.5
  logits_BxKxLxGxS = jnp.where(mask_BxLxS[:, None, :, None, :], logits_BxKxMxS.reshape(b, k, l, g, s),
                               jnp.finfo(jnp.float32).min)
  probs_BxKxMxS = jax.nn.softmax(logits_BxKxLxGxS, axis=-1).astype(v_BxKxSxH.dtype).reshape(b, k, l * g, s)
  out_BxKxMxH = jnp.einsum("bkms,bksh->bkmh", probs_BxKxMxS, v_BxKxSxH)
  return out_BxKxMxH.reshape(b, k, l, g, h).transpose(0, 2, 1, 3, 4).reshape(b, l, n, h)


class Attention(nn.Module):
  """Multi-head attention with grouped-query heads, optional RoPE and an optional KV cache.

  The mask is given by the caller ([b, q, k], True = may attend), so one module serves bidirectional
  (ViT), prefix-LM and causal attention, and cached decoding.
  """
  num_heads: int
  num_kv_heads: int
  head_dim: int
  use_bias: bool = False
  rope: Rope | None = None
  out_bias: bool | None = None  # None: as use_bias (Qwen2: biases on q, k, v only)
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def _proj(self, n: int, heads_name: str, name: str) -> "Projection":
    return Projection((n, self.head_dim), ("embed", heads_name, "head_dim"), use_bias=self.use_bias,
                      dtype=self.dtype, param_dtype=self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x_BxLxD: Array, mask_BxLxS: Array, positions_BxL: Array | None = None,
               cache: dict[str, Array] | None = None, cache_index: Any = None,
               kv_BxSxD: Array | None = None):
    """Returns (y_BxLxD, new_cache). With a cache, k/v are written at slots [cache_index, +L) of the
    cache (k/v: BxKxSxH) and queries attend over all S slots under the mask. With kv_BxSxD, keys and
    values come from it instead of x (attention pooling: one learned query over the features)."""
    n, k = self.num_heads, self.num_kv_heads
    if n % k:
      raise ValueError(f"num_heads={n} must be a multiple of num_kv_heads={k}")
    q, kp, vp = self._proj(n, "heads", "q"), self._proj(k, "kv_heads", "k"), self._proj(k, "kv_heads", "v")
    if kv_BxSxD is None:
      q_BxLxNxH, k_BxLxKxH, v_BxLxKxH = fused_projections(x_BxLxD, (q, kp, vp))
    else:
      q_BxLxNxH = q(x_BxLxD)
      k_BxLxKxH, v_BxLxKxH = fused_projections(kv_BxSxD, (kp, vp))
    if self.rope is not None:
      q_BxLxNxH = apply_rope(q_BxLxNxH, positions_BxL, self.rope)
      k_BxLxKxH = apply_rope(k_BxLxKxH, positions_BxL, self.rope)
    # Tags for remat "custom" (models/stack.py).
    q_BxLxNxH = checkpoint_name(q_BxLxNxH, "query")
    k_BxLxKxH, v_BxLxKxH = checkpoint_name(k_BxLxKxH, "key"), checkpoint_name(v_BxLxKxH, "value")

    if cache is None:
      new_cache, out_BxLxNxH = None, attend(q_BxLxNxH, k_BxLxKxH, v_BxLxKxH, mask_BxLxS)
    else:  # the cache is BxKxSxH: only the new slots are transposed
      start = (0, 0, cache_index, 0)
      put = lambda c, x_BxLxKxH: jax.lax.dynamic_update_slice(
          c, x_BxLxKxH.transpose(0, 2, 1, 3).astype(c.dtype), start)
      new_cache = {"k": put(cache["k"], k_BxLxKxH), "v": put(cache["v"], v_BxLxKxH)}
      out_BxLxNxH = attend_kv_major(q_BxLxNxH, new_cache["k"], new_cache["v"], mask_BxLxS)
    out_BxLxNxH = constrain(out_BxLxNxH, ("act_batch", "act_len", "act_heads", None))
    out_BxLxNxH = checkpoint_name(out_BxLxNxH, "attn_out")
    y_BxLxD = Projection((x_BxLxD.shape[-1],), ("heads", "head_dim", "embed"), n_in=2,
                         use_bias=self.use_bias if self.out_bias is None else self.out_bias,
                         dtype=self.dtype, param_dtype=self.param_dtype, name="o")(out_BxLxNxH)
    return y_BxLxD, new_cache


def dense(features: int, names: tuple[str, str], name: str, use_bias: bool = True,
          dtype: DType = jnp.float32, param_dtype: DType = jnp.float32) -> Projection:
  return Projection((features,), names, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype,
                    name=name)


ACTIVATIONS = {
    "gelu_tanh": lambda x: nn.gelu(x, approximate=True),  # HF "gelu_pytorch_tanh"
    "gelu": lambda x: nn.gelu(x, approximate=False),      # HF "gelu": exact, erf
    "silu": nn.silu,
    "quick_gelu": lambda x: x * nn.sigmoid(1.702 * x),  # HF "quick_gelu" (CLIP, Qwen2-VL's ViT)
}

"""Connectors: encoder features BxPxE -> decoder-width tokens BxNxD, N = num_tokens(P).

Chosen by name from CONNECTORS (config `model.connector`); each one's own fields come from
`model.connector_options.<name>`. Patches arrive in row-major order of a square grid (vit.ViT).
Each counts its FLOPs: count_flops(t, pre, x, n, patches, e) on n x patches features of width e in
stream x (left at the decoder's width) -> its token count per image.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.errors import UserError
from mm_jax.models import flop_count
from mm_jax.models.layers import ACTIVATIONS, Attention, DType, constrain, dense, layer_norm, partitioned

Array = jax.Array


class Linear(nn.Module):
  """One linear layer with bias (LLaVA-1.0, PaliGemma): one token per patch."""
  width: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def num_tokens(self, num_patches: int) -> int:
    return num_patches

  @nn.compact
  def __call__(self, x_BxPxE: Array) -> Array:
    # "embed_in" (not "embed"): a param may not carry one logical name twice.
    return dense(self.width, ("embed_in", "embed"), "proj", dtype=self.dtype,
                 param_dtype=self.param_dtype)(x_BxPxE)

  def count_flops(self, t: flop_count.Tally, pre: str, x: str, n: int, patches: int, e: int) -> int:
    t.dense(pre, f"{pre}/proj", x, x, n * patches, e, self.width)
    return self.num_tokens(patches)


class MLP(nn.Module):
  """Two linear layers with bias and an exact GELU between (LLaVA-1.5: fc1 E->D, fc2 D->D)."""
  width: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def num_tokens(self, num_patches: int) -> int:
    return num_patches

  @nn.compact
  def __call__(self, x_BxPxE: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = ACTIVATIONS["gelu"](dense(self.width, ("embed_in", "embed"), "fc1", **kw)(x_BxPxE))
    return dense(self.width, ("mlp", "embed"), "fc2", **kw)(h)

  def count_flops(self, t: flop_count.Tally, pre: str, x: str, n: int, patches: int, e: int) -> int:
    t.dense(pre, f"{pre}/fc1", x, x, n * patches, e, self.width)
    t.dense(pre, f"{pre}/fc2", x, x, n * patches, self.width, self.width)
    return self.num_tokens(patches)


class ResamplerBlock(nn.Module):
  """Pre-LN: q += cross_attn(LN(q), LN(x)); q += MLP(LN(q)). Queries never see each other."""
  num_heads: int
  mlp_dim: int
  norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, q_BxQxE: Array, x_BxPxE: Array) -> Array:
    e = q_BxQxE.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = Attention(self.num_heads, self.num_heads, e // self.num_heads, use_bias=True, name="attn", **kw)
    all_BxQxP = jnp.ones((q_BxQxE.shape[0], 1, 1), bool)  # every query sees every patch
    y, _ = attn(layer_norm("ln_q", self.norm_eps, **kw)(q_BxQxE), all_BxQxP,
                kv_BxSxD=layer_norm("ln_kv", self.norm_eps, **kw)(x_BxPxE))
    q_BxQxE = q_BxQxE + y
    y = layer_norm("ln_mlp", self.norm_eps, **kw)(q_BxQxE)
    y = dense(self.mlp_dim, ("embed", "mlp"), "mlp_in", **kw)(y)
    y = constrain(ACTIVATIONS["gelu_tanh"](y), ("act_batch", "act_len", "act_mlp"))
    q_BxQxE = q_BxQxE + dense(e, ("mlp", "embed"), "mlp_out", **kw)(y)
    return constrain(q_BxQxE, ("act_batch", "act_len", "act_embed"))


class Resampler(nn.Module):
  """Learned-query resampler (Perceiver resampler / Q-Former style): num_queries tokens whatever P.

  Q learned queries at the encoder's width E cross-attend to the features in `depth` pre-LN blocks, then
  a final LN and a linear projection E -> D. No position embedding on the queries: they are distinct
  params already, and the patches carry the encoder's positions.
  """
  width: int
  num_queries: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 0  # 0: 4x the encoder width
  norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def num_tokens(self, num_patches: int) -> int:
    del num_patches  # a fixed count: the point of a resampler
    return self.num_queries

  @nn.compact
  def __call__(self, x_BxPxE: Array) -> Array:
    b, _, e = x_BxPxE.shape
    if e % self.num_heads:
      raise UserError(f"model.connector_options.resampler.num_heads={self.num_heads} must divide the "
                      f"encoder width {e}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    queries_QxE = self.param("queries", partitioned(nn.initializers.normal(stddev=e ** -0.5),
                                                    ("queries", "embed")),
                             (self.num_queries, e), self.param_dtype)
    q_BxQxE = jnp.broadcast_to(queries_QxE.astype(self.dtype)[None], (b, self.num_queries, e))
    for i in range(self.depth):
      q_BxQxE = ResamplerBlock(self.num_heads, self.mlp_dim or 4 * e, self.norm_eps, name=f"block_{i}",
                               **kw)(q_BxQxE, x_BxPxE)
    q_BxQxE = layer_norm("ln_final", self.norm_eps, **kw)(q_BxQxE)
    return dense(self.width, ("embed_in", "embed"), "proj", **kw)(q_BxQxE)

  def count_flops(self, t: flop_count.Tally, pre: str, x: str, n: int, patches: int, e: int) -> int:
    q = self.num_queries
    t.ew("rq", [], [f"{pre}/queries"])
    for i in range(self.depth):
      flop_count.vit_block(t, pre, f"{pre}/block_{i}", "rq", n, q, e, self.num_heads,
                           self.mlp_dim or 4 * e, kv=(x, patches))
    t.ew("rq", ["rq"], [f"{pre}/ln_final"])
    t.dense(pre, f"{pre}/proj", "rq", x, n * q, e, self.width)
    return self.num_tokens(patches)


def grid_side(num_patches: int, scale: int) -> int:
  """The side of the square patch grid, checked to be a multiple of `scale`."""
  side = math.isqrt(num_patches)
  if side * side != num_patches or side % scale:
    raise UserError(f"pixel shuffle needs a square patch grid whose side is a multiple of "
                    f"model.connector_options.pixel_shuffle.scale={scale}; got {num_patches} patches "
                    "(set the scale, or image_size / patch_size)")
  return side


def pixel_shuffle(x_BxPxE: Array, scale: int) -> Array:
  """Idefics3's fold: token (I, J) = concat over r, c in [0, s) of x[I*s + r, J*s + c] (r, then c, then E)."""
  b, p, e = x_BxPxE.shape
  g, s = grid_side(p, scale), scale
  x = x_BxPxE.reshape(b, g // s, s, g // s, s, e).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, p // (s * s), s * s * e)


class PixelShuffle(nn.Module):
  """s x s neighbouring patches folded into one token (s^2 fewer), then a linear map s^2*E -> D without
  bias (Idefics3 / SmolVLM's connector)."""
  width: int
  scale: int = 2
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def num_tokens(self, num_patches: int) -> int:
    grid_side(num_patches, self.scale)
    return num_patches // self.scale ** 2

  @nn.compact
  def __call__(self, x_BxPxE: Array) -> Array:
    x_BxNxF = constrain(pixel_shuffle(x_BxPxE, self.scale), ("act_batch", "act_len", None))
    return dense(self.width, ("embed_in", "embed"), "proj", use_bias=False, dtype=self.dtype,
                 param_dtype=self.param_dtype)(x_BxNxF)

  def count_flops(self, t: flop_count.Tally, pre: str, x: str, n: int, patches: int, e: int) -> int:
    s2 = self.scale ** 2
    t.dense(pre, f"{pre}/proj", x, x, n * patches // s2, s2 * e, self.width)
    return self.num_tokens(patches)


class Merger(nn.Module):
  """Qwen2-VL's patch merger: LN over each patch feature, then every merge^2 consecutive features (one
  merge window, in native_vit's patch order) concatenated and mapped by Linear, exact GELU, Linear to
  the decoder's width: P / merge^2 tokens."""
  width: int
  merge: int = 2
  norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def num_tokens(self, num_patches: int) -> int:
    return num_patches // self.merge ** 2

  @nn.compact
  def __call__(self, x_BxPxE: Array) -> Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    (b, p, e), m2 = x_BxPxE.shape, self.merge ** 2
    x_BxPxE = layer_norm("ln_q", self.norm_eps, **kw)(x_BxPxE)
    x_BxNxF = constrain(x_BxPxE.reshape(b, p // m2, m2 * e), ("act_batch", "act_len", None))
    h = ACTIVATIONS["gelu"](dense(m2 * e, ("embed_in", "mlp"), "fc1", **kw)(x_BxNxF))
    return dense(self.width, ("mlp", "embed"), "fc2", **kw)(h)

  def count_flops(self, t: flop_count.Tally, pre: str, x: str, n: int, patches: int, e: int) -> int:
    m2 = self.merge ** 2
    t.ew(x, [x], [f"{pre}/ln_q"])
    t.dense(pre, f"{pre}/fc1", x, x, n * patches // m2, m2 * e, m2 * e)
    t.dense(pre, f"{pre}/fc2", x, x, n * patches // m2, m2 * e, self.width)
    return self.num_tokens(patches)


CONNECTORS = {"linear": Linear, "mlp": MLP, "resampler": Resampler, "pixel_shuffle": PixelShuffle,
              "merger": Merger}

"""Llama 3.2 Vision's tiled image encoder (HF MllamaVisionModel), as its weights compute it.

  image N x T x H x W x C (T = max_num_tiles tiles of H x W), aspect-ratio id N -> features
  N x (T * P1) x D * (1 + K), P1 = 1 + patches per tile (a CLS token per tile), K intermediate layers
Per tile: conv patches (no bias) + a per-tile embedding of the aspect ratio (pre_tile, gated), a CLS
token, positions gated against a per-(aspect ratio, tile, token) table, LayerNorm; each tile padded to a
multiple of 8 tokens. Then all tiles of an image are ONE sequence: `depth` ungated blocks, LayerNorm,
the post_tile embedding, `global_depth` blocks with tanh-gated branches. The mask blocks only pad<->pad
pairs (padding tokens and the tiles the aspect ratio leaves empty): real tokens see them, as in HF.
The output is the global stack's, then the local blocks' outputs at `intermediate_layers` interleaved
feature by feature (HF stacks them on a last axis), padding stripped. An image given as one tile
(N x H x W x C) is tile 0 of aspect ratio (1, 1), the other tiles zero, as HF's processor pads.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.models import flop_count, stack
from mm_jax.models.layers import ACTIVATIONS, Attention, DType, constrain, dense, layer_norm, partitioned

Array = jax.Array
_LN_EPS = 1e-5  # layernorm_pre / layernorm_post: nn.LayerNorm's default, not norm_eps


class MllamaBlock(nn.Module):
  """Pre-LN block, q/k/v/o without bias; gated: x += tanh(g) * branch (the global stack's)."""
  num_heads: int
  mlp_dim: int
  norm_eps: float = 1e-5
  mlp_act: str = "gelu"
  gated: bool = False
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD: Array, mask_BxLxL: Array) -> Array:
    d = x_BxLxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    zero = partitioned(nn.initializers.zeros_init(), ())
    gate = ((lambda name: jnp.tanh(self.param(name, zero, (), self.param_dtype).astype(jnp.float32))
             .astype(self.dtype)) if self.gated else (lambda name: 1.0))
    attn = Attention(self.num_heads, self.num_heads, d // self.num_heads, use_bias=False, name="attn", **kw)
    y_BxLxD, _ = attn(layer_norm("ln_attn", self.norm_eps, **kw)(x_BxLxD), mask_BxLxL)
    x_BxLxD = x_BxLxD + gate("gate_attn") * y_BxLxD
    h_BxLxF = dense(self.mlp_dim, ("embed", "mlp"), "mlp_in", **kw)(
        layer_norm("ln_mlp", self.norm_eps, **kw)(x_BxLxD))
    y_BxLxD = dense(d, ("mlp", "embed"), "mlp_out", **kw)(ACTIVATIONS[self.mlp_act](h_BxLxF))
    return constrain(x_BxLxD + gate("gate_mlp") * y_BxLxD, ("act_batch", "act_len", "act_embed"))


class MllamaViT(nn.Module):
  """See the module docstring. aspect_ratios: HF's supported_aspect_ratios ((rows, cols) per id - 1)."""
  patch_size: int
  width: int
  depth: int
  global_depth: int
  num_heads: int
  mlp_dim: int
  image_size: int
  max_num_tiles: int = 4
  aspect_ratios: tuple = ((1, 1), (1, 2), (1, 3), (1, 4), (2, 1), (2, 2), (3, 1), (4, 1))
  intermediate_layers: tuple = (3, 7, 15, 23, 30)
  norm_eps: float = 1e-5
  mlp_act: str = "gelu"
  remat: str = "none"  # models/stack.py; per block (the tower is not scanned: its blocks differ)
  remat_names: tuple[str, ...] = ()
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  tiled = True  # CrossAttentionVLM passes aspect-ratio ids and reads the tile mask

  @property
  def tokens_per_tile(self) -> int:
    return (self.image_size // self.patch_size) ** 2 + 1

  @property
  def out_width(self) -> int:
    return self.width * (1 + len(self.intermediate_layers))

  def num_patches(self, image_shape: tuple[int, ...]) -> int:
    return self.max_num_tiles * self.tokens_per_tile

  def default_id(self) -> int:
    """The aspect-ratio id of a one-tile image: (1, 1)'s (id 0 is HF's padding image)."""
    return [tuple(a) for a in self.aspect_ratios].index((1, 1)) + 1

  def tile_mask(self, ids_N: Array) -> Array:
    """N x T bool: the tiles an aspect ratio fills (the padding id 0: tile 0, as HF's processor)."""
    tiles = jnp.asarray([1] + [h * w for h, w in self.aspect_ratios], jnp.int32)[ids_N]
    return jnp.arange(self.max_num_tiles)[None] < tiles[:, None]

  def key_mask(self, ids_N: Array) -> Array:
    """N x (T * P1) bool: the output tokens of filled tiles (what a text row that sees the image reads)."""
    return jnp.repeat(self.tile_mask(ids_N), self.tokens_per_tile, axis=1)

  def _table(self, name: str, shape: tuple[int, ...], std: float, names=None) -> Array:
    """A learned table; unnamed axes replicated (the per-aspect-ratio rows are flat HF layouts)."""
    names = names or (None,) * len(shape)
    return self.param(name, partitioned(nn.initializers.normal(stddev=std), names), shape,
                      self.param_dtype).astype(self.dtype)

  def _gate(self, name: str) -> Array:
    """tanh of a scalar gate (0 at init: the branch starts closed)."""
    g = self.param(name, partitioned(nn.initializers.zeros_init(), ()), (), self.param_dtype)
    return jnp.tanh(g.astype(jnp.float32)).astype(self.dtype)

  @nn.compact
  def __call__(self, image: Array, ids_N: Array | None = None) -> Array:
    d, p, t = self.width, self.patch_size, self.max_num_tiles
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    tiles_NxTxHxWxC = image if image.ndim == 5 else image[:, None]
    n = tiles_NxTxHxWxC.shape[0]
    if tiles_NxTxHxWxC.shape[1] < t:  # one tile given: the rest are HF's zero padding
      pad = [(0, 0), (0, t - tiles_NxTxHxWxC.shape[1])] + [(0, 0)] * 3
      tiles_NxTxHxWxC = jnp.pad(tiles_NxTxHxWxC, pad)
    if ids_N is None:
      ids_N = jnp.full((n,), self.default_id(), jnp.int32)
    a = len(self.aspect_ratios) + 1
    x_MxGxGxD = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", use_bias=False, name="patch_embed", **kw,
                        kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")))(
                            tiles_NxTxHxWxC.reshape(n * t, *tiles_NxTxHxWxC.shape[2:]))  # M = N * T tiles
    x_NxTxPxD = x_MxGxGxD.reshape(n, t, -1, d)
    p1 = x_NxTxPxD.shape[2] + 1

    def tile_embed(name: str, x_NxTxLxD):  # one gated vector per (aspect ratio, tile), on all its tokens
      emb_NxTx1xD = self._table(f"{name}_embedding", (a, t * d), d ** -0.5)[ids_N].reshape(n, t, 1, d)
      return x_NxTxLxD + self._gate(f"{name}_gate") * emb_NxTx1xD

    x_NxTxPxD = tile_embed("pre_tile", x_NxTxPxD)
    cls_NxTx1xD = jnp.broadcast_to(self._table("class_embedding", (d,), d ** -0.5, ("embed",)), (n, t, 1, d))
    x_NxTxP1xD = jnp.concatenate([cls_NxTx1xD, x_NxTxPxD], axis=2)
    g = self._gate("pos_gate")
    tile_pos_NxTxP1xD = self._table("tile_pos_embedding", (a, t * p1 * d), d ** -0.5)[ids_N].reshape(
        n, t, p1, d)
    pos_P1xD = self._table("pos_embedding", (p1, d), d ** -0.5, ("patches", "embed"))
    x_NxTxP1xD = x_NxTxP1xD + (1 - g) * pos_P1xD + g * tile_pos_NxTxP1xD
    x_NxTxP1xD = layer_norm("ln_pre", _LN_EPS, **kw)(x_NxTxP1xD)
    lp = p1 + (-p1) % 8  # HF pads each tile to a multiple of 8 tokens, after ln_pre: zeros
    x_NxSxD = jnp.pad(x_NxTxP1xD, [(0, 0), (0, 0), (0, lp - p1), (0, 0)]).reshape(n, t * lp, d)
    real_NxS = (self.tile_mask(ids_N)[:, :, None] & (jnp.arange(lp) < p1)[None, None]).reshape(n, t * lp)
    mask_NxSxS = real_NxS[:, :, None] | real_NxS[:, None, :]  # only pad<->pad is blocked
    x_NxSxD = constrain(x_NxSxD, ("act_batch", "act_len", "act_embed"))
    stack.check("model.encoder", self.remat, self.remat_names)
    block_cls = stack.remat_module(MllamaBlock, self.remat, self.remat_names)
    block = lambda name, gated: block_cls(self.num_heads, self.mlp_dim, self.norm_eps, self.mlp_act, gated,
                                          name=name, **kw)
    kept = []
    for i in range(self.depth):
      x_NxSxD = block(f"block_{i}", False)(x_NxSxD, mask_NxSxS)
      if i in self.intermediate_layers:
        kept.append(x_NxSxD)
    x_NxSxD = layer_norm("ln_post", _LN_EPS, **kw)(x_NxSxD)
    x_NxSxD = tile_embed("post_tile", x_NxSxD.reshape(n, t, lp, d)).reshape(n, t * lp, d)
    for i in range(self.global_depth):
      x_NxSxD = block(f"global_{i}", True)(x_NxSxD, mask_NxSxS)
    # HF order: global features, then the intermediates interleaved (feature j of layer k at j * K + k)
    if kept:
      inter_NxSxDxK = jnp.stack(kept, axis=-1)
      x_NxSxD = jnp.concatenate([x_NxSxD, inter_NxSxDxK.reshape(n, t * lp, d * len(kept))], axis=-1)
    return x_NxSxD.reshape(n, t, lp, -1)[:, :, :p1].reshape(n, t * p1, self.out_width)

  def count_flops(self, t: flop_count.Tally, pre: str, n_images: int, size: int, out: str):
    """n_images (each T tiles of size x size) into stream `out`: (tokens T * P1, width D * (1 + K))."""
    p, d, tiles = self.patch_size, self.width, self.max_num_tiles
    p1 = (size // p) ** 2 + 1
    lp = p1 + (-p1) % 8
    t.source(out)
    t.dense(pre, f"{pre}/patch_embed", out, out, n_images * tiles * (p1 - 1), p * p * 3, d)
    for name in [f"block_{i}" for i in range(self.depth)] + [f"global_{i}" for i in range(self.global_depth)]:
      flop_count.vit_block(t, pre, f"{pre}/{name}", out, n_images, tiles * lp, d, self.num_heads,
                           self.mlp_dim)
    return tiles * p1, self.out_width

"""SigLIP-style ViT image encoder: conv patch embedding, learned positions, pre-LN blocks, final LN.

No CLS token: the output is one feature per patch, in row-major patch order (as SigLIP in HF).
`depth` blocks are built; LLaVA-style "features from layer -2, before the post-LN" is depth = L - 1
with final_norm=False (the converter sets that, dropping the unused last layer). scan / remat /
remat_names: models/stack.py (scanned blocks are one `blocks` module stacked on a "layers" axis).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mm_jax.models import flop_count, stack
from mm_jax.models.layers import (ACTIVATIONS, Attention, DType, Rope, constrain, dense, layer_norm,
                                  partitioned)

Array = jax.Array


class EncoderBlock(nn.Module):
  num_heads: int
  mlp_dim: int
  norm_eps: float = 1e-6
  mlp_act: str = "gelu_tanh"
  rope: Rope | None = None  # 2D RoPE over (row, column) positions (native_vit); None: a position table
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_BxPxD: Array, mask_BxPxP: Array | None, positions_BxPx2: Array | None = None
               ) -> Array:
    d = x_BxPxD.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = Attention(self.num_heads, self.num_heads, d // self.num_heads, use_bias=True, rope=self.rope,
                     name="attn", **kw)
    if mask_BxPxP is None:
      mask_BxPxP = jnp.ones((x_BxPxD.shape[0], 1, 1), bool)  # broadcasts over queries and keys
    y, _ = attn(layer_norm("ln_attn", self.norm_eps, **kw)(x_BxPxD), mask_BxPxP, positions_BxPx2)
    x_BxPxD = x_BxPxD + y
    y = dense(self.mlp_dim, ("embed", "mlp"), "mlp_in", **kw)(layer_norm("ln_mlp", self.norm_eps, **kw)(x_BxPxD))
    y = checkpoint_name(constrain(ACTIVATIONS[self.mlp_act](y), ("act_batch", "act_len", "act_mlp")),
                        "mlp_hidden")
    x_BxPxD = x_BxPxD + dense(d, ("mlp", "embed"), "mlp_out", **kw)(y)
    return constrain(x_BxPxD, ("act_batch", "act_len", "act_embed"))


class ViT(nn.Module):
  """Image BxHxWx3 in [-1, 1] -> patch features BxPxD, P = (H / patch_size) * (W / patch_size)."""
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  norm_eps: float = 1e-6
  final_norm: bool = True
  scan: bool = False
  remat: str = "none"
  remat_names: tuple[str, ...] = ()
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def num_patches(self, image_shape: tuple[int, ...]) -> int:
    return (image_shape[-3] // self.patch_size) * (image_shape[-2] // self.patch_size)

  @nn.compact
  def __call__(self, image_BxHxWxC: Array) -> Array:
    p, d = self.patch_size, self.width
    if d % self.num_heads:
      raise ValueError(f"encoder width={d} must be a multiple of num_heads={self.num_heads}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # A conv with stride = kernel = patch size is flatten-each-patch + linear.
    x = nn.Conv(d, (p, p), strides=(p, p), padding="VALID", name="patch_embed", **kw,
                kernel_init=partitioned(nn.initializers.lecun_normal(), (None, None, None, "embed")),
                bias_init=partitioned(nn.initializers.zeros_init(), ("embed",)))(image_BxHxWxC)
    b, gh, gw, _ = x.shape
    x_BxPxD = x.reshape(b, gh * gw, d)
    pos_PxD = self.param("pos_embedding",
                         partitioned(nn.initializers.normal(stddev=d ** -0.5), ("patches", "embed")),
                         (gh * gw, d), self.param_dtype)
    x_BxPxD = constrain(x_BxPxD + pos_PxD[None].astype(self.dtype), ("act_batch", "act_len", "act_embed"))
    stack.check("model.encoder", self.remat, self.remat_names)
    if self.scan:
      x_BxPxD, _ = stack.scan(lambda block, x: (block(x, None), None),
                              EncoderBlock(self.num_heads, self.mlp_dim, self.norm_eps, name="blocks", **kw),
                              self.depth, x_BxPxD, in_axes=(), remat=self.remat,
                              remat_names=self.remat_names)
    else:
      cls = stack.remat_module(EncoderBlock, self.remat, self.remat_names)
      for i in range(self.depth):
        x_BxPxD = cls(self.num_heads, self.mlp_dim, self.norm_eps, name=f"block_{i}", **kw)(x_BxPxD, None)
    return layer_norm("ln_final", self.norm_eps, **kw)(x_BxPxD) if self.final_norm else x_BxPxD

  def count_flops(self, t: flop_count.Tally, pre: str, n_images: int, size: int, out: str):
    """n_images of size x size into stream `out` (part and param prefix `pre`): (patches, width)."""
    p, d = self.patch_size, self.width
    patches = (size // p) ** 2
    t.source(out)
    t.dense(pre, f"{pre}/patch_embed", out, out, n_images * patches, p * p * 3, d)
    t.ew(out, [out], [f"{pre}/pos_embedding"])
    for i in range(self.depth):
      flop_count.vit_block(t, pre, f"{pre}/block_{i}", out, n_images, patches, d, self.num_heads,
                           self.mlp_dim)
    if self.final_norm:
      t.ew(out, [out], [f"{pre}/ln_final"])
    return patches, d


class RawPatches(nn.Module):
  """Fuyu's "encoder": no parameters, no transformer. Image BxHxWxC -> flattened pixel patches
  BxPx(patch_size * patch_size * C) in row-major patch order; the connector projects them (linearly,
  in Fuyu) into the decoder, whose RoPE positions give the only position information."""
  patch_size: int

  def num_patches(self, image_shape: tuple[int, ...]) -> int:
    return (image_shape[-3] // self.patch_size) * (image_shape[-2] // self.patch_size)

  def __call__(self, image_BxHxWxC: Array) -> Array:
    p = self.patch_size
    b, h, w, c = image_BxHxWxC.shape
    x = image_BxHxWxC.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    return constrain(x.reshape(b, (h // p) * (w // p), p * p * c), ("act_batch", "act_len", None))

  def count_flops(self, t: flop_count.Tally, pre: str, n_images: int, size: int, out: str):
    """No FLOPs: (patches, their width p * p * 3) of n_images of size x size, in stream `out`."""
    del pre, n_images
    t.source(out)
    return (size // self.patch_size) ** 2, self.patch_size ** 2 * 3

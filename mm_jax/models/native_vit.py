"""Native-resolution ViT (Qwen2-VL's tower): each image keeps its own patch grid.

An image (or a video's tubelet of temporal_patch frames) of H x W pixels, H and W multiples of
patch_size * merge, is grid_h x grid_w patches; data/native_images.py cuts it and lists its patches
merge-window by merge-window (each 2x2 window's four patches consecutive, as HF's processor), so the
merger connector (connectors.Merger) folds four consecutive features into one token. The images of a
row are packed into one patch sequence:

  patches_BxPxF   F = 3 * temporal_patch * patch_size^2, each patch (C, T, p, p) flattened as in HF
  patch_ids_BxPx3 (block, row, column): block numbers the attention blocks of the row from 1 (an
                  image, or one tubelet step of a video: HF's cu_seqlens), 0 padding; row/column the
                  patch's place in its grid, the 2D RoPE positions
Attention is block-diagonal (a patch sees the patches of its block), positions are 2D RoPE over (row,
column) with no position table, so one set of weights reads any grid. No final norm: the merger's LN
follows.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.models import flop_count, stack
from mm_jax.models.layers import DType, Projection, Rope, constrain
from mm_jax.models.vit import EncoderBlock

Array = jax.Array


class NativeViT(nn.Module):
  """patches BxPxF, patch_ids BxPx3 -> features BxPxD (module docstring)."""
  patch_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  temporal_patch: int = 2
  merge: int = 2
  mlp_act: str = "quick_gelu"
  norm_eps: float = 1e-6
  rope_theta: float = 10_000.0
  scan: bool = False
  remat: str = "none"
  remat_names: tuple[str, ...] = ()
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32
  native = True  # takes (patches, patch_ids), not an image array

  def patch_features(self) -> int:
    return 3 * self.temporal_patch * self.patch_size ** 2

  def rope(self) -> Rope:
    quarter = self.width // self.num_heads // 4  # frequency pairs per axis: head_dim / 4
    return Rope(theta=self.rope_theta, type="axial", sections=(quarter, quarter))

  @nn.compact
  def __call__(self, patches_BxPxF: Array, patch_ids_BxPx3: Array) -> Array:
    d, head_dim = self.width, self.width // self.num_heads
    if d % self.num_heads or head_dim % 4:
      raise ValueError(f"encoder width={d} / num_heads={self.num_heads} must be a multiple of 4 "
                       "(2D RoPE splits each head in quarters)")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    # HF's Conv3d with stride = kernel = (T, p, p) and no bias is one linear map of each patch; the
    # kernel keeps the conv's (C, T, p, p) input dims.
    (b, n, _), p, t = patches_BxPxF.shape, self.patch_size, self.temporal_patch
    x_BxPxD = Projection((d,), (None, None, None, None, "embed"), n_in=4, name="patch_embed", **kw)(
        patches_BxPxF.reshape(b, n, 3, t, p, p))
    x_BxPxD = constrain(x_BxPxD, ("act_batch", "act_len", "act_embed"))
    block_BxP, pos_BxPx2 = patch_ids_BxPx3[..., 0], patch_ids_BxPx3[..., 1:]
    mask_BxPxP = block_BxP[:, :, None] == block_BxP[:, None, :]  # padding (0) sees padding: no empty row
    fields = dict(num_heads=self.num_heads, mlp_dim=self.mlp_dim, norm_eps=self.norm_eps,
                  mlp_act=self.mlp_act, rope=self.rope(), **kw)
    stack.check("model.encoder", self.remat, self.remat_names)
    if self.scan:
      x_BxPxD, _ = stack.scan(lambda block, x, m, p: (block(x, m, p), None),
                              EncoderBlock(**fields, name="blocks"), self.depth, x_BxPxD, mask_BxPxP,
                              pos_BxPx2, in_axes=(nn.broadcast, nn.broadcast), remat=self.remat,
                              remat_names=self.remat_names)
      return x_BxPxD
    cls = stack.remat_module(EncoderBlock, self.remat, self.remat_names)
    for i in range(self.depth):
      x_BxPxD = cls(**fields, name=f"block_{i}")(x_BxPxD, mask_BxPxP, pos_BxPx2)
    return x_BxPxD

  def count_flops(self, t: flop_count.Tally, pre: str, n_rows: int, patches: int, out: str):
    """n_rows packed sequences of `patches` patches into stream `out`: (patches, width). Attention is
    counted over the whole sequence (the block-diagonal mask is applied to a full product)."""
    d = self.width
    t.source(out)
    t.dense(pre, f"{pre}/patch_embed", out, out, n_rows * patches, self.patch_features(), d)
    for i in range(self.depth):
      flop_count.vit_block(t, pre, f"{pre}/block_{i}", out, n_rows, patches, d, self.num_heads,
                           self.mlp_dim)
    return patches, d

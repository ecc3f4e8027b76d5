"""The hybrid family (NVLM-H): a thumbnail's tokens in the decoder's sequence, the full-resolution tiles
through gated cross-attention.

  image HxW -> a G x G grid of tiles -> encoder -> connector -> + tile embedding -> every cross block's k/v
            -> thumbnail (the image average-pooled by G) -> encoder -> connector -> tokens at image_position
One encoder and one connector serve both paths (as NVLM-H shares InternViT and its projector); a learned
per-tile embedding (`tile_embed`, zero at init) says which tile a feature came from. Parameter subtrees:
`encoder`, `connector`, `decoder`, `cross/block_i`, `tile_embed`. With the gates at 0 it is the unified
model on the thumbnail. G is model.family_options.hybrid.tiles. The in-row layout (vlm.py): images
BxMxHxWxC, each thumbnail over its N slots at image_pos[m], its tiles seen from image_pos[m] on by the
tokens of its example (cross_attention.visible_images).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.config import fields
from mm_jax.errors import UserError
from mm_jax.models import checks, cross_attention, encoders, family
from mm_jax.models.cross_attention import CrossAttentionVLM, kv_len
from mm_jax.models.decoder import prefill_masks
from mm_jax.models.flop_count import Tally, counter
from mm_jax.models.layers import (drop_tokens, insert_tokens, make_attn_mask, partitioned, row_positions,
                                  scatter_tokens)
from mm_jax.models.vlm import in_row

Array = jax.Array


def split_tiles(image_BxHxWxC: Array, grid: int) -> Array:
  """BxHxWxC -> B x G*G x (H/G) x (W/G) x C, tiles in row-major order."""
  b, h, w, c = image_BxHxWxC.shape
  x = image_BxHxWxC.reshape(b, grid, h // grid, grid, w // grid, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, grid * grid, h // grid, w // grid, c)


def thumbnail(image_BxHxWxC: Array, grid: int) -> Array:
  """The image average-pooled by `grid` in both directions: Bx(H/G)x(W/G)xC."""
  b, h, w, c = image_BxHxWxC.shape
  return image_BxHxWxC.reshape(b, h // grid, grid, w // grid, grid, c).mean(axis=(2, 4))


class HybridVLM(CrossAttentionVLM):
  """Same interface as vlm.UnifiedVLM (trainer, eval, decode.greedy_decode): one image BxHxWxC inserted
  at image_position, or the in-row layout (images BxMxHxWxC, image_pos BxM)."""
  image_position: int = 0
  tiles: int = 2  # G: the tile grid's side

  def setup(self):
    self.tile_embed = self.param("tile_embed", partitioned(nn.initializers.zeros_init(), (None, "embed")),
                                 (self.tiles ** 2, self.decoder.width), self.decoder.param_dtype)

  def _check(self, image_shape):
    if image_shape[-3] % self.tiles or image_shape[-2] % self.tiles:
      raise UserError(f"model.family_options.hybrid.tiles={self.tiles} must divide the image size "
                      f"{image_shape[-3]}x{image_shape[-2]}")

  def num_image_tokens(self, image_shape) -> int:
    """The thumbnail's tokens of ONE image in the decoder's sequence (BxHxWxC or BxMxHxWxC alike)."""
    g = self.tiles
    thumb = (*image_shape[:-3], image_shape[-3] // g, image_shape[-2] // g, image_shape[-1])
    return self.connector.num_tokens(self.encoder.num_patches(thumb))

  def _image_paths(self, image: Array):
    """BxHxWxC (M = 1) or BxMxHxWxC -> (thumbnail tokens BxMxNxD, the cross blocks' k/v of the tiles,
    image after image: S = M x G*G x P)."""
    self._check(image.shape)
    image_BxMxHxWxC = image[:, None] if image.ndim == 4 else image
    (b, m), g = image_BxMxHxWxC.shape[:2], self.tiles
    image_IxHxWxC = image_BxMxHxWxC.reshape(b * m, *image_BxMxHxWxC.shape[2:])
    tiles_IxGxhxwxC = split_tiles(image_IxHxWxC, g)
    f_NxPxD = self.connector(self.encoder(tiles_IxGxhxwxC.reshape(b * m * g * g, *tiles_IxGxhxwxC.shape[2:])))
    d = f_NxPxD.shape[-1]
    tiles_BxMxGxPxD = f_NxPxD.reshape(b, m, g * g, -1, d)
    tiles_BxMxGxPxD = tiles_BxMxGxPxD + self.tile_embed[None, None, :, None].astype(tiles_BxMxGxPxD.dtype)
    kvs = self.cross.kv(tiles_BxMxGxPxD.reshape(b, -1, d).astype(self.decoder.dtype))
    thumb_IxNxD = self.connector(self.encoder(thumbnail(image_IxHxWxC, g))).astype(self.decoder.dtype)
    return thumb_IxNxD.reshape(b, m, *thumb_IxNxD.shape[1:]), kvs

  def _count_images(self, t: Tally, size: int, b: int) -> tuple[int, int]:
    """FLOPs of _image_paths on b images: the tiles into stream img, the thumbnails into the sequence
    (stream x); (tile tokens per image, thumbnail tokens per image)."""
    g = self.tiles
    encoder, connector = counter(self.encoder), counter(self.connector)
    patches, e = encoder(t, "encoder", b * g * g, size // g, "img")
    s = g * g * connector(t, "connector", "img", b * g * g, patches, e)
    t.ew("img", ["img"], ["tile_embed"])
    # The thumbnail: the same encoder and connector on one (size / G)^2 image per example.
    encoder(t, "encoder", b, size // g, "thumb")
    n = connector(t, "connector", "thumb", b, patches, e)
    t.ew("x", ["x", "thumb"])
    return s, n

  def _sequence(self, thumb_BxNxD: Array, text_BxT: Array, mask_input_BxT: Array, mask_ar_BxT: Array):
    """Decoder input BxLxD, input mask, autoregressive mask (thumbnail in the prefix), positions."""
    (b, n), k = thumb_BxNxD.shape[:2], self.image_position
    x_BxLxD = insert_tokens(self.decoder.embed(text_BxT).astype(self.decoder.dtype), thumb_BxNxD, k)
    input_BxL = insert_tokens(mask_input_BxT, jnp.ones((b, n), mask_input_BxT.dtype), k)
    if self.prefix_attention:
      ar_BxL = insert_tokens(mask_ar_BxT, jnp.zeros((b, n), mask_ar_BxT.dtype), k)
    else:
      ar_BxL = jnp.ones_like(input_BxL)
    return x_BxLxD, input_BxL, ar_BxL, jnp.broadcast_to(jnp.arange(x_BxLxD.shape[1]), input_BxL.shape)

  def __call__(self, image: Array, text_BxT: Array, mask_ar_BxT: Array, mask_input_BxT: Array,
               image_pos_BxM: Array | None = None, segment_BxT: Array | None = None,
               positions_BxT: Array | None = None) -> Array:
    """Teacher-forced forward -> text logits BxTxV (inserted: the thumbnail's positions dropped; in-row,
    image_pos given: logits at every position of the row)."""
    thumb_BxMxNxD, kvs = self._image_paths(image)
    if in_row(image_pos_BxM, segment_BxT, positions_BxT):
      x_BxTxD = self._in_row(thumb_BxMxNxD, text_BxT, image_pos_BxM)
      rows_BxT = row_positions(text_BxT)
      ar_BxT = mask_ar_BxT if self.prefix_attention else jnp.ones_like(mask_ar_BxT)
      xmask_BxTxS = self._cross_mask(image_pos_BxM, rows_BxT, kv_len(kvs), segment_BxT)
      logits_BxTxV, _ = self._run(x_BxTxD, row_positions(text_BxT, positions_BxT),
                                  make_attn_mask(mask_input_BxT, ar_BxT, segment_BxT), kvs, xmask_BxTxS)
      return logits_BxTxV
    thumb_BxNxD = thumb_BxMxNxD[:, 0]
    x_BxLxD, input_BxL, ar_BxL, positions_BxL = self._sequence(thumb_BxNxD, text_BxT, mask_input_BxT,
                                                               mask_ar_BxT)
    xmask_BxLxS = self._cross_mask(self._at_start(text_BxT), positions_BxL, kv_len(kvs))
    logits_BxLxV, _ = self._run(x_BxLxD, positions_BxL, make_attn_mask(input_BxL, ar_BxL), kvs,
                                xmask_BxLxS)
    return drop_tokens(logits_BxLxV, self.image_position, thumb_BxNxD.shape[1])

  @staticmethod
  def _at_start(text_BxT: Array) -> Array:
    """image_pos Bx1 = 0 of the inserted layout: every token sees the tiles."""
    return jnp.zeros((text_BxT.shape[0], 1), jnp.int32)

  def _in_row(self, thumb_BxMxNxD: Array, text_BxT: Array, image_pos_BxM: Array | None) -> Array:
    """The in-row layout's decoder input: text embeddings, each thumbnail over its slots."""
    if image_pos_BxM is None:
      raise ValueError("the in-row layout (segment or positions given) needs image_pos: where each "
                       "image's slots start in the row")
    return scatter_tokens(self.decoder.embed(text_BxT).astype(self.decoder.dtype), thumb_BxMxNxD,
                          image_pos_BxM)

  def prefill(self, image: Array, prefix_BxP: Array, prefix_mask_BxP: Array, cache,
              image_pos_BxM: Array | None = None):
    """Thumbnail + (right-padded) prefix into self-attention slots [0, N + P) (in-row, image_pos given:
    the prefix holds the thumbnails' slots, [0, P)); the tiles' k/v once.
    Returns (logits BxPxV, cache {"self", "cross", "image_pos"}, cache_mask BxS); decode_step is the
    cross-attention model's."""
    thumb_BxMxNxD, kvs = self._image_paths(image)
    if image_pos_BxM is not None:
      x_BxLxD, input_BxL = self._in_row(thumb_BxMxNxD, prefix_BxP, image_pos_BxM), prefix_mask_BxP
      positions_BxL, n = row_positions(prefix_BxP), 0
    else:
      x_BxLxD, input_BxL, _, positions_BxL = self._sequence(thumb_BxMxNxD[:, 0], prefix_BxP,
                                                            prefix_mask_BxP, jnp.zeros_like(prefix_mask_BxP))
      image_pos_BxM, n = self._at_start(prefix_BxP), thumb_BxMxNxD.shape[2]
    cache_mask_BxS, mask_BxLxS = prefill_masks(input_BxL, cache, causal=not self.prefix_attention)
    xmask_BxLxS = self._cross_mask(image_pos_BxM, positions_BxL, kv_len(kvs))
    logits_BxLxV, cache = self._run(x_BxLxD, positions_BxL, mask_BxLxS, kvs, xmask_BxLxS, cache, 0)
    return (drop_tokens(logits_BxLxV, self.image_position, n),
            {"self": cache, "cross": kvs, "image_pos": image_pos_BxM}, cache_mask_BxS)


@dataclasses.dataclass(frozen=True)
class HybridOptions:
  """model.family_options.hybrid; the cross blocks read model.family_options.cross."""
  tiles: int = 2  # G: a G x G grid of tiles; the thumbnail is the image pooled by G


def hybrid(model_cfg, tokenizer_vocab: int) -> HybridVLM:
  """NVLM-H: a thumbnail's tokens in the sequence, the image's tiles through gated cross-attention.

  The cross family's fields, plus model.family_options.hybrid.tiles (G) and model.image_position (the
  thumbnail's)."""
  cross = cross_attention.cross_attention(model_cfg, tokenizer_vocab)
  tiles = family.family_options(model_cfg, "hybrid", HybridOptions).tiles
  if tiles < 1:
    raise UserError(f"model.family_options.hybrid.tiles must be >= 1, got {tiles}")
  kept = {f: getattr(cross, f) for f in ("encoder", "connector", "decoder", "cross", "cross_every",
                                         "prefix_attention", "last_image_only", "cross_before",
                                         "image_groups")}
  return HybridVLM(**kept, image_position=model_cfg.image_position, tiles=tiles)


def _check(config) -> None:
  cross_attention.check_cross(config)
  if config.model.family_options.cross.get("encoder", "vit") != "vit":
    raise UserError("the hybrid family tiles images itself and encodes them with the vit encoder; set "
                    f"--config.{cross_attention.OPTIONS}.encoder=vit")
  size, tiles = config.data.image_size, fields.integer(config, "model.family_options.hybrid.tiles", 1)
  if tiles and size % tiles == 0:  # the encoder sees the tiles (and the thumbnail: the same size)
    encoders.check_image(config, "vit", size // tiles, f"the tile side {size // tiles} (data.image_size="
                         f"{size} / model.family_options.hybrid.tiles={tiles})")
  else:
    encoders.check_image(config, "vit")
  checks.decoder(config)
  checks.image_position(config)


HYBRID = family.Family(hybrid, _check, image_in_sequence=True, options=HybridOptions)

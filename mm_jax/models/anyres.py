"""AnyRes VLM (LLaVA-NeXT): a large image as a base view plus a grid of tiles, each tile through the
encoder, the tiles' features unpadded into one map with a learned newline per row.

  tiles BxTxSxSx3 -> encoder (vit) -> connector -> features Bx(T*N)xD (+ the newline)
  token_src BxK (data/anyres.py: each image token's feature index, -1 the newline) -> the row's tokens
  -> the k-th token over the k-th placeholder (model.family_options.anyres.placeholder_ids) -> decoder
A row's T tiles are its images' tiles in order (their sources offset by the tiles before); the number of
tokens an image costs follows its size and aspect. Causal attention (LLaVA). Parameter subtrees:
encoder, connector, decoder, and image_newline.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.errors import UserError
from mm_jax.models import checks, encoders, family
from mm_jax.models.decoder import Cache, decode_token, prefill_masks
from mm_jax.models.flop_count import Sizes, Tally, counter
from mm_jax.models.layers import constrain, fill_placeholders, make_attn_mask, partitioned, row_positions

Array = jax.Array
INPUTS = ("tiles", "token_src", "text", "mask_ar", "mask_input", "segment", "positions")


@dataclasses.dataclass(frozen=True)
class AnyResOptions:
  """model.family_options.anyres: the image placeholder ids; pinpoints, the (height, width) canvases a
  large image is tiled into (data/anyres.py)."""
  placeholder_ids: tuple[int, ...] = (0,)  # our tokenizers: PAD_ID (the in-row slots' id too)
  pinpoints: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))


class AnyResVLM(nn.Module):
  encoder: nn.Module
  connector: nn.Module
  decoder: nn.Module
  placeholder_ids: tuple[int, ...]
  task = "vqa"
  inputs = INPUTS
  image_key = "tiles"  # what decoding passes as the image, and its prefill's own batch keys
  prefill_keys = {"token_src_BxK": "token_src"}

  def setup(self):
    d = self.decoder.width
    self.image_newline = self.param("image_newline", partitioned(nn.initializers.normal(d ** -0.5), ("embed",)),
                                    (d,), self.decoder.param_dtype)

  def num_image_tokens(self, image_shape) -> int:
    """0: the prefix holds the placeholders of its images (decode's in-row case)."""
    del image_shape
    return 0

  def image_tokens(self, tiles_BxTxSxSx3: Array, token_src_BxK: Array) -> Array:
    """Each row's image tokens BxKxD: its tiles' features (and the newline) read at token_src."""
    b, t = tiles_BxTxSxSx3.shape[:2]
    feats = self.connector(self.encoder(tiles_BxTxSxSx3.reshape(b * t, *tiles_BxTxSxSx3.shape[2:])))
    n, d = feats.shape[1:]
    newline_Bx1xD = jnp.broadcast_to(self.image_newline.astype(feats.dtype), (b, 1, d))
    table_BxFxD = jnp.concatenate([feats.reshape(b, t * n, d), newline_Bx1xD], axis=1)
    at_BxK = jnp.where(token_src_BxK < 0, t * n, token_src_BxK)
    return constrain(jnp.take_along_axis(table_BxFxD, at_BxK[..., None], axis=1),
                     ("act_batch", "act_len", "act_embed"))

  def _inputs(self, tiles, token_src_BxK, text_BxL):
    tokens_BxKxD = self.image_tokens(tiles, token_src_BxK)
    return fill_placeholders(self.decoder.embed(text_BxL), text_BxL, tokens_BxKxD, self.placeholder_ids)

  def __call__(self, tiles_BxTxSxSx3: Array, token_src_BxK: Array, text_BxL: Array, mask_ar_BxL: Array,
               mask_input_BxL: Array, segment_BxL: Array | None = None,
               positions_BxL: Array | None = None) -> Array:
    """Teacher-forced logits BxLxV at every position (causal within segments; mask_ar unused)."""
    del mask_ar_BxL
    x_BxLxD = self._inputs(tiles_BxTxSxSx3, token_src_BxK, text_BxL)
    mask_BxLxL = make_attn_mask(mask_input_BxL, jnp.ones_like(mask_input_BxL), segment_BxL)
    logits_BxLxV, _ = self.decoder(x_BxLxD, row_positions(text_BxL, positions_BxL), mask_BxLxL)
    return logits_BxLxV

  def prefill(self, tiles_BxTxSxSx3: Array, prefix_BxP: Array, prefix_mask_BxP: Array, cache: Cache,
              token_src_BxK: Array = None) -> tuple[Array, Cache, Array]:
    """The right-padded prefix, placeholders filled, into cache slots [0, P), causal."""
    x_BxLxD = self._inputs(tiles_BxTxSxSx3, token_src_BxK, prefix_BxP)
    cache_mask_BxS, mask_BxLxS = prefill_masks(prefix_mask_BxP, cache, causal=True)
    logits_BxPxV, cache = self.decoder(x_BxLxD, row_positions(prefix_BxP), mask_BxLxS, cache, 0)
    return logits_BxPxV, cache, cache_mask_BxS

  def decode_step(self, token_B: Array, position_B: Array, cache: Cache, cache_mask_BxS: Array,
                  slot) -> tuple[Array, Cache, Array]:
    return decode_token(self.decoder, token_B, position_B, cache, cache_mask_BxS, slot)

  def flop_layout(self, config):
    """A training row for the FLOP count: the most tiles and tokens a row holds."""
    b = example_inputs(config)
    return Sizes(config.data.image_size, b["text"].shape[1]), {"tiles": b["tiles"].shape[1]}

  def count_flops(self, t: Tally, sizes: Sizes, batch: int, tiles: int) -> None:
    """The teacher-forced forward on `batch` rows of sizes.text_len tokens and `tiles` tiles each."""
    self.decoder.count_embed(t, "decoder", "x")
    patches, e = counter(self.encoder)(t, "encoder", batch * tiles, sizes.image_size, "img")
    counter(self.connector)(t, "connector", "img", batch * tiles, patches, e)
    t.ew("x", ["x", "img"])
    self.decoder.count_flops(t, "decoder", "x", batch, sizes.text_len, sizes.text_len)


def limits(config) -> tuple[int, int]:
  """(tiles, image tokens) a row holds at most: data.max_images images on the largest pinpoint (a base
  view and its tiles; the tokens before unpadding: side^2 + rows*side x (cols*side + 1))."""
  opts = family.family_options(config.model, "anyres", AnyResOptions)
  s, side = config.data.image_size, config.data.image_size // config.model.encoder.patch_size
  grids = [(h // s, w // s) for h, w in opts.pinpoints]
  tiles = 1 + max(r * c for r, c in grids)
  tokens = side * side + max(r * side * (c * side + 1) for r, c in grids)
  return config.data.max_images * tiles, config.data.max_images * tokens


def example_inputs(config, batch: int = 1) -> dict:
  """Zeros shaped like a training batch (data/anyres_rows.py's layout)."""
  s, (t, k) = config.data.image_size, limits(config)
  l = config.data.text_len + k
  zeros = lambda *shape: jnp.zeros((batch, *shape), jnp.int32)
  return dict(tiles=jnp.zeros((batch, t, s, s, 3), jnp.float32), token_src=zeros(k), text=zeros(l),
              mask_ar=zeros(l), mask_input=jnp.ones((batch, l), jnp.int32), mask_loss=zeros(l),
              segment=jnp.ones((batch, l), jnp.int32), positions=zeros(l))


def anyres(model_cfg, tokenizer_vocab: int) -> AnyResVLM:
  """AnyRes tiling (LLaVA-NeXT): a base view and a grid of tiles per image, unpadded, a newline per
  row; tokens over their placeholders."""
  opts = family.family_options(model_cfg, "anyres", AnyResOptions)
  return AnyResVLM(encoder=encoders.ENCODERS["vit"].build(model_cfg), connector=family.build_connector(model_cfg),
                   decoder=family.build_decoder(model_cfg, tokenizer_vocab),
                   placeholder_ids=tuple(int(i) for i in opts.placeholder_ids))


def _check(config) -> None:
  opts = family.family_options(config.model, "anyres", AnyResOptions)
  encoders.check_image(config, "vit")
  if not opts.placeholder_ids:
    raise UserError("model.family_options.anyres.placeholder_ids is empty: set the token ids the image "
                    "tokens replace")
  checks.decoder(config)


def rows(config, tokenizer):
  """data/anyres_rows.py's rows, the placeholders this config's."""
  from mm_jax.data import anyres_rows  # pylint: disable=g-import-not-at-top  # data imports models
  opts = family.family_options(config.model, "anyres", AnyResOptions)
  return anyres_rows.AnyResRow(config, tokenizer, tuple(opts.placeholder_ids), opts.pinpoints, limits(config))


ANYRES = family.Family(anyres, _check, options=AnyResOptions, example_inputs=example_inputs, rows=rows)

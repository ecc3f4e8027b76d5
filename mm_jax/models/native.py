"""Native-resolution VLM (Qwen2-VL): images and videos at their own size, tokens where the text holds
their placeholders, M-RoPE positions.

  patches, patch_ids -> encoder (native_vit) -> connector (merger) -> the row's k-th image token
  replaces its k-th placeholder -> decoder (causal; positions BxLx3: Qwen2-VL's (t, h, w) M-RoPE)
The row already holds every image's placeholders (one per merged token, data/native_images.py lays
them out with their positions), so an image of any size costs its own token count and no slot table;
a row may pack several examples (segment). The placeholders are model.family_options.native.
placeholder_ids (Qwen2-VL: <|image_pad|> and <|video_pad|>): the tokens of one row's images and
videos are in the order their placeholders appear. Parameter subtrees: encoder, connector, decoder.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mm_jax.errors import UserError
from mm_jax.models import checks, encoders, family
from mm_jax.models.decoder import Cache, decode_token, prefill_masks
from mm_jax.models.flop_count import Sizes, Tally, counter
from mm_jax.models.layers import fill_placeholders, make_attn_mask, row_positions
from mm_jax.models.native_vit import NativeViT

Array = jax.Array
INPUTS = ("patches", "patch_ids", "text", "mask_ar", "mask_input", "segment", "positions")


@dataclasses.dataclass(frozen=True)
class NativeOptions:
  """model.family_options.native: the token ids the image and video tokens replace; row_break_ids
  (row_break, image_end): Pixtral's layout, each row of an image's tokens ended by row_break and the
  image by image_end (ordinary tokens of the text; () : Qwen2-VL's, none)."""
  placeholder_ids: tuple[int, ...] = (0,)  # our tokenizers: PAD_ID (the in-row slots' id too)
  row_break_ids: tuple[int, ...] = ()
  temporal_pool: int = 1  # k > 1: a video's tokens averaged over each k consecutive tubelets


class NativeVLM(nn.Module):
  encoder: NativeViT
  connector: nn.Module
  decoder: nn.Module
  placeholder_ids: tuple[int, ...]
  temporal_pool: int = 1
  task = "vqa"
  image_key = "patches"  # what decoding passes as the image, and its prefill's own batch keys

  @property
  def inputs(self) -> tuple[str, ...]:
    """Its batch keys, in __call__'s order (the vqa task's, patches for images; token_dest: pooled)."""
    return INPUTS + (("token_dest",) if self.temporal_pool > 1 else ())

  @property
  def prefill_keys(self) -> dict[str, str]:
    own = {"patch_ids_BxPx3": "patch_ids", "positions_BxPx3": "positions"}
    return own | ({"token_dest_BxN": "token_dest"} if self.temporal_pool > 1 else {})

  def position_offset(self, prefill_kw: dict, prefix_len_B):
    """decode's offset of the new tokens' positions (mrope_offset of the prefix's positions)."""
    return mrope_offset(prefill_kw["positions_BxPx3"], prefix_len_B)

  def num_image_tokens(self, image_shape) -> int:
    """0: the prefix holds the placeholders of its images (decode's in-row case)."""
    del image_shape
    return 0

  def _inputs(self, patches_BxPxF: Array, patch_ids_BxPx3: Array, text_BxL: Array,
              token_dest_BxN: Array | None = None) -> Array:
    tokens_BxNxD = self.connector(self.encoder(patches_BxPxF, patch_ids_BxPx3))
    if token_dest_BxN is not None:
      tokens_BxNxD = pool_tokens(tokens_BxNxD, token_dest_BxN)
    return fill_placeholders(self.decoder.embed(text_BxL), text_BxL, tokens_BxNxD, self.placeholder_ids)

  def __call__(self, patches_BxPxF: Array, patch_ids_BxPx3: Array, text_BxL: Array, mask_ar_BxL: Array,
               mask_input_BxL: Array, segment_BxL: Array | None = None,
               positions_BxLx3: Array | None = None, token_dest_BxN: Array | None = None) -> Array:
    """Teacher-forced logits BxLxV at every position of the row (causal attention within segments;
    mask_ar is unused: Qwen2-VL has no prefix block)."""
    del mask_ar_BxL
    x_BxLxD = self._inputs(patches_BxPxF, patch_ids_BxPx3, text_BxL, token_dest_BxN)
    mask_BxLxL = make_attn_mask(mask_input_BxL, jnp.ones_like(mask_input_BxL), segment_BxL)
    logits_BxLxV, _ = self.decoder(x_BxLxD, row_positions(text_BxL, positions_BxLx3), mask_BxLxL)
    return logits_BxLxV

  def prefill(self, patches_BxPxF: Array, prefix_BxP: Array, prefix_mask_BxP: Array, cache: Cache,
              patch_ids_BxPx3: Array = None, positions_BxPx3: Array | None = None,
              token_dest_BxN: Array | None = None) -> tuple[Array, Cache, Array]:
    """The (right-padded) prefix, placeholders filled, into cache slots [0, P), causal: (logits BxPxV,
    cache, cache_mask). The next tokens' positions continue from max(position) + 1 (decode's
    position_offset: mrope_offset)."""
    x_BxLxD = self._inputs(patches_BxPxF, patch_ids_BxPx3, prefix_BxP, token_dest_BxN)
    cache_mask_BxS, mask_BxLxS = prefill_masks(prefix_mask_BxP, cache, causal=True)
    logits_BxPxV, cache = self.decoder(x_BxLxD, row_positions(prefix_BxP, positions_BxPx3), mask_BxLxS,
                                       cache, 0)
    return logits_BxPxV, cache, cache_mask_BxS

  def decode_step(self, token_B: Array, position_B: Array, cache: Cache, cache_mask_BxS: Array,
                  slot) -> tuple[Array, Cache, Array]:
    """One text token per example: under M-RoPE a text position is the same on every axis."""
    return decode_token(self.decoder, token_B, position_B, cache, cache_mask_BxS, slot)

  def flop_layout(self, config):
    """A training row for the FLOP count: the largest bucket's patches, its row length."""
    b = example_inputs(config)
    return Sizes(0, b["text"].shape[1]), {"patches": b["patches"].shape[1]}

  def count_flops(self, t: Tally, sizes: Sizes, batch: int, patches: int) -> None:
    """The teacher-forced forward on `batch` rows of sizes.text_len tokens and `patches` patches."""
    self.decoder.count_embed(t, "decoder", "x")
    feats, e = counter(self.encoder)(t, "encoder", batch, patches, "img")
    counter(self.connector)(t, "connector", "img", batch, feats, e)
    t.ew("x", ["x", "img"])
    self.decoder.count_flops(t, "decoder", "x", batch, sizes.text_len, sizes.text_len)


def pool_tokens(tokens_BxNxD: Array, dest_BxN: Array) -> Array:
  """Token j of a row is the mean of its tokens i with dest[i] == j (a video's tokens over each
  temporal_pool tubelets; an image's own; a dest of N or more, padding, goes nowhere)."""
  n = tokens_BxNxD.shape[1]
  total = jax.vmap(lambda t, d: jax.ops.segment_sum(t, d, num_segments=n))(tokens_BxNxD, dest_BxN)
  count = jax.vmap(lambda d: jax.ops.segment_sum(jnp.ones(d.shape, tokens_BxNxD.dtype), d, num_segments=n)
                   )(dest_BxN)
  return total / jnp.maximum(count, 1)[..., None]


def mrope_offset(positions_BxPx3: np.ndarray | Array, prefix_len_B) -> Array:
  """What decode adds to a new token's slot-derived position (prefix_len + t): max(position) + 1 -
  prefix_len, HF's rope_deltas (the prefix's positions beyond its last real token are ignored)."""
  p = positions_BxPx3.shape[1]
  real_BxP = jnp.arange(p)[None] < jnp.asarray(prefix_len_B)[:, None]
  top_B = jnp.max(jnp.where(real_BxP, jnp.max(positions_BxPx3, axis=-1), -1), axis=1)
  return top_B + 1 - prefix_len_B


def example_inputs(config, batch: int = 1) -> dict:
  """Zeros shaped like a training batch of the largest bucket (data/native_rows.py's layout)."""
  enc = config.model.encoder
  m2, f = enc.get("merge", 2) ** 2, 3 * enc.get("temporal_patch", 2) * enc.patch_size ** 2
  native = config.data.get("native")
  p = max(native.patch_buckets) if native and native.patch_buckets else m2
  opts = family.family_options(config.model, "native", NativeOptions)
  from mm_jax.data import native_rows  # pylint: disable=g-import-not-at-top  # data imports models
  l = native_rows.row_length(config, bool(opts.row_break_ids)) if native and native.patch_buckets else (
      config.data.text_len + p // m2)
  zeros = lambda *shape: jnp.zeros((batch, *shape), jnp.int32)
  pooled = opts.temporal_pool > 1
  return dict(patches=jnp.zeros((batch, p, f), jnp.float32), patch_ids=zeros(p, 3), text=zeros(l),
              mask_ar=zeros(l), mask_input=jnp.ones((batch, l), jnp.int32), mask_loss=zeros(l),
              segment=jnp.ones((batch, l), jnp.int32), positions=zeros(l, 3),
              **(dict(token_dest=zeros(p // m2)) if pooled else {}))


def rows(config, tokenizer):
  """data/native_rows.py's rows, the placeholders this config's."""
  from mm_jax.data import native_rows  # pylint: disable=g-import-not-at-top  # data imports models
  opts = family.family_options(config.model, "native", NativeOptions)
  return native_rows.NativeRow(config, tokenizer, tuple(opts.placeholder_ids), tuple(opts.row_break_ids),
                               opts.temporal_pool)


def native(model_cfg, tokenizer_vocab: int) -> NativeVLM:
  """Native resolution (Qwen2-VL): each image's own patch grid (2D RoPE), merged tokens over its
  placeholders, M-RoPE in the decoder."""
  opts = family.family_options(model_cfg, "native", NativeOptions)
  return NativeVLM(encoder=encoders.ENCODERS["native"].build(model_cfg),
                   connector=family.build_connector(model_cfg),
                   decoder=family.build_decoder(model_cfg, tokenizer_vocab),
                   placeholder_ids=tuple(int(i) for i in opts.placeholder_ids),
                   temporal_pool=opts.temporal_pool)


def _check(config) -> None:
  enc, opts = config.model.encoder, family.family_options(config.model, "native", NativeOptions)
  encoders.check_image(config, "native")
  if config.model.connector != "merger":
    raise UserError(f"model.connector={config.model.connector!r}: the native family folds merge windows "
                    "of its packed patches; set --config.model.connector=merger")
  merge = dict(config.model.connector_options or {}).get("merger", {}).get("merge", 2)
  if merge != enc.get("merge", 2):
    raise UserError(f"model.connector_options.merger.merge={merge} must equal model.encoder.merge="
                    f"{enc.get('merge', 2)} (the patch order the data path lays out)")
  if not opts.placeholder_ids:
    raise UserError("model.family_options.native.placeholder_ids is empty: set the token ids the image "
                    "tokens replace")
  if not isinstance(opts.temporal_pool, int) or opts.temporal_pool < 1:
    raise UserError(f"model.family_options.native.temporal_pool={opts.temporal_pool!r} must be an integer "
                    ">= 1 (1: no pooling over time)")
  breaks = tuple(opts.row_break_ids)
  if breaks and (len(breaks) != 2 or set(breaks) & set(opts.placeholder_ids)):
    raise UserError(f"model.family_options.native.row_break_ids={breaks}: give two token ids, (row break, "
                    "image end), neither a placeholder id, or () for no row breaks")
  from mm_jax.data import native_rows  # pylint: disable=g-import-not-at-top
  native_rows.buckets(config)
  n = config.data.native
  for field in ("min_pixels", "max_pixels", "video_min_pixels", "video_max_pixels"):
    if not isinstance(n[field], int) or n[field] < 1:
      raise UserError(f"data.native.{field}={n[field]!r} must be a positive integer (pixels)")
  if n.min_pixels > n.max_pixels:
    raise UserError(f"data.native.min_pixels={n.min_pixels} is above max_pixels={n.max_pixels}")
  most = n.max_pixels // config.model.encoder.patch_size ** 2  # the patches of the largest still image
  largest = max(native_rows.buckets(config))
  if largest < most:
    raise UserError(f"data.native.patch_buckets cannot hold the largest image: an image of up to "
                    f"max_pixels={n.max_pixels} is up to {most} patches but the largest bucket is {largest}; "
                    f"add a bucket of at least {most} or lower data.native.max_pixels")
  checks.decoder(config)


NATIVE = family.Family(native, _check, options=NativeOptions, example_inputs=example_inputs, rows=rows)

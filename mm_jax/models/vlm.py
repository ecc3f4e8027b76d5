"""Unified-embedding VLM (PaliGemma, LLaVA): image tokens sit in the decoder's input sequence.

  image -> encoder (ViT) -> connector -> [text_1..text_k, img_1 .. img_N, text_k+1 .. text_T] -> decoder
k = image_position: 0 for PaliGemma (image first), 1 for LLaVA (after BOS). Attention (see
layers.make_attn_mask): with prefix_attention (PaliGemma) image + text prefix see each other fully and
the suffix is causal; without it (LLaVA) everything is causal. With no encoder the model is a text-only
LM over the same inputs (the image is ignored). Parameter subtrees: `encoder`, `connector`, `decoder`.

Two input layouts (`in_row`): one image BxHxWxC inserted at image_position (the text holds no slot for
it), or images BxMxHxWxC with image_pos BxM, where the row already holds each image's N slots (image m
fills [image_pos[m], +N); an empty slot has image_pos = L) and may pack several examples (segment,
positions: RoPE positions restarting per example).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.models import checks, encoders, family
from mm_jax.models.decoder import Cache, decode_token, prefill_masks
from mm_jax.models.flop_count import Sizes, Tally, counter
from mm_jax.models.layers import (drop_tokens, insert_tokens, make_attn_mask, row_positions,
                                  scatter_tokens)

Array = jax.Array


def in_row(image_pos, segment, positions) -> bool:
  """Whether a call uses the in-row layout (any of its arguments given) rather than insertion."""
  return any(a is not None for a in (image_pos, segment, positions))


class UnifiedVLM(nn.Module):
  encoder: nn.Module | None
  connector: nn.Module | None
  decoder: nn.Module
  image_position: int = 0
  prefix_attention: bool = True
  task = "vqa"

  def num_image_tokens(self, image_shape) -> int:
    """Tokens of ONE image in the decoder's sequence (BxHxWxC or BxMxHxWxC alike): the connector's
    count for the encoder's patches; the slots the in-row layout holds per image."""
    if self.encoder is None:
      return 0
    return self.connector.num_tokens(self.encoder.num_patches(image_shape))

  def embed_image(self, image_BxHxWxC: Array) -> Array:
    return self.connector(self.encoder(image_BxHxWxC))

  def __call__(self, image: Array, text_BxL: Array, mask_ar_BxL: Array, mask_input_BxL: Array,
               image_pos_BxM: Array | None = None, segment_BxL: Array | None = None,
               positions_BxL: Array | None = None) -> Array:
    """Teacher-forced forward.

    Inserted (image BxHxWxC, the rest None): text logits BxTxV, logit t predicts text token t + 1
    (except at t = image_position - 1, whose next element is the image; a prefix position, never
    scored). The head runs on the text positions only: at PaliGemma's size the image positions are 3/4
    of the sequence (the vocab projection was ~10 % of the step).
    In-row (image_pos given; module docstring): logits BxLxV at every position of the row, image slots
    included (the loss masks pick what is scored)."""
    if in_row(image_pos_BxM, segment_BxL, positions_BxL):
      return self.sequence_logits(image, text_BxL, mask_ar_BxL, mask_input_BxL, image_pos_BxM,
                                  segment_BxL, positions_BxL)
    h_BxLxD = self._hidden(image, text_BxL, mask_ar_BxL, mask_input_BxL)
    n = h_BxLxD.shape[1] - text_BxL.shape[1]
    return self.decoder.logits(drop_tokens(h_BxLxD, self.image_position, n))

  def _inputs(self, image_BxHxWxC: Array, text_BxT: Array, mask_input_BxT: Array):
    """The decoder's input BxLxD (image tokens inserted at image_position), its input mask, positions."""
    x_BxLxD, input_mask_BxL = self.decoder.embed(text_BxT), mask_input_BxT
    if self.encoder is not None:
      img_BxNxD = self.embed_image(image_BxHxWxC).astype(x_BxLxD.dtype)
      b, n = img_BxNxD.shape[:2]
      x_BxLxD = insert_tokens(x_BxLxD, img_BxNxD, self.image_position)
      input_mask_BxL = insert_tokens(mask_input_BxT, jnp.ones((b, n), mask_input_BxT.dtype),
                                     self.image_position)
    positions_BxL = jnp.broadcast_to(jnp.arange(x_BxLxD.shape[1]), input_mask_BxL.shape)
    return x_BxLxD, input_mask_BxL, positions_BxL

  def _in_row_inputs(self, image: Array, text_BxL: Array, image_pos_BxM: Array | None) -> Array:
    """The decoder's input BxLxD of the in-row layout: text embeddings, each image's N tokens over its
    slots (empty images, image_pos = L, fall off the row)."""
    x_BxLxD = self.decoder.embed(text_BxL)
    if self.encoder is None:
      return x_BxLxD
    if image_pos_BxM is None:
      raise ValueError("the in-row layout (segment or positions given) needs image_pos: where each "
                       "image's slots start in the row")
    image_BxMxHxWxC = image[:, None] if image.ndim == 4 else image
    b, m = image_BxMxHxWxC.shape[:2]
    img_NxKxD = self.embed_image(image_BxMxHxWxC.reshape(b * m, *image_BxMxHxWxC.shape[2:]))
    return scatter_tokens(x_BxLxD, img_NxKxD.reshape(b, m, *img_NxKxD.shape[1:]), image_pos_BxM)

  def sequence_logits(self, image: Array, text_BxT: Array, mask_ar_BxT: Array, mask_input_BxT: Array,
                      image_pos_BxM: Array | None = None, segment_BxL: Array | None = None,
                      positions_BxL: Array | None = None) -> Array:
    """Logits at every position of the decoder's sequence: Bx(N+T)xV inserted, BxLxV in-row."""
    return self.decoder.logits(self._hidden(image, text_BxT, mask_ar_BxT, mask_input_BxT, image_pos_BxM,
                                            segment_BxL, positions_BxL))

  def _hidden(self, image: Array, text_BxT: Array, mask_ar_BxT: Array, mask_input_BxT: Array,
              image_pos_BxM: Array | None = None, segment_BxL: Array | None = None,
              positions_BxL: Array | None = None) -> Array:
    """The last decoder block's output at every position of the sequence (before the head): BxLxD."""
    if in_row(image_pos_BxM, segment_BxL, positions_BxL):
      x_BxLxD = self._in_row_inputs(image, text_BxT, image_pos_BxM)
      mask_ar_BxL = mask_ar_BxT if self.prefix_attention else jnp.ones_like(mask_ar_BxT)
      mask_BxLxL = make_attn_mask(mask_input_BxT, mask_ar_BxL, segment_BxL)
      h_BxLxD, _ = self.decoder(x_BxLxD, row_positions(text_BxT, positions_BxL), mask_BxLxL, head=False)
      return h_BxLxD
    x_BxLxD, input_mask_BxL, positions_BxL = self._inputs(image, text_BxT, mask_input_BxT)
    if self.prefix_attention:  # image tokens: mask_ar 0, they join the prefix block
      n = x_BxLxD.shape[1] - text_BxT.shape[1]
      mask_ar_BxL = insert_tokens(mask_ar_BxT, jnp.zeros((text_BxT.shape[0], n), mask_ar_BxT.dtype),
                                  self.image_position)
    else:
      mask_ar_BxL = jnp.ones_like(input_mask_BxL)
    h_BxLxD, _ = self.decoder(x_BxLxD, positions_BxL, make_attn_mask(input_mask_BxL, mask_ar_BxL),
                              head=False)
    return h_BxLxD

  def prefill(self, image: Array, prefix_BxP: Array, prefix_mask_BxP: Array, cache: Cache,
              image_pos_BxM: Array | None = None) -> tuple[Array, Cache, Array]:
    """Runs image + (right-padded) prefix through the decoder, filling cache slots [0, N + P); in-row
    (image_pos given: the prefix holds the image slots) slots [0, P).

    Returns (logits BxPxV at the prefix positions, cache, cache_mask BxS: the slots holding real tokens).
    """
    if image_pos_BxM is not None:
      x_BxLxD, input_mask_BxL = self._in_row_inputs(image, prefix_BxP, image_pos_BxM), prefix_mask_BxP
      positions_BxL = row_positions(prefix_BxP)
    else:
      x_BxLxD, input_mask_BxL, positions_BxL = self._inputs(image, prefix_BxP, prefix_mask_BxP)
    # Keys are the real slots of the cache; the prefix is one bidirectional block, or causal.
    cache_mask_BxS, mask_BxLxS = prefill_masks(input_mask_BxL, cache, causal=not self.prefix_attention)
    h_BxLxD, cache = self.decoder(x_BxLxD, positions_BxL, mask_BxLxS, cache, 0, head=False)
    n = input_mask_BxL.shape[1] - prefix_BxP.shape[1]
    logits_BxPxV = self.decoder.logits(drop_tokens(h_BxLxD, self.image_position, n))
    return logits_BxPxV, cache, cache_mask_BxS

  def decode_step(self, token_B: Array, position_B: Array, cache: Cache, cache_mask_BxS: Array,
                  slot) -> tuple[Array, Cache, Array]:
    """Feeds one token per example at RoPE position `position_B`, stored in cache slot `slot`.

    Returns (logits BxV, cache, cache_mask). Positions and slots differ because prefixes are padded.
    """
    return decode_token(self.decoder, token_B, position_B, cache, cache_mask_BxS, slot)

  def count_flops(self, t: Tally, sizes: Sizes, batch: int, images_per_row: int | None = None) -> None:
    """Matmul FLOPs of the teacher-forced forward on `batch` examples (models/flop_count.py). None:
    one image inserted (the sequence text_len + N, the head on text_len); M: the in-row layout, M
    images encoded per row, their slots inside text_len, the head on every position."""
    self.decoder.count_embed(t, "decoder", "x")
    n, m = 0, images_per_row or 1
    if self.encoder is not None:
      patches, e = counter(self.encoder)(t, "encoder", batch * m, sizes.image_size, "img")
      n = counter(self.connector)(t, "connector", "img", batch * m, patches, e)
      t.ew("x", ["x", "img"])
    if images_per_row is not None:
      n = 0
    # Inserted, the head runs on the text positions only (__call__).
    self.decoder.count_flops(t, "decoder", "x", batch, sizes.text_len + n, sizes.text_len)


# --- the families of this model: unified, fuyu (raw patches for an encoder), lm (no image) ---

def _in_sequence(model_cfg, tokenizer_vocab: int, encoder: str) -> UnifiedVLM:
  return UnifiedVLM(encoder=encoders.ENCODERS[encoder].build(model_cfg),
                    connector=family.build_connector(model_cfg),
                    decoder=family.build_decoder(model_cfg, tokenizer_vocab),
                    image_position=model_cfg.image_position, prefix_attention=model_cfg.prefix_attention)


def unified(model_cfg, tokenizer_vocab: int) -> UnifiedVLM:
  """Method A: image tokens from the connector in the decoder's sequence (PaliGemma, LLaVA)."""
  return _in_sequence(model_cfg, tokenizer_vocab, "vit")


def fuyu(model_cfg, tokenizer_vocab: int) -> UnifiedVLM:
  """Fuyu: the unified model with raw pixel patches (model.encoder.patch_size) for an encoder."""
  return _in_sequence(model_cfg, tokenizer_vocab, "patches")


def language_model(model_cfg, tokenizer_vocab: int) -> UnifiedVLM:
  """The decoder alone (an imported Gemma / Llama): a causal LM that ignores the image."""
  return UnifiedVLM(encoder=None, connector=None, decoder=family.build_decoder(model_cfg, tokenizer_vocab),
                    prefix_attention=model_cfg.prefix_attention)


def _checks(encoder: str | None):
  def check(config) -> None:
    if encoder:
      encoders.check_image(config, encoder)
      checks.image_position(config)
    checks.decoder(config)
  return check


UNIFIED = family.Family(unified, _checks("vit"), image_in_sequence=True)
FUYU = family.Family(fuyu, _checks("patches"), image_in_sequence=True)
LM = family.Family(language_model, _checks(None))

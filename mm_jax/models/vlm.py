"""Unified-embedding VLM (PaliGemma, LLaVA): image tokens sit in the decoder's input sequence.

  image -> encoder (ViT) -> connector -> [text_1..text_k, img_1 .. img_N, text_k+1 .. text_T] -> decoder
k = image_position: 0 for PaliGemma (image first), 1 for LLaVA (after BOS). Attention (see
layers.make_attn_mask): with prefix_attention (PaliGemma) image + text prefix see each other fully and
the suffix is causal; without it (LLaVA) everything is causal. With no encoder the model is a text-only
LM over the same inputs (the image is ignored). Parameter subtrees: `encoder`, `connector`, `decoder`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.models import checks, encoders, family
from mm_jax.models.decoder import Cache, prefill_masks
from mm_jax.models.flop_count import Sizes, Tally, counter
from mm_jax.models.layers import drop_tokens, insert_tokens, make_attn_mask

Array = jax.Array


class UnifiedVLM(nn.Module):
  encoder: nn.Module | None
  connector: nn.Module | None
  decoder: nn.Module
  image_position: int = 0
  prefix_attention: bool = True
  task = "vqa"

  def num_image_tokens(self, image_shape) -> int:
    """Image tokens in the decoder's sequence: the connector's count for the encoder's patches."""
    if self.encoder is None:
      return 0
    return self.connector.num_tokens(self.encoder.num_patches(image_shape))

  def embed_image(self, image_BxHxWxC: Array) -> Array:
    return self.connector(self.encoder(image_BxHxWxC))

  def __call__(self, image_BxHxWxC: Array, text_BxT: Array, mask_ar_BxT: Array,
               mask_input_BxT: Array) -> Array:
    """Teacher-forced forward. Returns text logits BxTxV: logit t predicts text token t + 1 (except at
    t = image_position - 1, whose next element is the image; that is a prefix position, never scored).
    The head runs on the text positions only: image positions are never scored, and at PaliGemma's
    size they are 3/4 of the sequence (the vocab projection was ~10 % of the step)."""
    h_BxLxD = self._hidden(image_BxHxWxC, text_BxT, mask_ar_BxT, mask_input_BxT)
    n = h_BxLxD.shape[1] - text_BxT.shape[1]
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

  def sequence_logits(self, image_BxHxWxC: Array, text_BxT: Array, mask_ar_BxT: Array,
                      mask_input_BxT: Array) -> Array:
    """Logits at every position of the decoder's sequence: Bx(N+T)xV."""
    return self.decoder.logits(self._hidden(image_BxHxWxC, text_BxT, mask_ar_BxT, mask_input_BxT))

  def _hidden(self, image_BxHxWxC: Array, text_BxT: Array, mask_ar_BxT: Array,
              mask_input_BxT: Array) -> Array:
    """The last decoder block's output at every position of the sequence (before the head): BxLxD."""
    x_BxLxD, input_mask_BxL, positions_BxL = self._inputs(image_BxHxWxC, text_BxT, mask_input_BxT)
    if self.prefix_attention:  # image tokens: mask_ar 0, they join the prefix block
      n = x_BxLxD.shape[1] - text_BxT.shape[1]
      mask_ar_BxL = insert_tokens(mask_ar_BxT, jnp.zeros((text_BxT.shape[0], n), mask_ar_BxT.dtype),
                                  self.image_position)
    else:
      mask_ar_BxL = jnp.ones_like(input_mask_BxL)
    h_BxLxD, _ = self.decoder(x_BxLxD, positions_BxL, make_attn_mask(input_mask_BxL, mask_ar_BxL),
                              head=False)
    return h_BxLxD

  def prefill(self, image_BxHxWxC: Array, prefix_BxP: Array, prefix_mask_BxP: Array,
              cache: Cache) -> tuple[Array, Cache, Array]:
    """Runs image + (right-padded) prefix through the decoder, filling cache slots [0, N + P).

    Returns (logits BxPxV at the prefix positions, cache, cache_mask BxS: the slots holding real tokens).
    """
    x_BxLxD, input_mask_BxL, positions_BxL = self._inputs(image_BxHxWxC, prefix_BxP, prefix_mask_BxP)
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
    cache_mask_BxS = cache_mask_BxS.at[:, slot].set(True)
    x_Bx1xD = self.decoder.embed(token_B[:, None])
    logits_Bx1xV, cache = self.decoder(x_Bx1xD, position_B[:, None], cache_mask_BxS[:, None, :],
                                       cache, slot)
    return logits_Bx1xV[:, 0], cache, cache_mask_BxS

  def count_flops(self, t: Tally, sizes: Sizes, batch: int) -> None:
    """Matmul FLOPs of the teacher-forced forward on `batch` examples (models/flop_count.py)."""
    self.decoder.count_embed(t, "decoder", "x")
    n = 0
    if self.encoder is not None:
      patches, e = counter(self.encoder)(t, "encoder", batch, sizes.image_size, "img")
      n = counter(self.connector)(t, "connector", "img", batch, patches, e)
      t.ew("x", ["x", "img"])
    # The head runs on the text positions only (__call__).
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

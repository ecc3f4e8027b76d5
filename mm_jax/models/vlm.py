"""Unified-embedding VLM (PaliGemma-style): image tokens are a prefix of the decoder's input sequence.

  image -> encoder (ViT) -> connector -> [img_1 .. img_N, text_1 .. text_T] -> decoder -> logits
Attention (see layers.make_attn_mask): image + text prefix see each other fully, the suffix is causal.
Parameter subtrees: `encoder`, `connector`, `decoder`.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.models.gemma import Cache
from mm_jax.models.layers import make_attn_mask

Array = jax.Array


class UnifiedVLM(nn.Module):
  encoder: nn.Module
  connector: nn.Module
  decoder: nn.Module

  def embed_image(self, image_BxHxWxC: Array) -> Array:
    return self.connector(self.encoder(image_BxHxWxC))

  def __call__(self, image_BxHxWxC: Array, text_BxT: Array, mask_ar_BxT: Array,
               mask_input_BxT: Array) -> Array:
    """Teacher-forced forward. Returns text logits BxTxV (logit t predicts text token t + 1)."""
    n = self.encoder.num_patches(image_BxHxWxC.shape)
    return self.sequence_logits(image_BxHxWxC, text_BxT, mask_ar_BxT, mask_input_BxT)[:, n:]

  def _inputs(self, image_BxHxWxC: Array, text_BxT: Array, mask_input_BxT: Array):
    """The decoder's input [image tokens, text embeddings] BxLxD, its input mask and positions BxL."""
    img_BxNxD = self.embed_image(image_BxHxWxC)
    b, n = img_BxNxD.shape[:2]
    x_BxLxD = jnp.concatenate([img_BxNxD, self.decoder.embed(text_BxT)], axis=1)
    input_mask_BxL = jnp.concatenate([jnp.ones((b, n), jnp.int32), mask_input_BxT], axis=1)
    positions_BxL = jnp.broadcast_to(jnp.arange(x_BxLxD.shape[1]), input_mask_BxL.shape)
    return x_BxLxD, input_mask_BxL, positions_BxL

  def sequence_logits(self, image_BxHxWxC: Array, text_BxT: Array, mask_ar_BxT: Array,
                      mask_input_BxT: Array) -> Array:
    """Logits at every position of [image tokens, text tokens]: Bx(N+T)xV."""
    x_BxLxD, input_mask_BxL, positions_BxL = self._inputs(image_BxHxWxC, text_BxT, mask_input_BxT)
    n = x_BxLxD.shape[1] - text_BxT.shape[1]
    mask_ar_BxL = jnp.pad(mask_ar_BxT, ((0, 0), (n, 0)))  # image tokens: 0, the prefix block
    logits_BxLxV, _ = self.decoder(x_BxLxD, positions_BxL, make_attn_mask(input_mask_BxL, mask_ar_BxL))
    return logits_BxLxV

  def prefill(self, image_BxHxWxC: Array, prefix_BxP: Array, prefix_mask_BxP: Array,
              cache: Cache) -> tuple[Array, Cache, Array]:
    """Runs image + (right-padded) prefix through the decoder, filling cache slots [0, N + P).

    Returns (logits BxPxV at the prefix positions, cache, cache_mask BxS: the slots holding real tokens).
    """
    x_BxLxD, input_mask_BxL, positions_BxL = self._inputs(image_BxHxWxC, prefix_BxP, prefix_mask_BxP)
    (b, l), s = input_mask_BxL.shape, cache[0]["k"].shape[1]
    cache_mask_BxS = jnp.pad(input_mask_BxL, ((0, 0), (0, s - l))) > 0
    # The whole prefix is one bidirectional block; keys are the real slots of the cache.
    mask_BxLxS = jnp.broadcast_to(cache_mask_BxS[:, None, :], (b, l, s))
    logits_BxLxV, cache = self.decoder(x_BxLxD, positions_BxL, mask_BxLxS, cache, 0)
    return logits_BxLxV[:, l - prefix_BxP.shape[1]:], cache, cache_mask_BxS

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

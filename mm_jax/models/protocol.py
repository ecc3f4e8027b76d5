"""What eval.decode.greedy_decode needs of a model (vlm.UnifiedVLM, cross_attention.CrossAttentionVLM
and hybrid.HybridVLM have it): type a decoding loop against Decodable, not one model class.

  n = model.num_image_tokens(image.shape); cache = model.decoder.init_cache(b, n + p + max_new)
  logits, cache, cache_mask = model.apply(variables, image, prefix, prefix_mask, cache, method=model.prefill)
  (the in-row layout: ... cache, image_pos, method=model.prefill, and n = 0: the prefix holds the slots)
  logits, cache, cache_mask = model.apply(variables, token, position, cache, cache_mask, slot,
                                          method=model.decode_step)
"""
from typing import Any, Protocol

import jax

Array = jax.Array


class CacheMaker(Protocol):
  def init_cache(self, batch: int, length: int) -> Any:
    """An empty self-attention KV cache of `length` slots (decoder.Decoder's)."""


class Decodable(Protocol):
  decoder: CacheMaker

  def num_image_tokens(self, image_shape) -> int:
    """One image's positions in the decoder's sequence (and so in the cache), BxHxWxC or BxMxHxWxC."""

  def prefill(self, image: Array, prefix_BxP: Array, prefix_mask_BxP: Array, cache: Any,
              image_pos_BxM: Array | None = None) -> tuple[Array, Any, Array]:
    """(logits BxPxV at the prefix positions, cache, cache_mask BxS of the real slots). image_pos given:
    the in-row layout (models/vlm.py), the images BxMxHxWxC already have their slots in the prefix."""

  def decode_step(self, token_B: Array, position_B: Array, cache: Any, cache_mask_BxS: Array,
                  slot) -> tuple[Array, Any, Array]:
    """One token per example at RoPE position position_B, in cache slot `slot`: (logits BxV, cache,
    cache_mask)."""

  def apply(self, variables, *args, method=None, **kwargs) -> Any:
    """flax.linen.Module.apply."""

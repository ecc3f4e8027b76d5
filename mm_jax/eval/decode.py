"""Greedy decoding with a KV cache: one prefill of image + prefix, then one token per step.

Prefixes are right-padded to P, so cache slots and RoPE positions differ: example b's t-th new token
sits at position N + prefix_len[b] + t (contiguous with its prefix, as in training) but in slot
N + P + t (the same for all examples); the padded slots are masked out.
"""
import jax
import jax.numpy as jnp

from mm_jax.models.protocol import Decodable


def greedy_decode(model: Decodable, params, image_BxHxWxC: jax.Array, prefix_BxP: jax.Array,
                  prefix_mask_BxP: jax.Array, prefix_len_B: jax.Array, max_new: int) -> jax.Array:
  """Returns the greedy continuation, int32 BxM (M = max_new); callers cut it at EOS. Any model with
  prefill / decode_step (models/protocol.py) decodes so."""
  variables = {"params": params}
  b, p = prefix_BxP.shape
  n = model.num_image_tokens(image_BxHxWxC.shape)
  cache = model.decoder.init_cache(b, n + p + max_new)
  logits_BxPxV, cache, cache_mask = model.apply(
      variables, image_BxHxWxC, prefix_BxP, prefix_mask_BxP, cache, method=model.prefill)
  first_B = jnp.argmax(logits_BxPxV[jnp.arange(b), prefix_len_B - 1], axis=-1).astype(jnp.int32)

  def body(t, carry):
    tokens_BxM, token_B, cache, cache_mask = carry
    logits_BxV, cache, cache_mask = model.apply(
        variables, token_B, n + prefix_len_B + t, cache, cache_mask, n + p + t,
        method=model.decode_step)
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return tokens_BxM.at[:, t + 1].set(token_B), token_B, cache, cache_mask

  tokens_BxM = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first_B)
  tokens_BxM, *_ = jax.lax.fori_loop(0, max_new - 1, body, (tokens_BxM, first_B, cache, cache_mask))
  return tokens_BxM

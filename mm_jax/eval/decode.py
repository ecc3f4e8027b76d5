"""Greedy decoding with a KV cache: one prefill of image + prefix, then one token per step.

Prefixes are right-padded to P, so cache slots and RoPE positions differ: example b's t-th new token
sits at position N + prefix_len[b] + t (contiguous with its prefix, as in training) but in slot
N + P + t (the same for all examples); the padded slots are masked out. N: the image tokens the model
inserts before the prefix; in the in-row layout (image_pos given) the prefix already holds the image
slots (prefix_len counts them) and N = 0. One example per row: no packing here.
"""
import jax
import jax.numpy as jnp

from mm_jax.models.protocol import Decodable


def greedy_decode(model: Decodable, params, image: jax.Array, prefix_BxP: jax.Array,
                  prefix_mask_BxP: jax.Array, prefix_len_B: jax.Array, max_new: int,
                  image_pos: jax.Array | None = None) -> jax.Array:
  """Returns the greedy continuation, int32 B x max_new; callers cut it at EOS. Any model with
  prefill / decode_step (models/protocol.py) decodes so. image: BxHxWxC, inserted; with image_pos
  (int BxM: where image m's slots start in the prefix; cross: the first token that sees it) BxMxHxWxC."""
  variables = {"params": params}
  b, p = prefix_BxP.shape
  n = model.num_image_tokens(image.shape) if image_pos is None else 0
  cache = model.decoder.init_cache(b, n + p + max_new)
  in_row = () if image_pos is None else (image_pos,)  # a model without the layout: called as before
  logits_BxPxV, cache, cache_mask = model.apply(
      variables, image, prefix_BxP, prefix_mask_BxP, cache, *in_row, method=model.prefill)
  first_B = jnp.argmax(logits_BxPxV[jnp.arange(b), prefix_len_B - 1], axis=-1).astype(jnp.int32)

  def body(t, carry):
    tokens_BxK, token_B, cache, cache_mask = carry
    logits_BxV, cache, cache_mask = model.apply(
        variables, token_B, n + prefix_len_B + t, cache, cache_mask, n + p + t,
        method=model.decode_step)
    token_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    return tokens_BxK.at[:, t + 1].set(token_B), token_B, cache, cache_mask

  tokens_BxK = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first_B)
  tokens_BxK, *_ = jax.lax.fori_loop(0, max_new - 1, body, (tokens_BxK, first_B, cache, cache_mask))
  return tokens_BxK

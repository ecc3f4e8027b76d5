"""KV-cached decoding: one prefill of image + prefix, then one token per step, greedy or sampled.

Prefixes are right-padded to P, so cache slots and RoPE positions differ: example b's t-th new token
sits at position N + prefix_len[b] + t (contiguous with its prefix, as in training) but in slot
N + P + t (the same for all examples); the padded slots are masked out. N: the image tokens the model
inserts before the prefix; in the in-row layout (image_pos given) the prefix already holds the image
slots (prefix_len counts them) and N = 0. One example per row: no packing here. The loop stops early
once every row has emitted one of `stop_ids`; a finished row repeats its stop token.
"""
import jax
import jax.numpy as jnp

from mm_jax.eval.sample import GREEDY, Sampling, choose, step_keys
from mm_jax.models.protocol import Decodable


def decode(model: Decodable, params, image: jax.Array, prefix_BxP: jax.Array, prefix_mask_BxP: jax.Array,
           prefix_len_B: jax.Array, max_new: int, image_pos: jax.Array | None = None,
           sampling: Sampling = GREEDY, key: jax.Array | None = None,
           stop_ids: tuple[int, ...] = (), prefill_kw: dict | None = None,
           position_offset_B: jax.Array | None = None) -> jax.Array:
  """The continuation, int32 B x max_new; callers cut it at the first stop token. Any model with
  prefill / decode_step (models/protocol.py) decodes so. image: BxHxWxC, inserted; with image_pos
  (int BxM: where image m's slots start in the prefix; cross: the first token that sees it) BxMxHxWxC.
  Sampling needs `key`; the same key gives the same tokens. prefill_kw: a model's own prefill inputs
  (the tiled encoder's aspect_ratio_ids_BxI; native: patch_ids_BxPx3, positions_BxPx3).
  position_offset_B: added to every new token's position (M-RoPE: the prefix's positions run past its
  length, native.mrope_offset; by default the model's own position_offset, if it has one)."""
  if not sampling.greedy and key is None:
    raise ValueError("sampling needs a key (jax.random.key(seed))")
  variables = {"params": params}
  b, p = prefix_BxP.shape
  n = model.num_image_tokens(image.shape) if image_pos is None else 0
  cache = model.decoder.init_cache(b, n + p + max_new)
  if image_pos is not None:  # an empty slot (at or past the prefix): out of reach of the new tokens too,
    image_pos = jnp.where(image_pos >= p, jnp.iinfo(jnp.int32).max // 2, image_pos)  # cross would see it
  in_row = () if image_pos is None else (image_pos,)  # a model without the layout: called as before
  logits_BxPxV, cache, cache_mask = model.apply(
      variables, image, prefix_BxP, prefix_mask_BxP, cache, *in_row, method=model.prefill,
      **(prefill_kw or {}))
  keys = (lambda t: None) if sampling.greedy else (lambda t: step_keys(key, b, t))
  stops = jnp.asarray(stop_ids or (-1,), jnp.int32)
  first_B = choose(logits_BxPxV[jnp.arange(b), prefix_len_B - 1], keys(0), sampling)
  if position_offset_B is None and hasattr(model, "position_offset"):  # M-RoPE (native)
    position_offset_B = model.position_offset(prefill_kw or {}, prefix_len_B)
  start_B = n + prefix_len_B + (0 if position_offset_B is None else position_offset_B)

  def running(carry):
    t, _, _, done_B, _, _ = carry
    return (t < max_new - 1) & ~jnp.all(done_B)

  def body(carry):
    t, tokens_BxK, token_B, done_B, cache, cache_mask = carry
    logits_BxV, cache, cache_mask = model.apply(
        variables, token_B, start_B + t, cache, cache_mask, n + p + t,
        method=model.decode_step)
    token_B = jnp.where(done_B, token_B, choose(logits_BxV, keys(t + 1), sampling))
    done_B = done_B | jnp.isin(token_B, stops)
    return t + 1, tokens_BxK.at[:, t + 1].set(token_B), token_B, done_B, cache, cache_mask

  tokens_BxK = jnp.zeros((b, max_new), jnp.int32).at[:, 0].set(first_B)
  carry = (0, tokens_BxK, first_B, jnp.isin(first_B, stops), cache, cache_mask)
  t, tokens_BxK, last_B, *_ = jax.lax.while_loop(running, body, carry)
  # rows that stopped early: the slots the loop never reached repeat the stop token
  return jnp.where(jnp.arange(max_new)[None] > t, last_B[:, None], tokens_BxK)


def greedy_decode(model: Decodable, params, image: jax.Array, prefix_BxP: jax.Array,
                  prefix_mask_BxP: jax.Array, prefix_len_B: jax.Array, max_new: int,
                  image_pos: jax.Array | None = None) -> jax.Array:
  """decode(...) with greedy choice and no stop token: every row runs max_new tokens."""
  return decode(model, params, image, prefix_BxP, prefix_mask_BxP, prefix_len_B, max_new, image_pos)

"""Choosing the next token from logits: greedy, or sampled with temperature, top-k and top-p.

  s = Sampling(temperature=0.7, top_k=40, top_p=0.9)   # Sampling() is greedy
  token_B = choose(logits_BxV, step_keys(key, b, t), s)

The filters follow transformers' logits warpers, in generate's order: logits / temperature, then top-k
(every token tied with the k-th largest kept), then top-p (the smallest set of most likely tokens whose
probability reaches top_p, the most likely always kept). Each row draws with its own key, so a row's
tokens depend on the seed, its index and the step, not on what else is in the batch.
"""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
  temperature: float = 0.0  # 0: greedy (top_k and top_p unused)
  top_k: int = 0            # 0: no top-k filter
  top_p: float = 1.0        # 1: no top-p filter

  def __post_init__(self):
    if self.temperature < 0 or self.top_k < 0 or not 0 < self.top_p <= 1:
      raise ValueError(f"sampling needs temperature >= 0, top_k >= 0 and 0 < top_p <= 1, got {self}")

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


GREEDY = Sampling()


def filtered_logits(logits_BxV: jax.Array, s: Sampling) -> jax.Array:
  """Logits / temperature with the tokens top-k and top-p remove set to -inf (float32)."""
  x_BxV = logits_BxV.astype(jnp.float32) / s.temperature
  if s.top_k and s.top_k < x_BxV.shape[-1]:
    kth_Bx1 = jax.lax.top_k(x_BxV, s.top_k)[0][:, -1:]
    x_BxV = jnp.where(x_BxV < kth_Bx1, -jnp.inf, x_BxV)
  if s.top_p < 1:
    order_BxV = jnp.argsort(-x_BxV, axis=-1)
    sorted_BxV = jnp.take_along_axis(x_BxV, order_BxV, axis=-1)
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV  # mass of the tokens ranked above
    drop_sorted_BxV = before_BxV >= s.top_p
    drop_BxV = jnp.zeros_like(drop_sorted_BxV).at[
        jnp.arange(x_BxV.shape[0])[:, None], order_BxV].set(drop_sorted_BxV)
    x_BxV = jnp.where(drop_BxV, -jnp.inf, x_BxV)
  return x_BxV


def step_keys(key: jax.Array, batch: int, step) -> jax.Array:
  """Row b's key at decoding step t: fold_in(split(key, batch)[b], t); `key` may instead hold one key
  per row (shape [batch]), e.g. each row's by its index in a whole input file."""
  rows = key if key.ndim == 1 else jax.random.split(key, batch)
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(rows)


def choose(logits_BxV: jax.Array, keys_B: jax.Array | None, s: Sampling) -> jax.Array:
  """The next token per row, int32 B: argmax when greedy, else a draw from the filtered softmax."""
  if s.greedy:
    return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
  x_BxV = filtered_logits(logits_BxV, s)
  return jax.vmap(jax.random.categorical)(keys_B, x_BxV).astype(jnp.int32)

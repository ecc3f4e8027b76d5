"""Greedy KV-cached decoding equals greedy decoding by re-running the full forward, with ragged prefixes."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from mm_jax.eval.decode import greedy_decode
from mm_jax.models import build_model

V = 40


def _recompute_greedy(model, params, image, prefix, length, max_new):
  """Reference: append the argmax token and run the whole (unpadded) sequence again, one example."""
  tokens = list(np.asarray(prefix[:length]))
  out = []
  apply = jax.jit(lambda t, ar: model.apply({"params": params}, image[None], t, ar, jnp.ones_like(t)))
  for _ in range(max_new):
    t = jnp.asarray(tokens)[None]
    ar = jnp.asarray([[0] * length + [1] * (len(tokens) - length)])
    logits = apply(t, ar)
    nxt = int(jnp.argmax(logits[0, -1]))
    out.append(nxt)
    tokens.append(nxt)
  return out


@pytest.mark.slow  # long: decodes, or trains and resumes, several times
def test_cached_greedy_matches_recompute_with_ragged_prefixes():
  config = load_config("test")
  model = build_model(config.model, V)
  b, s, p, max_new = 3, 32, 6, 4
  image = jax.random.normal(jax.random.key(1), (b, s, s, 3))
  prefix = jax.random.randint(jax.random.key(2), (b, p), 4, V)
  lengths = jnp.array([6, 3, 1])
  mask = (jnp.arange(p)[None] < lengths[:, None]).astype(jnp.int32)
  prefix = jnp.where(mask > 0, prefix, 0)
  params = nn.meta.unbox(model.init(jax.random.key(0), image, prefix, jnp.zeros_like(prefix), mask))["params"]
  # Scale the head so greedy choices are not near-ties.
  params["decoder"]["embedder"]["embedding"] = params["decoder"]["embedder"]["embedding"] * 50
  got = jax.jit(lambda *a: greedy_decode(model, params, *a, max_new=max_new))(image, prefix, mask, lengths)
  for i in range(b):
    want = _recompute_greedy(model, params, image[i], prefix[i], int(lengths[i]), max_new)
    assert list(np.asarray(got[i])) == want, f"row {i}"


@pytest.mark.slow  # two decodes per layout
@pytest.mark.parametrize("llava", [False, True])
def test_in_row_greedy_equals_the_inserted_layout(llava):
  """One image: greedy_decode with image_pos (its N slots already in the prefix at image_position)
  gives the inserted layout's tokens, ragged prefixes included."""
  config = load_config("test")
  if llava:
    config.model.update(dict(image_position=1, prefix_attention=False))
  model = build_model(config.model, V)
  b, s, p, max_new = 3, 32, 5, 4
  n, k = model.num_image_tokens((b, s, s, 3)), model.image_position
  image = jax.random.normal(jax.random.key(1), (b, s, s, 3))
  lengths = jnp.array([5, 3, 2])
  mask = (jnp.arange(p)[None] < lengths[:, None]).astype(jnp.int32)
  prefix = jnp.where(mask > 0, jax.random.randint(jax.random.key(2), (b, p), 4, V), 0)
  params = nn.meta.unbox(model.init(jax.random.key(0), image, prefix, jnp.zeros_like(prefix), mask))["params"]
  params["decoder"]["embedder"]["embedding"] = params["decoder"]["embedder"]["embedding"] * 50
  decode = jax.jit(lambda *a, **kw: greedy_decode(model, params, *a, max_new=max_new, **kw))
  want = decode(image, prefix, mask, lengths)
  slots = lambda x, v: jnp.concatenate([x[:, :k], jnp.full((b, n), v, x.dtype), x[:, k:]], axis=1)
  got = decode(image[:, None], slots(prefix, 0), slots(mask, 1), lengths + n, image_pos=jnp.full((b, 1), k))
  np.testing.assert_array_equal(got, want)

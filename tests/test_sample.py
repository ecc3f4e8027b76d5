"""Sampling: the filters against a NumPy reference of transformers' warpers (chi-square over 10,000
draws), top-k 1 = greedy, seeded reproducibility, stop tokens, and cached sampling = recompute."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from conftest import load_config
from mm_jax.eval.decode import decode, greedy_decode
from mm_jax.eval.sample import Sampling, choose, filtered_logits, step_keys
from mm_jax.models import build_model

LOGITS = np.array([2.0, 1.5, 1.5, 0.7, 0.0, -0.3, -1.0, -2.5], np.float32)  # a tie at ranks 2 and 3


def _intended(logits, s: Sampling) -> np.ndarray:
  """The distribution transformers' TemperatureLogitsWarper, TopKLogitsWarper and TopPLogitsWarper
  sample from, written directly: softmax(logits / T), top-k (ties kept), then top-p (ascending cumsum,
  drop while <= 1 - top_p, the most likely kept)."""
  x = logits.astype(np.float64) / s.temperature
  if s.top_k:
    x = np.where(x < np.sort(x)[::-1][s.top_k - 1], -np.inf, x)
  if s.top_p < 1:
    asc = np.argsort(x, kind="stable")
    p = np.exp(x[asc] - x.max())
    cum = np.cumsum(p / p.sum())
    drop = cum <= 1 - s.top_p
    drop[-1] = False
    x[asc[drop]] = -np.inf
  p = np.exp(x - x.max())
  return p / p.sum()


@pytest.mark.parametrize("s", [Sampling(1.0), Sampling(0.6), Sampling(1.0, top_k=3), Sampling(1.0, top_k=2),
                               Sampling(1.0, top_p=0.75), Sampling(1.4, top_k=6, top_p=0.9),
                               Sampling(0.8, top_p=0.3)])
def test_draws_match_the_intended_distribution(s):
  n = 10_000
  logits = jnp.broadcast_to(jnp.asarray(LOGITS), (n, LOGITS.size))
  tokens = jax.jit(lambda k: choose(logits, step_keys(k, n, 0), s))(jax.random.key(7))
  counts = np.bincount(np.asarray(tokens), minlength=LOGITS.size)
  want = _intended(LOGITS, s)
  assert counts[want == 0].sum() == 0, (counts, want)
  kept = want > 0
  if kept.sum() > 1:
    assert stats.chisquare(counts[kept], want[kept] * n).pvalue >= 0.01, (counts, want * n)


def test_filters_keep_ties_and_the_most_likely():
  x = np.asarray(filtered_logits(jnp.asarray(LOGITS)[None], Sampling(1.0, top_k=2)))[0]
  assert np.isfinite(x).tolist() == [True, True, True] + [False] * 5  # rank 2 ties rank 3
  x = np.asarray(filtered_logits(jnp.asarray(LOGITS)[None], Sampling(1.0, top_p=0.01)))[0]
  assert np.isfinite(x).sum() == 1 and np.isfinite(x[0])


def test_bad_settings_are_refused():
  for kw in (dict(temperature=-1.0), dict(top_k=-1), dict(top_p=0.0), dict(top_p=1.5)):
    with pytest.raises(ValueError, match="sampling needs"):
      Sampling(**kw)


V = 40


def _setup(b=3, p=6, scale=1.0):
  config = load_config("test")
  model = build_model(config.model, V)
  s = 32
  image = jax.random.normal(jax.random.key(1), (b, s, s, 3))
  lengths = jnp.array([6, 3, 1][:b])
  mask = (jnp.arange(p)[None] < lengths[:, None]).astype(jnp.int32)
  prefix = jnp.where(mask > 0, jax.random.randint(jax.random.key(2), (b, p), 4, V), 0)
  params = nn.meta.unbox(model.init(jax.random.key(0), image, prefix, jnp.zeros_like(prefix), mask))["params"]
  params["decoder"]["embedder"]["embedding"] = params["decoder"]["embedder"]["embedding"] * scale
  return model, params, image, prefix, mask, lengths


@pytest.mark.slow  # four decodes of the test model
def test_seeded_sampling_reproduces_and_top_k_1_is_greedy():
  model, params, image, prefix, mask, lengths = _setup(scale=3.0)
  run = jax.jit(lambda key, s: decode(model, params, image, prefix, mask, lengths, 8, sampling=s, key=key),
                static_argnums=1)
  hot = Sampling(1.0)
  a, b, c = (run(jax.random.key(k), hot) for k in (0, 0, 1))
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  greedy = jax.jit(lambda: greedy_decode(model, params, image, prefix, mask, lengths, 8))()
  np.testing.assert_array_equal(run(jax.random.key(3), Sampling(1.0, top_k=1)), greedy)


def test_stop_tokens_end_rows_and_the_loop():
  model, params, image, prefix, mask, lengths = _setup(scale=3.0)
  free = np.asarray(jax.jit(lambda: greedy_decode(model, params, image, prefix, mask, lengths, 8))())
  stop = int(free[0, 2])  # row 0 emits it at step 2 (or earlier)
  got = np.asarray(jax.jit(lambda: decode(model, params, image, prefix, mask, lengths, 8,
                                          stop_ids=(stop,)))())
  for want, row in zip(free, got):
    at = list(want).index(stop) if stop in want else len(want)
    np.testing.assert_array_equal(row[:at + 1], want[:at + 1])  # the same up to its first stop
    assert (row[at:] == stop).all() or at == len(want)          # then the stop token repeated


def _recompute_sampled(model, params, image, prefix, length, max_new, keys_for_step, s):
  """Reference: run the whole (unpadded) sequence again for each new token, drawing with the key the
  cached decoder gives this row at this step."""
  tokens, out = list(np.asarray(prefix[:length])), []
  apply = jax.jit(lambda x, ar: model.apply({"params": params}, image[None], x, ar, jnp.ones_like(x)))
  for t in range(max_new):
    x = jnp.asarray(tokens)[None]
    ar = jnp.asarray([[0] * length + [1] * (len(tokens) - length)])
    logits = apply(x, ar)
    out.append(int(choose(logits[:, -1], keys_for_step(t)[None], s)[0]))
    tokens.append(out[-1])
  return out


@pytest.mark.slow  # runs the full forward once per token per row
def test_cached_sampling_matches_recompute_with_ragged_prefixes():
  model, params, image, prefix, mask, lengths = _setup(scale=2.0)
  s, key, max_new = Sampling(1.0, top_k=10, top_p=0.95), jax.random.key(5), 5
  got = jax.jit(lambda: decode(model, params, image, prefix, mask, lengths, max_new, sampling=s, key=key))()
  for i in range(3):
    want = _recompute_sampled(model, params, image[i], prefix[i], int(lengths[i]), max_new,
                              lambda t: step_keys(key, 3, t)[i], s)
    assert list(np.asarray(got[i])) == want, f"row {i}"

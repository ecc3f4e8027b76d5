"""Shared blocks: the attention mask, RoPE, RMSNorm, attention with grouped kv heads."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mm_jax.models import layers


def test_make_attn_mask_prefix_lm():
  input_mask = jnp.array([[1, 1, 1, 1, 1, 0]])
  mask_ar = jnp.array([[0, 0, 0, 1, 1, 1]])
  m = np.asarray(layers.make_attn_mask(input_mask, mask_ar))[0].astype(int)
  expected = np.array([
      [1, 1, 1, 0, 0, 0],   # prefix sees the whole prefix, never the suffix
      [1, 1, 1, 0, 0, 0],
      [1, 1, 1, 0, 0, 0],
      [1, 1, 1, 1, 0, 0],   # suffix: causal, sees all of the prefix
      [1, 1, 1, 1, 1, 0],
      [1, 1, 1, 1, 1, 0],   # the padding key is never attended
  ])
  np.testing.assert_array_equal(m, expected)


def test_make_attn_mask_causal_and_bidirectional():
  ones = jnp.ones((1, 4), jnp.int32)
  causal = np.asarray(layers.make_attn_mask(ones, ones))[0]
  np.testing.assert_array_equal(causal, np.tril(np.ones((4, 4), bool)))
  full = np.asarray(layers.make_attn_mask(ones, jnp.zeros_like(ones)))[0]
  assert full.all()


def test_make_attn_mask_packed_examples_keep_their_own_blocks():
  """Two examples in one row: each keeps its prefix-LM blocks, neither sees the other, even though the
  second opens with mask_ar 0 (which alone would join the first's last block); padding queries keep
  the unsegmented mask (no row all masked)."""
  input_mask = jnp.array([[1, 1, 1, 1, 1, 1, 1, 0]])
  mask_ar = jnp.array([[0, 0, 1, 0, 0, 1, 1, 1]])
  segment = jnp.array([[1, 1, 1, 2, 2, 2, 2, 0]])
  m = np.asarray(layers.make_attn_mask(input_mask, mask_ar, segment))[0].astype(int)
  expected = np.array([
      [1, 1, 0, 0, 0, 0, 0, 0],   # example 1: prefix of 2, then causal
      [1, 1, 0, 0, 0, 0, 0, 0],
      [1, 1, 1, 0, 0, 0, 0, 0],
      [0, 0, 0, 1, 1, 0, 0, 0],   # example 2: prefix of 2 (mask_ar 0 0), then causal
      [0, 0, 0, 1, 1, 0, 0, 0],
      [0, 0, 0, 1, 1, 1, 0, 0],
      [0, 0, 0, 1, 1, 1, 1, 0],
      [1, 1, 1, 1, 1, 1, 1, 0],   # padding query: the unsegmented mask
  ])
  np.testing.assert_array_equal(m, expected)
  alone = np.asarray(layers.make_attn_mask(input_mask[:, 3:7], mask_ar[:, 3:7]))[0]
  np.testing.assert_array_equal(m[3:7, 3:7], alone)  # as if example 2 had the row to itself
  one_segment = layers.make_attn_mask(input_mask, mask_ar, input_mask)
  np.testing.assert_array_equal(one_segment, layers.make_attn_mask(input_mask, mask_ar))


def test_scatter_tokens_fills_slots_and_drops_empty_images():
  seq = jnp.zeros((2, 6, 1))
  tokens = jnp.arange(1, 2 * 2 * 2 + 1, dtype=jnp.float32).reshape(2, 2, 2, 1)  # B=2, M=2, N=2
  pos = jnp.array([[1, 4], [0, 6]])  # row 1's second image is empty (pos = L)
  got = np.asarray(layers.scatter_tokens(seq, tokens, pos))[..., 0]
  np.testing.assert_array_equal(got, [[0, 1, 2, 0, 3, 4], [5, 6, 0, 0, 0, 0]])


def _rope_reference(x, pos, theta):
  """numpy, the HF rotate_half convention."""
  d = x.shape[-1]
  inv = 1.0 / theta ** (np.arange(0, d, 2) / d)
  f = pos[..., None] * inv
  emb = np.concatenate([f, f], -1)[:, :, None, :]
  rot = np.concatenate([-x[..., d // 2:], x[..., :d // 2]], -1)
  return x * np.cos(emb) + rot * np.sin(emb)


def test_rope_matches_half_split_reference():
  x = np.random.default_rng(0).normal(size=(2, 5, 3, 8)).astype(np.float32)
  pos = np.array([np.arange(5), np.arange(5) + 7], np.float32)
  got = layers.apply_rope(jnp.asarray(x), jnp.asarray(pos), 10_000.0)
  np.testing.assert_allclose(np.asarray(got), _rope_reference(x, pos, 10_000.0), atol=1e-5)


def test_rope_is_relative():
  """Shifting every position by the same offset leaves q.k unchanged."""
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 4, 1, 8)), jnp.float32) for _ in range(2))
  pos = jnp.arange(4)[None]
  dots = lambda off: jnp.einsum("blnh,bsnh->ls", layers.apply_rope(q, pos + off, 1e4),
                                layers.apply_rope(k, pos + off, 1e4))
  np.testing.assert_allclose(dots(0), dots(13), atol=1e-4)


def test_rmsnorm_gemma_form():
  x = jax.random.normal(jax.random.key(0), (2, 3, 16))
  norm = layers.RMSNorm()
  params = nn.meta.unbox(norm.init(jax.random.key(1), x))
  params = jax.tree.map(lambda p: p + 0.5, params)  # w = 0.5 -> scale 1.5
  y = norm.apply(params, x)
  ref = x / jnp.sqrt(jnp.mean(x ** 2, -1, keepdims=True) + 1e-6) * 1.5
  np.testing.assert_allclose(y, ref, atol=1e-5)


def test_attention_shapes_and_gqa_equals_repeated_kv():
  b, l, d = 2, 5, 16
  x = jax.random.normal(jax.random.key(0), (b, l, d))
  mask = jnp.ones((b, l, l), bool)
  gqa = layers.Attention(num_heads=4, num_kv_heads=2, head_dim=8, rope=layers.Rope(1e4))
  pos = jnp.broadcast_to(jnp.arange(l), (b, l))
  params = nn.meta.unbox(gqa.init(jax.random.key(1), x, mask, pos))["params"]
  chex.assert_shape(params["q"]["kernel"], (d, 4, 8))
  chex.assert_shape(params["k"]["kernel"], (d, 2, 8))
  chex.assert_shape(params["o"]["kernel"], (4, 8, d))
  y, cache = gqa.apply({"params": params}, x, mask, pos)
  chex.assert_shape(y, (b, l, d))
  assert cache is None
  # The same layer as plain multi-head attention with each kv head repeated for its group (HF).
  mha = layers.Attention(num_heads=4, num_kv_heads=4, head_dim=8, rope=layers.Rope(1e4))
  rep = lambda w: jnp.repeat(w, 2, axis=1)
  mha_params = dict(params, k={"kernel": rep(params["k"]["kernel"])},
                    v={"kernel": rep(params["v"]["kernel"])})
  y_mha, _ = mha.apply({"params": mha_params}, x, mask, pos)
  np.testing.assert_allclose(y, y_mha, atol=1e-5)


def test_every_param_has_logical_names():
  x = jnp.zeros((1, 3, 8))
  boxed = layers.Attention(2, 1, 4, use_bias=True).init(jax.random.key(0), x, jnp.ones((1, 3, 3), bool))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves)
  assert all(len(v.names) == v.value.ndim for v in leaves)


def test_llama_rmsnorm_is_weight_times_normalised():
  x = jax.random.normal(jax.random.key(0), (2, 3, 8)) * 3
  norm = layers.RMSNorm(eps=1e-5, form="llama")
  params = norm.init(jax.random.key(1), x)
  w = jax.random.normal(jax.random.key(2), (8,))
  got = norm.apply({"params": {"scale": w}}, x)
  want = np.asarray(x) / np.sqrt((np.asarray(x) ** 2).mean(-1, keepdims=True) + 1e-5) * np.asarray(w)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(nn.meta.unbox(params)["params"]["scale"], np.ones(8))  # init 1


def test_llama3_rope_scales_only_long_wavelengths():
  plain = layers.Rope(theta=5e5).inv_freq(64)
  scaled = layers.Rope(theta=5e5, type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_len=64).inv_freq(64)
  wavelen = 2 * np.pi / plain
  short, long = wavelen < 64 / 4, wavelen > 64 / 1
  assert short.any() and long.any()
  np.testing.assert_allclose(scaled[short], plain[short])
  np.testing.assert_allclose(scaled[long], plain[long] / 8, rtol=1e-6)
  mid = ~short & ~long
  assert np.all((scaled[mid] < plain[mid]) & (scaled[mid] > plain[mid] / 8))

"""Encoder, connector, decoder and the unified VLM: shapes, names, the prefix-LM mask, the KV cache."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from mm_jax.errors import UserError
from mm_jax.models import build_model
from mm_jax.models.connectors import Linear
from mm_jax.models.decoder import Decoder
from mm_jax.models.vit import ViT

B, S, T, V = 2, 32, 10, 40
N = (S // 8) ** 2  # image tokens of the test config (patch 8)


@pytest.fixture(scope="module")
def model_and_params():
  config = load_config("test")
  model = build_model(config.model, V)
  image = jax.random.normal(jax.random.key(1), (B, S, S, 3))
  text = jax.random.randint(jax.random.key(2), (B, T), 4, V)
  mask_ar = jnp.array([[0] * 4 + [1] * 6] * B)
  mask_input = jnp.ones((B, T), jnp.int32)
  boxed = model.init(jax.random.key(0), image, text, mask_ar, mask_input)["params"]
  return model, boxed, nn.meta.unbox(boxed), (image, text, mask_ar, mask_input)


def test_vit_shapes():
  vit = ViT(patch_size=8, width=32, depth=2, num_heads=4, mlp_dim=64)
  x = jnp.zeros((B, S, S, 3))
  out, params = vit.init_with_output(jax.random.key(0), x)
  chex.assert_shape(out, (B, N, 32))
  chex.assert_shape(nn.meta.unbox(params)["params"]["pos_embedding"], (N, 32))


def test_connector_shapes():
  out, _ = Linear(48).init_with_output(jax.random.key(0), jnp.zeros((B, N, 32)))
  chex.assert_shape(out, (B, N, 48))


def test_decoder_shapes_and_tied_head():
  dec = Decoder(vocab_size=V, width=32, depth=2, num_heads=4, num_kv_heads=2, head_dim=8, mlp_dim=64)
  x = jnp.zeros((B, T, 32))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  mask = jnp.ones((B, T, T), bool)
  (logits, cache), params = dec.init_with_output(jax.random.key(0), x, pos, mask)
  chex.assert_shape(logits, (B, T, V))
  assert cache is None
  names = set(nn.meta.unbox(params)["params"])
  assert "embedder" in names and not any("head" in n for n in names)  # no separate output matrix


def test_vlm_subtrees_logits_and_names(model_and_params):
  model, boxed, params, inputs = model_and_params
  assert set(params) == {"encoder", "connector", "decoder"}
  logits = model.apply({"params": params}, *inputs)
  chex.assert_shape(logits, (B, T, V))
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert all(isinstance(v, nn.LogicallyPartitioned) for v in leaves), "a param lacks logical names"


def test_prefix_lm_suffix_change_leaves_earlier_logits(model_and_params):
  model, _, params, (image, text, mask_ar, mask_input) = model_and_params
  base = model.apply({"params": params}, image, text, mask_ar, mask_input)
  changed = model.apply({"params": params}, image, text.at[:, -1].set(3), mask_ar, mask_input)
  np.testing.assert_array_equal(base[:, :-1], changed[:, :-1])
  assert not np.allclose(base[:, -1], changed[:, -1])


def test_prefix_lm_prefix_change_reaches_image_positions(model_and_params):
  """The last prefix token is seen by the image tokens (bidirectional prefix), unlike a causal LM."""
  model, _, params, (image, text, mask_ar, mask_input) = model_and_params
  run = lambda t, ar: model.apply({"params": params}, image, t, ar, mask_input,
                                  method=model.sequence_logits)
  changed = text.at[:, 3].set(5)
  assert np.abs(np.asarray(run(text, mask_ar)[:, :N] - run(changed, mask_ar)[:, :N])).max() > 1e-6
  # With a causal mask (mask_ar all 1) the image positions cannot see it.
  causal = jnp.ones_like(mask_ar)
  np.testing.assert_array_equal(run(text, causal)[:, :N], run(changed, causal)[:, :N])


def test_image_changes_text_logits(model_and_params):
  model, _, params, (image, text, mask_ar, mask_input) = model_and_params
  a = model.apply({"params": params}, image, text, mask_ar, mask_input)
  b = model.apply({"params": params}, image * 0.5, text, mask_ar, mask_input)
  assert np.abs(np.asarray(a - b)).max() > 1e-6


def test_kv_cache_decoding_gives_full_forward_logits(model_and_params):
  model, _, params, (image, text, mask_ar, mask_input) = model_and_params
  full = model.apply({"params": params}, image, text, mask_ar, mask_input)
  p = 4  # prefix length; tokens 4.. are fed one by one
  cache = model.decoder.init_cache(B, N + T)
  logits, cache, cache_mask = model.apply({"params": params}, image, text[:, :p], mask_input[:, :p],
                                          cache, method=model.prefill)
  np.testing.assert_allclose(logits, full[:, :p], atol=1e-5)
  for t in range(p, T):
    step_logits, cache, cache_mask = model.apply(
        {"params": params}, text[:, t], jnp.full((B,), N + t), cache, cache_mask, N + t,
        method=model.decode_step)
    np.testing.assert_allclose(step_logits, full[:, t], atol=1e-5)


def test_unknown_connector_lists_known():
  config = load_config("test")
  config.model.connector = "nope"
  with pytest.raises(UserError, match="unknown model.connector 'nope'; known: linear"):
    build_model(config.model, V)


def _llava_style(config_arg="test"):
  config = load_config(config_arg)
  config.model.update(dict(image_position=1, prefix_attention=False, connector="mlp"))
  config.model.decoder.update(dict(norm="llama", norm_eps=1e-5, mlp_act="silu", embed_scale=False,
                                   tie_embeddings=False, rope_type="llama3", rope_factor=8.0,
                                   rope_original_max_len=16))
  return config


def test_llava_layout_image_after_bos_and_causal():
  config = _llava_style()
  model = build_model(config.model, V)
  image = jax.random.normal(jax.random.key(1), (B, S, S, 3))
  text = jax.random.randint(jax.random.key(2), (B, T), 4, V)
  mask_ar, mask_input = jnp.zeros((B, T), jnp.int32), jnp.ones((B, T), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), image, text, mask_ar, mask_input))["params"]
  assert "head" in params["decoder"] and set(params["connector"]) == {"fc1", "fc2"}
  seq = lambda t: model.apply({"params": params}, image, t, mask_ar, mask_input,
                              method=model.sequence_logits)
  # Causal: changing text token 3 (sequence position N + 3) changes nothing before it, even with
  # mask_ar 0 (prefix) given by the data; the BOS (position 0) does not see the image.
  base, changed = seq(text), seq(text.at[:, 3].set(5))
  np.testing.assert_array_equal(base[:, :N + 3], changed[:, :N + 3])
  assert np.abs(np.asarray(base[:, N + 3:] - changed[:, N + 3:])).max() > 1e-6
  other_image = model.apply({"params": params}, image * 0.5, text, mask_ar, mask_input,
                            method=model.sequence_logits)
  np.testing.assert_array_equal(base[:, 0], other_image[:, 0])
  # Text logits drop the image positions: text logit t >= 1 is sequence position N + t (the head runs
  # on the text positions alone there: a smaller matmul, equal up to float rounding).
  text_logits = model.apply({"params": params}, image, text, mask_ar, mask_input)
  np.testing.assert_allclose(text_logits[:, 1:], base[:, N + 1:], rtol=1e-5, atol=1e-5)


def test_llava_layout_kv_cache_matches_full_forward():
  config = _llava_style()
  model = build_model(config.model, V)
  image = jax.random.normal(jax.random.key(1), (B, S, S, 3))
  text = jax.random.randint(jax.random.key(2), (B, T), 4, V)
  ones = jnp.ones((B, T), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), image, text, ones, ones))["params"]
  full = model.apply({"params": params}, image, text, ones, ones)
  p = 4
  cache = model.decoder.init_cache(B, N + T)
  logits, cache, cache_mask = model.apply({"params": params}, image, text[:, :p], ones[:, :p], cache,
                                          method=model.prefill)
  np.testing.assert_allclose(logits[:, 1:], full[:, 1:p], atol=1e-5)
  for t in range(p, T):
    step_logits, cache, cache_mask = model.apply(
        {"params": params}, text[:, t], jnp.full((B,), N + t), cache, cache_mask, N + t,
        method=model.decode_step)
    np.testing.assert_allclose(step_logits, full[:, t], atol=1e-5)


def test_lm_family_ignores_the_image():
  config = load_config("test")
  config.model.family = "lm"
  model = build_model(config.model, V)
  image = jax.random.normal(jax.random.key(1), (B, S, S, 3))
  text = jax.random.randint(jax.random.key(2), (B, T), 4, V)
  ones = jnp.ones((B, T), jnp.int32)
  params = nn.meta.unbox(model.init(jax.random.key(0), image, text, ones, ones))["params"]
  assert set(params) == {"decoder"}
  a = model.apply({"params": params}, image, text, ones, ones)
  chex.assert_shape(a, (B, T, V))
  np.testing.assert_array_equal(a, model.apply({"params": params}, image * 0, text, ones, ones))


@pytest.mark.slow  # compiles the model twice, bf16 and f32
def test_bfloat16_compute_keeps_float32_params_and_close_logits(model_and_params):
  model, _, params, inputs = model_and_params
  config = load_config("test")
  config.model.dtype = "bfloat16"
  model16 = build_model(config.model, V)
  chex.assert_trees_all_equal_shapes_and_dtypes(
      params, nn.meta.unbox(model16.init(jax.random.key(0), *inputs))["params"])
  a = np.asarray(model.apply({"params": params}, *inputs))
  b = model16.apply({"params": params}, *inputs)
  assert b.dtype == jnp.bfloat16
  rel = np.abs(np.asarray(b, np.float32) - a).max() / np.abs(a).max()
  # A loose bound on this random-init model (its logits are tiny); the 2e-2 bar is checked on the
  # imported models in test_parity_*.
  assert 0 < rel < 5e-2, rel


def test_decoder_vocab_from_config_must_cover_the_tokenizer():
  config = load_config("test")
  config.model.decoder.vocab_size = 30
  with pytest.raises(UserError, match="tokenizer has 40 pieces but model.decoder.vocab_size is 30"):
    build_model(config.model, 40)
  config.model.decoder.vocab_size = 64
  chex.assert_equal(build_model(config.model, 40).decoder.vocab_size, 64)


def test_unknown_model_field_is_named():
  config = load_config("test")
  config.model.encoder.widht = 3  # a typo'd field in a config file
  with pytest.raises(UserError, match="model.encoder.widht is not a field of ViT"):
    build_model(config.model, V)


def _in_row(image, text, mask_ar, mask_input, k: int):
  """The in-row layout of one image inserted at k: N slots (ids 0, mask_ar 0, real) before text k."""
  b = text.shape[0]
  slots = lambda x, v: jnp.concatenate([x[:, :k], jnp.full((b, N), v, x.dtype), x[:, k:]], axis=1)
  return (image[:, None], slots(text, 0), slots(mask_ar, 0), slots(mask_input, 1),
          jnp.full((b, 1), k, jnp.int32))


@pytest.mark.parametrize("llava", [False, True])
def test_in_row_one_image_equals_the_inserted_layout(model_and_params, llava):
  """One image over its slots at image_position (the in-row layout, no segment or positions given)
  gives the inserted layout's logits at every position; right padding included."""
  model, _, params, (image, text, mask_ar, mask_input) = model_and_params
  if llava:
    model = build_model(_llava_style().model, V)
    params = nn.meta.unbox(model.init(jax.random.key(0), image, text, mask_ar, mask_input))["params"]
  mask_input = mask_input.at[1, -2:].set(0)
  k = model.image_position
  want = model.apply({"params": params}, image, text, mask_ar, mask_input, method=model.sequence_logits)
  got = model.apply({"params": params}, *_in_row(image, text, mask_ar, mask_input, k))
  chex.assert_shape(got, (B, N + T, V))
  real = np.asarray(_in_row(image, text, mask_ar, mask_input, k)[3]) > 0
  np.testing.assert_allclose(np.asarray(got)[real], np.asarray(want)[real], atol=1e-5)
  # segment (one example: 1 on real tokens) and positions 0 .. L-1 given explicitly: the same.
  row = _in_row(image, text, mask_ar, mask_input, k)
  again = model.apply({"params": params}, *row, row[3], jnp.broadcast_to(jnp.arange(N + T), (B, N + T)))
  np.testing.assert_allclose(np.asarray(again)[real], np.asarray(want)[real], atol=1e-5)

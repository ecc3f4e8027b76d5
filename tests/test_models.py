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

"""Connectors: shapes and token counts, Idefics3's pixel shuffle order, logical names, config errors, and a
unified model with each connector (forward, KV-cached greedy decode == full forward)."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from mm_jax.config import files
from mm_jax.eval.decode import greedy_decode
from mm_jax.errors import UserError
from mm_jax.models import CONNECTORS, build_model
from mm_jax.models.connectors import PixelShuffle, Resampler, pixel_shuffle

B, E, D, V = 2, 32, 48, 40
SMALL = {"resampler": dict(num_queries=5, depth=2, num_heads=2, mlp_dim=64), "pixel_shuffle": dict(scale=2)}


def _connector(name: str) -> nn.Module:
  return CONNECTORS[name](D, **SMALL.get(name, {}))


@pytest.mark.parametrize("name", sorted(CONNECTORS))
def test_output_shape_is_num_tokens_by_width_and_params_are_named(name):
  conn = _connector(name)
  x = jax.random.normal(jax.random.key(0), (B, 16, E))  # a 4x4 grid
  out, boxed = jax.jit(conn.init_with_output)(jax.random.key(1), x)
  chex.assert_shape(out, (B, conn.num_tokens(16), D))
  assert conn.num_tokens(16) == {"resampler": 5, "pixel_shuffle": 4, "merger": 4}.get(name, 16)
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert leaves and all(isinstance(v, nn.LogicallyPartitioned) for v in leaves), "a param lacks names"


def test_imported_param_names_unchanged():
  x = jnp.zeros((B, 4, E))
  names = lambda n: set(nn.meta.unbox(_connector(n).init(jax.random.key(0), x))["params"])
  assert names("linear") == {"proj"} and names("mlp") == {"fc1", "fc2"}


@pytest.mark.parametrize("grid,s", [(4, 2), (6, 3), (6, 2)])
def test_pixel_shuffle_is_idefics3_order_exactly(grid, s):
  b, e = 2, 3
  x = np.arange(b * grid * grid * e, dtype=np.float32).reshape(b, grid * grid, e)
  got = np.asarray(pixel_shuffle(jnp.asarray(x), s))
  closed = x.reshape(b, grid // s, s, grid // s, s, e).transpose(0, 1, 3, 2, 4, 5).reshape(b, -1, s * s * e)
  np.testing.assert_array_equal(got, closed)
  # The definition: token (I, J) is the concat over r, then c, of patch (I*s + r, J*s + c).
  x_grid = x.reshape(b, grid, grid, e)
  by_def = [np.concatenate([x_grid[:, i * s + r, j * s + c] for r in range(s) for c in range(s)], -1)
            for i in range(grid // s) for j in range(grid // s)]
  np.testing.assert_array_equal(got, np.stack(by_def, 1))


def test_pixel_shuffle_module_projects_the_folded_tokens_without_bias():
  x = jax.random.normal(jax.random.key(0), (B, 36, E))
  conn = PixelShuffle(D, scale=3)
  out, params = conn.init_with_output(jax.random.key(1), x)
  params = nn.meta.unbox(params)["params"]
  assert set(params["proj"]) == {"kernel"}
  np.testing.assert_allclose(out, pixel_shuffle(x, 3) @ params["proj"]["kernel"], atol=1e-5)


def test_resampler_token_count_does_not_depend_on_patches():
  conn = Resampler(D, num_queries=7, depth=1, num_heads=4, mlp_dim=64)
  params = jax.eval_shape(conn.init, jax.random.key(0), jnp.zeros((B, 16, E)))  # no param depends on P
  for p in (1, 16, 49):
    assert conn.num_tokens(p) == 7
    chex.assert_shape(jax.eval_shape(conn.apply, params, jnp.zeros((B, p, E))), (B, 7, D))


def test_resampler_sees_the_features_but_not_their_order():
  """No positions inside the resampler: permuting the patches leaves the output, new content changes it."""
  conn = Resampler(D, num_queries=3, depth=1, num_heads=2, mlp_dim=64)
  x = jax.random.normal(jax.random.key(0), (B, 16, E))
  params = conn.init(jax.random.key(1), x)
  out = conn.apply(params, x)
  np.testing.assert_allclose(conn.apply(params, x[:, ::-1]), out, atol=1e-5)
  assert np.abs(np.asarray(conn.apply(params, x.at[:, 0].set(3.0)) - out)).max() > 1e-3


def _config(connector: str):
  config = load_config("test")
  config.model.connector = connector
  return config


def test_unknown_connector_lists_every_known():
  with pytest.raises(UserError, match="unknown model.connector 'nope'; known: linear, merger, mlp, "
                                      "pixel_shuffle, resampler"):
    build_model(_config("nope").model, V)


def test_bad_options_are_named():
  config = _config("resampler")
  config.model.connector_options.resampler.num_qeries = 4  # a typo'd option
  with pytest.raises(UserError, match=r"model.connector_options.resampler.num_qeries is not a field of "
                                      r"Resampler; known: depth, mlp_dim, norm_eps, num_heads, num_queries"):
    build_model(config.model, V)
  config = _config("linear")  # a typo in a connector not chosen is found too
  config.model.connector_options.pixel_shuffle.scael = 2
  with pytest.raises(UserError, match="model.connector_options.pixel_shuffle.scael is not a field"):
    build_model(config.model, V)
  config = _config("linear")
  config.model.connector_options.linear = {"width": 3}  # set by the builder, not an option
  with pytest.raises(UserError, match=r"options.linear.width is not a field of Linear; known: \(none"):
    build_model(config.model, V)
  config = _config("linear")
  config.model.connector_options.resamplr = {}
  with pytest.raises(UserError, match="model.connector_options.resamplr: unknown connector; known: linear"):
    build_model(config.model, V)


def test_pixel_shuffle_scale_must_divide_the_grid():
  config = _config("pixel_shuffle")
  config.model.connector_options.pixel_shuffle.scale = 3  # the test grid is 4x4
  model = build_model(config.model, V)
  with pytest.raises(UserError, match=r"model.connector_options.pixel_shuffle.scale=3; got 16 patches"):
    model.num_image_tokens((B, 32, 32, 3))
  with pytest.raises(UserError, match="pixel_shuffle.scale=3"):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((B, 32, 32, 3)), *[jnp.ones((B, 4), int)] * 3)


def test_config_without_connector_options_builds():
  config = _config("resampler")
  del config.model["connector_options"]  # configs written before the section existed (imports)
  assert build_model(files.complete(config).model, V).connector.num_queries == 64  # the module's default


@pytest.fixture(scope="module")
def encoder_decoder_params():
  """Encoder and decoder params of the test config, shared: each test inits only its connector."""
  model = build_model(_config("linear").model, V)
  image, text = jnp.zeros((2, 32, 32, 3)), jnp.ones((2, 4), jnp.int32)
  return nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), image, text, text, text))["params"]


@pytest.mark.parametrize("name,n", [("linear", 16), ("mlp", 16), ("resampler", 6), ("pixel_shuffle", 4)])
def test_unified_model_forward_and_cached_greedy_decode(name, n, encoder_decoder_params):
  model = build_model(_config(name).model, V)
  b, s, p, m = 2, 32, 4, 4
  image = jax.random.normal(jax.random.key(1), (b, s, s, 3))
  prefix = jax.random.randint(jax.random.key(2), (b, p), 4, V)
  ones = jnp.ones((b, p), jnp.int32)
  connector = jax.jit(model.connector.init)(jax.random.key(3), jnp.zeros((b, 16, 32)))["params"]
  params = dict(encoder_decoder_params, connector=nn.meta.unbox(connector))
  assert model.num_image_tokens(image.shape) == n
  # Scale the head so greedy choices are not near-ties (as test_decode).
  embedding = params["decoder"]["embedder"]["embedding"] * 50
  params["decoder"] = dict(params["decoder"], embedder={"embedding": embedding})
  decode = jax.jit(lambda *a: greedy_decode(model, params, *a, max_new=m))
  got = decode(image, prefix, ones, jnp.full((b,), p))
  # Full forward over prefix + generated tokens: its argmax at each position is the next generated one.
  text = jnp.concatenate([prefix, got[:, :-1]], axis=1)
  ar = jnp.concatenate([jnp.zeros_like(prefix), jnp.ones((b, m - 1), jnp.int32)], axis=1)
  seq = jax.jit(lambda *a: model.apply({"params": params}, *a, method=model.sequence_logits))(
      image, text, ar, jnp.ones_like(text))
  chex.assert_shape(seq, (b, n + p + m - 1, V))
  logits = seq[:, n:]  # image first (image_position 0)
  np.testing.assert_array_equal(np.argmax(logits[:, p - 1:], -1), np.asarray(got))

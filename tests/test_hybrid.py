"""NVLM-H hybrid: tiles and thumbnail, zero gates give the unified model on the thumbnail bitwise, the
KV cache gives the full forward, and it trains sharded."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, make_run, random_vqa_rows, train_losses
from mm_jax.errors import UserError
from mm_jax import models
from mm_jax.eval.decode import greedy_decode
from mm_jax.models.hybrid import split_tiles, thumbnail

B, S, T, V = 2, 32, 10, 40


def _config(family="hybrid", **model_fields):
  config = load_config("test")
  config.model.update(dict(family=family, **model_fields))
  return config


def _set_gates(params, value):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, value) if p[-1].key.endswith("_gate") else x, params)


@pytest.fixture(scope="module")
def setup():
  model = models.build_model(_config().model, V)
  image = jax.random.normal(jax.random.key(1), (B, S, S, 3))
  text = jax.random.randint(jax.random.key(2), (B, T), 4, V)
  ones = jnp.ones((B, T), jnp.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), image, text, ones, ones)["params"])
  return model, params, image, text, ones


def test_tiles_and_thumbnail():
  image = jnp.arange(2 * 4 * 4 * 1, dtype=jnp.float32).reshape(2, 4, 4, 1)
  tiles = split_tiles(image, 2)
  assert tiles.shape == (2, 4, 2, 2, 1)
  np.testing.assert_array_equal(tiles[0, 1, :, :, 0], image[0, :2, 2:, 0])  # row-major: top right 2nd
  np.testing.assert_array_equal(tiles[1, 2, :, :, 0], image[1, 2:, :2, 0])
  np.testing.assert_array_equal(thumbnail(image, 2)[0, 0, 1, 0], image[0, :2, 2:, 0].mean())


def test_param_tree_and_sequence_length(setup):
  model, params, image, *_ = setup
  assert set(params) == {"encoder", "connector", "decoder", "cross", "tile_embed"}
  assert params["tile_embed"].shape == (4, 32)
  assert model.num_image_tokens(image.shape) == 4  # 16x16 thumbnail, patch 8: 2x2 patches
  with pytest.raises(UserError, match="model.family_options.hybrid.tiles=3 must divide"):
    models.build_model(_config(family_options=dict(hybrid=dict(tiles=3))).model, V).init(
        jax.random.key(0), image, jnp.ones((B, T), jnp.int32), jnp.ones((B, T), jnp.int32),
        jnp.ones((B, T), jnp.int32))


@pytest.mark.slow  # two models' forwards
@pytest.mark.parametrize("prefix_attention", [True, False])
def test_zero_gates_give_the_unified_model_on_the_thumbnail(setup, prefix_attention):
  model, params, image, text, ones = setup
  model = model.clone(prefix_attention=prefix_attention)
  unified = models.build_model(_config("unified", prefix_attention=prefix_attention).model, V)
  mask_ar = jnp.array([[0] * 4 + [1] * 6] * B)
  sub = {k: params[k] for k in ("encoder", "connector", "decoder")}
  want = unified.apply({"params": sub}, thumbnail(image, 2), text, mask_ar, ones)
  np.testing.assert_array_equal(model.apply({"params": params}, image, text, mask_ar, ones), want)
  opened = _set_gates(params, 0.5)  # open gates: the tiles now matter
  changed = model.apply({"params": opened}, image.at[:, :16, :16].multiply(-1), text, mask_ar, ones)
  assert np.abs(np.asarray(changed - model.apply({"params": opened}, image, text, mask_ar, ones))).max() > 1e-6


def test_kv_cache_decoding_gives_full_forward_logits(setup):
  model, params, image, text, ones = setup
  params = _set_gates(params, -0.8)
  params["tile_embed"] = jax.random.normal(jax.random.key(4), params["tile_embed"].shape)
  p, n = 4, model.num_image_tokens(image.shape)
  mask_ar = jnp.ones_like(ones).at[:, :p].set(0)  # prefix (with the thumbnail) bidirectional
  full = jax.jit(model.apply)({"params": params}, image, text, mask_ar, ones)
  logits, cache, cache_mask = jax.jit(lambda *a: model.apply({"params": params}, *a, method=model.prefill))(
      image, text[:, :p], ones[:, :p], model.decoder.init_cache(B, n + T))
  np.testing.assert_allclose(logits, full[:, :p], atol=1e-5)
  assert cache["cross"][0]["k"].shape == (B, 2, 4 * 4, 8)  # 4 tiles x 4 patches, 2 kv heads of 8
  step_fn = jax.jit(lambda *a: model.apply({"params": params}, *a, method=model.decode_step))
  for t in range(p, T):
    step, cache, cache_mask = step_fn(text[:, t], jnp.full((B,), n + t), cache, cache_mask, n + t)
    np.testing.assert_allclose(step, full[:, t], atol=1e-5)
  got = jax.jit(lambda *a: greedy_decode(model, params, *a, max_new=3))(
      image, text[:, :p], ones[:, :p], jnp.full((B,), p))
  assert got.shape == (B, 3)


def test_in_row_one_image_equals_the_inserted_layout(setup):
  """The thumbnail over its slots at image_position 0 (image_pos 0: every token sees the tiles) gives the
  inserted layout's logits and greedy tokens, gates open."""
  model, params, image, text, ones = setup
  params = _set_gates(params, 0.6)
  params["tile_embed"] = jax.random.normal(jax.random.key(4), params["tile_embed"].shape)
  n, zeros = model.num_image_tokens(image.shape), jnp.zeros((B, 1), jnp.int32)
  mask_ar = jnp.ones_like(ones).at[:, :4].set(0)
  slots = lambda x, v: jnp.concatenate([jnp.full((B, n), v, x.dtype), x], axis=1)
  run = jax.jit(lambda *a: model.apply({"params": params}, *a))
  want = run(image, text, mask_ar, ones)
  got = run(image[:, None], slots(text, 0), slots(mask_ar, 0), slots(ones, 1), zeros)
  np.testing.assert_allclose(got[:, n:], want, atol=1e-5)
  decode = jax.jit(lambda *a, **kw: greedy_decode(model, params, *a, max_new=3, **kw))
  lengths = jnp.array([4, 2])
  mask = (jnp.arange(4)[None] < lengths[:, None]).astype(jnp.int32)
  np.testing.assert_array_equal(
      decode(image[:, None], slots(text[:, :4], 0), slots(mask, 1), lengths + n, image_pos=zeros),
      decode(image, text[:, :4], mask, lengths))


@pytest.mark.slow  # 12-16 s: the full suite runs it, the fast tier leaves it out
def test_train_step_on_a_sharded_mesh():
  config = _config()
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  mm, tx = make_run(config, jax.devices(), V)
  state, losses = train_losses(mm, tx, random_vqa_rows(config, V))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
  assert float(jax.device_get(state["params"]["cross"]["block_0"]["attn_gate"])) != 0.0

"""Cross-attention VLM (Method B): gates at 0 give the text LLM bitwise, media masks, the KV cache with
image k/v computed once, and a train step with the LLM frozen."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, make_run, random_vqa_rows
from mm_jax import models
from mm_jax.eval.decode import greedy_decode
from mm_jax.models.cross_attention import cross_attention, visible_images

B, S, T, V = 2, 32, 10, 40
CROSS_FIELDS = dict(every=1, num_heads=0, num_kv_heads=0, head_dim=0, mlp_dim=0, last_image_only=True)


def _config(cross=None, **model_fields):
  config = load_config("test")
  config.model.family = "cross"
  config.model.family_options.cross.update(dict(CROSS_FIELDS, **(cross or {})))
  config.model.update(model_fields)
  return config


def _lm(config):
  lm_config = load_config("test")
  lm_config.model.update(dict(family="lm", prefix_attention=config.model.prefix_attention))
  return models.build_model(lm_config.model, V)


def _set_gates(params, value):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, value) if p[-1].key.endswith("_gate") else x, params)


@pytest.fixture(scope="module")
def setup():
  config = _config(prefix_attention=False)  # causal, so "a token before an image" sees none of it
  model, lm = cross_attention(config.model, V), _lm(config)
  images = jax.random.normal(jax.random.key(1), (B, 2, S, S, 3))  # two images per example
  text = jax.random.randint(jax.random.key(2), (B, T), 4, V)
  ones = jnp.ones((B, T), jnp.int32)
  boxed = jax.jit(model.init)(jax.random.key(0), images, text, ones, ones)["params"]
  return model, lm, boxed, nn.meta.unbox(boxed), images, text, ones


def test_param_tree_names_and_builder_fields(setup):
  model, lm, boxed, params, images, text, ones = setup
  assert set(params) == {"encoder", "connector", "decoder", "cross"}
  assert set(params["cross"]) == {"block_0", "block_1"}  # cross_every 1, decoder depth 2
  lm_params = jax.eval_shape(lm.init, jax.random.key(0), images[:, 0], text, ones, ones)["params"]
  shapes = lambda t: jax.tree.map(lambda x: (x.shape, x.dtype), nn.meta.unbox(t))
  assert shapes(params["decoder"]) == shapes(lm_params["decoder"])  # the text LLM's tree exactly
  leaves = jax.tree.leaves(boxed, is_leaf=lambda v: isinstance(v, nn.LogicallyPartitioned))
  assert all(isinstance(v, nn.LogicallyPartitioned) for v in leaves), "a param lacks logical names"
  assert all(float(g) == 0.0 for b in params["cross"].values() for g in (b["attn_gate"], b["mlp_gate"]))
  # cross_every 2: one cross block; its own head counts.
  other = cross_attention(_config(dict(every=2, num_heads=2, num_kv_heads=1)).model, V)
  p2 = jax.eval_shape(other.init, jax.random.key(0), images, text, ones, ones)["params"]
  assert set(nn.meta.unbox(p2)["cross"]) == {"block_0"}
  assert nn.meta.unbox(p2)["cross"]["block_0"]["k"]["kernel"].shape == (32, 1, 8)


@pytest.mark.parametrize("prefix_attention", [False, True])
def test_zero_gates_give_the_text_llm_bitwise(setup, prefix_attention):
  model, lm, _, params, images, text, ones = setup
  model, lm = model.clone(prefix_attention=prefix_attention), lm.clone(prefix_attention=prefix_attention)
  mask_ar = jnp.array([[0] * 4 + [1] * 6] * B)
  want = lm.apply({"params": {"decoder": params["decoder"]}}, images[:, 0], text, mask_ar, ones)
  for image in (images, -images[:, :1] * 3):
    np.testing.assert_array_equal(model.apply({"params": params}, image, text, mask_ar, ones), want)


def test_visible_images_all_or_last_group():
  pos = jnp.array([[2, 2, 5, 99]])  # two images at 2 (one group), one at 5, one absent
  at = jnp.arange(7)[None]
  last = np.asarray(visible_images(pos, at, True))[0].astype(int)
  every = np.asarray(visible_images(pos, at, False))[0].astype(int)
  np.testing.assert_array_equal(last, [[0, 0, 0, 0]] * 2 + [[1, 1, 0, 0]] * 3 + [[0, 0, 1, 0]] * 2)
  np.testing.assert_array_equal(every, [[0, 0, 0, 0]] * 2 + [[1, 1, 0, 0]] * 3 + [[1, 1, 1, 0]] * 2)


def test_media_masks_with_open_gates(setup):
  model, lm, _, params, images, text, ones = setup
  params = _set_gates(params, 0.7)
  pos = jnp.array([[3, 6], [2, 7]])  # image 1 before token 3 (2), image 2 before token 6 (7)
  run = lambda im: model.apply({"params": params}, im, text, ones, ones, pos)
  base = run(images)
  text_only = lm.apply({"params": {"decoder": params["decoder"]}}, images[:, 0], text, ones, ones)
  new1, new2 = run(images.at[:, 0].multiply(-1)), run(images.at[:, 1].multiply(-1))
  for b, (p1, p2) in enumerate(np.asarray(pos)):
    np.testing.assert_array_equal(base[b, :p1], text_only[b, :p1])  # before any image: the text LLM
    assert np.abs(np.asarray(base[b, p1:] - text_only[b, p1:])).min(axis=-1).max() > 0
    np.testing.assert_array_equal(new1[b, :p1], base[b, :p1])  # image 1 reaches nothing before it
    assert np.all(np.abs(np.asarray(new1[b, p1:] - base[b, p1:])).max(axis=-1) > 1e-6)
    np.testing.assert_array_equal(new2[b, :p2], base[b, :p2])  # tokens that see only image 1
    assert np.all(np.abs(np.asarray(new2[b, p2:] - base[b, p2:])).max(axis=-1) > 1e-6)


def test_kv_cache_decoding_gives_full_forward_logits(setup):
  model, _, _, params, images, text, ones = setup
  params = _set_gates(params, -0.8)
  pos = jnp.array([[0, 5], [1, 3]])
  full = jax.jit(model.apply)({"params": params}, images, text, ones, ones, pos)
  p = 4
  prefill = jax.jit(lambda *a: model.apply({"params": params}, *a, method=model.prefill))
  decode_step = jax.jit(lambda *a: model.apply({"params": params}, *a, method=model.decode_step))
  logits, cache, cache_mask = prefill(images, text[:, :p], ones[:, :p], model.decoder.init_cache(B, T), pos)
  np.testing.assert_allclose(logits, full[:, :p], atol=1e-5)
  assert len(cache["cross"]) == 2 and cache["cross"][0]["k"].shape == (B, 2, 2 * 16, 8)
  for t in range(p, T):
    step, cache, cache_mask = decode_step(text[:, t], jnp.full((B,), t), cache, cache_mask, t)
    np.testing.assert_allclose(step, full[:, t], atol=1e-5)


def test_greedy_decode_unchanged_with_ragged_prefixes(setup):
  """decode.greedy_decode (written for UnifiedVLM) drives this model as is: one image, image_pos 0."""
  model, _, _, params, images, _, ones = setup
  params = _set_gates(params, 0.9)
  params["decoder"]["embedder"]["embedding"] = params["decoder"]["embedder"]["embedding"] * 50
  image, lengths, max_new = images[:, 0], jnp.array([5, 2]), 3
  prefix = jax.random.randint(jax.random.key(3), (B, 5), 4, V)
  mask = (jnp.arange(5)[None] < lengths[:, None]).astype(jnp.int32)
  got = np.asarray(jax.jit(lambda *a: greedy_decode(model, params, *a, max_new=max_new))(
      image, prefix, mask, lengths))
  # Reference: re-run the full (causal) forward on the growing sequence; padding after it is unseen.
  full = jax.jit(lambda t: model.apply({"params": params}, image, t, ones, ones))
  seq = np.zeros((B, T), np.int32)
  seq[:, :5] = np.where(np.asarray(mask) > 0, np.asarray(prefix), 0)
  for t in range(max_new):
    nxt = np.argmax(np.asarray(full(jnp.asarray(seq)))[np.arange(B), np.asarray(lengths) + t - 1], -1)
    np.testing.assert_array_equal(got[:, t], nxt)
    seq[np.arange(B), np.asarray(lengths) + t] = nxt


def test_in_row_greedy_decode(setup):
  """greedy_decode with image_pos: at 0 the old call's tokens; an image seen from inside the prefix (row
  0: from row 4) or first by a new token (row 1, prefix length 2: from row 3) gives the tokens of
  re-running the full forward with that image_pos, and they differ from those without the image (an
  image_pos at or past the prefix width: an empty slot, seen by no new token either)."""
  model, _, _, params, images, _, ones = setup
  params = _set_gates(params, 0.9)  # cross outputs scaled up: the image decides tokens
  params["cross"] = jax.tree_util.tree_map_with_path(
      lambda p, x: x * 10 if p[1].key in ("o", "down") else x, params["cross"])
  image, lengths, max_new = images[:, :1], jnp.array([5, 2]), 3
  prefix = jax.random.randint(jax.random.key(3), (B, 5), 4, V)
  mask = (jnp.arange(5)[None] < lengths[:, None]).astype(jnp.int32)
  decode = jax.jit(lambda *a, **kw: greedy_decode(model, params, *a, max_new=max_new, **kw))
  np.testing.assert_array_equal(decode(image, prefix, mask, lengths, image_pos=jnp.zeros((B, 1), jnp.int32)),
                                decode(image[:, 0], prefix, mask, lengths))
  pos = jnp.array([[4], [3]])
  got = np.asarray(decode(image, prefix, mask, lengths, image_pos=pos))
  full = jax.jit(lambda t: model.apply({"params": params}, image, t, ones, ones, pos))
  seq = np.zeros((B, T), np.int32)
  seq[:, :5] = np.where(np.asarray(mask) > 0, np.asarray(prefix), 0)
  for t in range(max_new):
    nxt = np.argmax(np.asarray(full(jnp.asarray(seq)))[np.arange(B), np.asarray(lengths) + t - 1], -1)
    np.testing.assert_array_equal(got[:, t], nxt)
    seq[np.arange(B), np.asarray(lengths) + t] = nxt
  unseen = np.asarray(decode(image, prefix, mask, lengths, image_pos=jnp.full((B, 1), T)))
  assert got[1, 0] == unseen[1, 0] and (got != unseen).any(axis=1).all()  # row 1's first: before it


@pytest.mark.slow  # 12-16 s: the full suite runs it, the fast tier leaves it out
def test_train_step_with_frozen_llm_keeps_the_text_llm(monkeypatch):
  config = _config()
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))  # cross params sharded over fsdp and tensor too
  config.optim.rules = (("decoder/.*", "frozen"), (".*", "trainable"))
  mm, tx = make_run(config, jax.devices(), V)
  state = mm.init_train_state(tx, seed=0)
  before = jax.device_get(state["params"])
  batch = random_vqa_rows(config, V)  # the task's rows layout: one image per row, seen from token 0
  text = batch["text"]
  n, t = text.shape
  step = mm.make_train_step(tx)
  for _ in range(2):  # the warmup gives step 0 a learning rate of 0
    state, _ = step(state, batch)
  after = jax.device_get(state["params"])
  jax.tree.map(np.testing.assert_array_equal, after["decoder"], before["decoder"])
  assert float(after["cross"]["block_0"]["attn_gate"]) != 0.0  # the cross path trained
  # Text-only inputs (no image visible: image_pos past the text) give the text LLM's logits, before
  # and after the step, bitwise.
  lm = _lm(config)
  ones = jnp.ones((n, t), jnp.int32)
  no_image = jnp.full(batch["image_pos"].shape, t)
  want = lm.apply({"params": {"decoder": before["decoder"]}}, batch["image"], text, batch["mask_ar"], ones)
  for p in (before, after):
    got = mm.model.apply({"params": p}, batch["image"], text, batch["mask_ar"], ones, no_image)
    np.testing.assert_array_equal(got, want)
  with_image = mm.model.apply({"params": after}, batch["image"], text, batch["mask_ar"], ones,
                              batch["image_pos"])
  assert np.abs(np.asarray(with_image - want)).max() > 1e-6

"""The in-row layout: several examples packed in one row (segment, restarting positions) give each
example's logits as if it had the row alone, and multi-image rows; for every family with images."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from mm_jax import models
from mm_jax.models.flop_count import Sizes, Tally

S, V = 32, 40
IMG = "img"
# Three examples of different lengths with 1, 0 and 2 images: text runs, images, "|" where the suffix
# (mask_ar 1) starts. Example 2 opens with mask_ar 0 right after example 1's suffix.
EXAMPLES = ([IMG, 2, "|", 2], [2, "|", 3], [1, IMG, 2, IMG, 1, "|", 2])


def _set_gates(params, value):
  return jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, value) if p[-1].key.endswith("_gate") else x, params)


def _example(parts, n: int, rng):
  """(text ids, mask_ar, image offsets) of one example; an image holds n slots (cross: 0, its offset
  the first token that sees it)."""
  ids, ar, offsets, suffix = [], [], [], False
  for part in parts:
    if part == "|":
      suffix = True
    elif part == IMG:
      offsets.append(len(ids))
      ids += [0] * n
      ar += [0] * n
    else:
      ids += list(rng.integers(4, V, part))
      ar += [int(suffix)] * part
  return np.array(ids), np.array(ar), offsets


def _rows(n: int, seed: int = 0):
  """Row 0: the three examples packed, then padding; rows 1-3: each example alone. Returns the model's
  seven inputs and each example's (start in row 0, length)."""
  rng = np.random.default_rng(seed)
  examples = [_example(p, n, rng) for p in EXAMPLES]
  pictures = rng.normal(size=(4, S, S, 3)).astype(np.float32)  # one per image, in row order
  total = sum(len(e[0]) for e in examples)
  l, m = total + 4, 3
  text, ar = np.zeros((4, l), np.int32), np.ones((4, l), np.int32)
  inp, seg, pos = (np.zeros((4, l), np.int32) for _ in range(3))
  image, image_pos = np.zeros((4, m, S, S, 3), np.float32), np.full((4, m), l, np.int32)
  spans, start, k = [], 0, 0
  for e, (ids, mar, offsets) in enumerate(examples):
    for row, at, first in ((0, start, k), (1 + e, 0, 0)):
      sl = slice(at, at + len(ids))
      text[row, sl], ar[row, sl], inp[row, sl] = ids, mar, 1
      seg[row, sl], pos[row, sl] = (e + 1 if row == 0 else 1), np.arange(len(ids))
      for j, off in enumerate(offsets):
        image[row, first + j], image_pos[row, first + j] = pictures[k + j], at + off
    spans.append((start, len(ids)))
    start, k = start + len(ids), k + len(offsets)
  inputs = tuple(map(jnp.asarray, (image, text, ar, inp, image_pos, seg, pos)))
  return inputs, spans


def _model(family, **fields):
  config = load_config("test")
  config.model.update(dict(family=family, **fields))
  return models.build_model(config.model, V)


CASES = {
    "unified": dict(family="unified"),
    "unified_causal": dict(family="unified", image_position=1, prefix_attention=False),
    "fuyu": dict(family="fuyu"),
    "cross": dict(family="cross"),
    "hybrid": dict(family="hybrid"),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request):
  model = _model(**CASES[request.param])
  n = model.num_image_tokens((1, 3, S, S, 3))
  inputs, spans = _rows(n)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *inputs)["params"])
  if "cross" in params:  # open the gates, so the images reach the text through cross-attention
    params = _set_gates(params, 0.7)
  if "tile_embed" in params:
    params["tile_embed"] = jax.random.normal(jax.random.key(4), params["tile_embed"].shape)
  run = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
  return request.param, model, params, run, inputs, spans


def test_packed_row_equals_each_example_alone(case):
  name, _, params, run, inputs, spans = case
  logits = np.asarray(run(params, *inputs))
  assert logits.shape == (*inputs[1].shape, V)
  for e, (start, length) in enumerate(spans):
    diff = np.abs(logits[0, start:start + length] - logits[1 + e, :length]).max()
    assert diff <= 1e-5, (name, e, diff)
  # The model takes the given positions (RoPE is relative: offsets from the row's start would give the
  # same logits up to rounding, so the check spreads them instead): example 2 at 0, 2, 4, ... changes.
  image, text, ar, inp, image_pos, seg, pos = inputs
  start, length = spans[1]
  spread = pos.at[0, start:start + length].multiply(2)
  other = np.asarray(run(params, image, text, ar, inp, image_pos, seg, spread))
  assert np.abs(other[0, start:start + length] - logits[0, start:start + length]).max() > 1e-4
  np.testing.assert_array_equal(other[0, :start], logits[0, :start])


def test_other_examples_do_not_reach_a_packed_example(case):
  """Example 1's tokens and image changed: examples 2 and 3 of the packed row are bitwise the same."""
  name, _, params, run, inputs, spans = case
  image, text, ar, inp, image_pos, seg, pos = inputs
  (s1, l1), (s2, _), (s3, l3) = spans  # (padding after example 3 sees the whole row: not compared)
  other_text = text.at[0, s1:s1 + l1].set(jnp.where(text[0, s1:s1 + l1] > 0, 5, 0))
  other_image = image.at[0, 0].multiply(-2.0)
  base = np.asarray(run(params, *inputs))
  for changed in (run(params, image, other_text, ar, inp, image_pos, seg, pos),
                  run(params, other_image, text, ar, inp, image_pos, seg, pos)):
    changed = np.asarray(changed)
    np.testing.assert_array_equal(changed[0, s2:s3 + l3], base[0, s2:s3 + l3], err_msg=name)
    assert np.abs(changed[0, s1:s2] - base[0, s1:s2]).max() > 1e-6, name  # example 1 itself did


def test_cross_second_image_reaches_only_tokens_from_its_position():
  """Cross, causal, example 3 of the packed row (two images): a token before image 2's position does not
  see it, the tokens from it on do; with last_image_only=False too."""
  model = _model("cross", prefix_attention=False)
  inputs, spans = _rows(0)
  params = _set_gates(nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *inputs)["params"]), 0.7)
  image, text, ar, inp, image_pos, seg, pos = inputs
  second = int(image_pos[0, 2])  # the packed row's third image: example 3's second
  start, length = spans[2]
  for last_only in (True, False):
    m = model.clone(last_image_only=last_only)
    run = jax.jit(lambda im, m=m: m.apply({"params": params}, im, text, ar, inp, image_pos, seg, pos))
    base, changed = np.asarray(run(image)), np.asarray(run(image.at[0, 2].multiply(-1)))
    np.testing.assert_array_equal(changed[0, :second], base[0, :second])
    assert np.all(np.abs(changed[0, second:start + length] - base[0, second:start + length]).max(-1)
                  > 1e-6), last_only


def test_num_image_tokens_is_per_image_and_flops_take_images_per_row():
  unified, cross, hybrid = _model("unified"), _model("cross"), _model("hybrid")
  for shape in ((2, S, S, 3), (2, 3, S, S, 3)):
    assert (unified.num_image_tokens(shape), cross.num_image_tokens(shape),
            hybrid.num_image_tokens(shape)) == (16, 0, 4)

  def parts(model, sizes, images_per_row=None):
    t = Tally(lambda prefix: False)
    model.count_flops(t, sizes, 2, images_per_row)
    return {part: f for part, (f, _) in t.by_part.items()}

  # One image in the row (its 16 slots in text_len) costs what one inserted image does, but for the
  # head, which runs on every position.
  old, in_row = parts(unified, Sizes(S, 10)), parts(unified, Sizes(S, 26), 1)
  for part in ("encoder", "connector", "decoder"):
    assert in_row[part] == old[part], part
  assert in_row["head"] == old["head"] * 26 / 10
  two = parts(unified, Sizes(S, 26), 2)
  assert two["encoder"] == 2 * old["encoder"] and two["decoder"] == old["decoder"]
  old, two = parts(cross, Sizes(S, 10)), parts(cross, Sizes(S, 10), 2)
  assert two["encoder"] == 2 * old["encoder"] and two["cross"] > old["cross"]
  assert two["decoder"] == old["decoder"]
  old, one = parts(hybrid, Sizes(S, 10)), parts(hybrid, Sizes(S, 14), 1)
  assert one["decoder"] == old["decoder"] and one["cross"] == old["cross"]


@pytest.mark.slow  # a train step on the 8-device mesh
def test_packed_row_on_a_sharded_mesh():
  """The in-row forward and its gradient on a data x fsdp x tensor mesh: the single-device logits."""
  from conftest import make_run  # pylint: disable=g-import-not-at-top
  from mm_jax.train import sharding  # pylint: disable=g-import-not-at-top
  config = load_config("test")
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  mm, _ = make_run(config, jax.devices(), V)
  params = mm.init_params(0)
  inputs, _ = _rows(mm.model.num_image_tokens((1, 3, S, S, 3)))
  batch = (sharding.batch_sharding(mm.mesh),) * len(inputs)
  forward = lambda p, *a: mm.model.apply({"params": p}, *a)
  with mm.context():
    got = jax.jit(forward, in_shardings=(mm.param_shardings, *batch))(params, *inputs)
    grads = jax.jit(jax.grad(lambda p, *a: jnp.sum(forward(p, *a) ** 2)),
                    in_shardings=(mm.param_shardings, *batch))(params, *inputs)
  want = jax.jit(forward)(jax.device_get(params), *inputs)
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))

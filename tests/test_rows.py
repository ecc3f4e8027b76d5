"""data/rows.py: a conversation -> one row of the decoder's input (the plain template's old layout, the
cross layout, several images, empty image slots), TooLong, and first-fit packed rows (segments,
restarting positions, image_pos, the train iterator with data.packing and its state, and a packed
batch's example-normalized loss equal to its examples' own losses)."""
import copy

import chex
import flax.linen as nn
import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mm_jax import data, models
from mm_jax.data import images, pipeline, rows
from mm_jax.data.conversation import Conversation, Image, Turn
from mm_jax.tasks import TASKS, vqa

N = 16  # the test config (unified, image 32, patch 8): 16 image tokens per image
KEYS = {"image", "image_pos", "text", "mask_ar", "mask_loss", "mask_input", "segment", "positions"}


def _config(test_config, **data_fields):
  config = copy.deepcopy(test_config)
  config.data.update(data_fields)
  return config


def _vqa(image, question, answer):
  return Conversation(turns=(Turn("user", (Image(0), question)), Turn("assistant", (answer,))),
                      images=(image,))


def _pixels(image, size=32):
  return images.preprocess("plain", image, size)


def _record_conv(train_source, r, k=0):
  return data.get("shapes").conversation(train_source[r], k)


def _qa(train_source, r, k=0):
  rec = train_source[r]
  return rec["questions"][k].decode(), rec["answers"][k].decode()


# --- one example per row ---

def test_plain_unified_row_is_the_old_layout(test_config, tokenizer, train_source):
  row = pipeline.row_layout(test_config, tokenizer)
  assert row.in_sequence and row.n == N and row.length == 20 + N
  for r in range(4):
    q, a = _qa(train_source, r)
    got = row.pad(row.train(_record_conv(train_source, r)))
    assert set(got) == KEYS
    l = row.length
    ids_q, ids_a = tokenizer.encode(q), tokenizer.encode(a)
    ids = [tokenizer.pad_id] * N + [tokenizer.bos_id, *ids_q, *ids_a, tokenizer.eos_id]
    n, n_prefix = len(ids), N + 1 + len(ids_q)
    at = np.arange(l)
    np.testing.assert_array_equal(got["text"], ids + [tokenizer.pad_id] * (l - n))
    np.testing.assert_array_equal(got["mask_ar"], at >= n_prefix)  # 0 on image slots + bos + question
    np.testing.assert_array_equal(got["mask_loss"], (at >= n_prefix) & (at < n))  # answer + eos
    np.testing.assert_array_equal(got["mask_input"], at < n)  # image slots + real text
    np.testing.assert_array_equal(got["segment"], at < n)
    np.testing.assert_array_equal(got["positions"], at)
    np.testing.assert_array_equal(got["image_pos"], [0])
    np.testing.assert_array_equal(got["image"], _pixels(train_source[r]["image"])[None])
    for k in KEYS - {"image"}:
      assert got[k].dtype == np.int32, k
    assert got["image"].dtype == np.float32


def test_cross_row_has_no_image_slots(test_config, tokenizer, train_source):
  config = _config(test_config)
  config.model.update(dict(family="cross", family_options=dict(cross=dict(every=1))))
  row = pipeline.row_layout(config, tokenizer)
  assert not row.in_sequence and row.length == config.data.text_len == vqa.row_length(config)
  q, a = _qa(train_source, 0)
  got = row.pad(row.train(_record_conv(train_source, 0)))
  ids = [tokenizer.bos_id, *tokenizer.encode(q), *tokenizer.encode(a), tokenizer.eos_id]
  at, n, n_prefix = np.arange(row.length), len(ids), 1 + len(tokenizer.encode(q))
  np.testing.assert_array_equal(got["text"], ids + [tokenizer.pad_id] * (row.length - n))
  np.testing.assert_array_equal(got["image_pos"], [0])  # the first token that sees the image
  np.testing.assert_array_equal(got["mask_ar"], at >= n_prefix)
  np.testing.assert_array_equal(got["mask_input"], at < n)
  chex.assert_shape(got["image"], (1, 32, 32, 3))


def test_mllama_rows_keep_each_image_placeholder_as_a_token(test_config, tokenizer, train_source):
  """Llama 3.2 Vision's form (cross, image_groups "consecutive", as the import sets): the placeholder
  stays in the text and image_pos is its index, so two images on adjacent placeholders are one run and
  two images one word apart are not (the model groups by run: cross_attention.run_starts)."""
  config = _config(test_config, max_images=3)
  config.model.family = "cross"
  config.model.family_options.cross.image_groups = "consecutive"
  row = pipeline.row_layout(config, tokenizer)
  img = train_source[0]["image"]
  q, a = _qa(train_source, 0)
  conv = Conversation(turns=(Turn("user", (Image(0), Image(1), "x", Image(2), q)), Turn("assistant", (a,))),
                      images=(img, img, img))
  conv.check()
  got = row.pad(row.train(conv))
  p0, p1, p2 = got["image_pos"].tolist()
  assert p1 == p0 + 1 and p2 > p1 + 1  # adjacent placeholders; then text between
  marks = got["text"][[p0, p1, p2]]
  assert (marks == marks[0]).all() and marks[0] != tokenizer.pad_id  # the same placeholder id, kept
  starts = models.cross_attention.run_starts(got["image_pos"][None])[0].tolist()
  assert starts == [p0, p0, p2]


def test_two_images_in_two_turns_and_an_empty_slot(test_config, tokenizer, train_source):
  config = _config(test_config, max_images=2)
  row = pipeline.row_layout(config, tokenizer)
  l = row.length
  assert l == 20 + 2 * N
  img0, img1 = train_source[0]["image"], train_source[1]["image"]
  (q1, a1), (q2, a2) = _qa(train_source, 0), _qa(train_source, 1)
  # Image(1) placed first: the row's slots follow the placement order, not the indices.
  conv = Conversation(turns=(Turn("user", (Image(1), q1)), Turn("assistant", (a1,)),
                             Turn("user", (Image(0), q2)), Turn("assistant", (a2,))),
                      images=(img0, img1))
  conv.check()
  got = row.pad(row.train(conv))
  second = N + 1 + len(tokenizer.encode(q1)) + len(tokenizer.encode(a1)) + 1  # after turn 1's eos
  np.testing.assert_array_equal(got["image_pos"], [0, second])
  np.testing.assert_array_equal(got["image"], np.stack([_pixels(img1), _pixels(img0)]))
  for p in got["image_pos"]:
    assert (got["text"][p:p + N] == tokenizer.pad_id).all() and (got["mask_input"][p:p + N] == 1).all()
    assert (got["mask_loss"][p:p + N] == 0).all()
  assert got["text"][N] == tokenizer.bos_id and got["text"][second - 1] == tokenizer.eos_id
  assert got["text"][second + N:second + N + len(tokenizer.encode(q2))].tolist() == tokenizer.encode(q2)
  n = int(got["mask_input"].sum())
  assert n == 2 * N + 1 + sum(len(tokenizer.encode(t)) for t in (q1, a1, q2, a2)) + 2
  # One image in a max_images=2 row: the second slot is empty (image_pos = L, zero pixels).
  one = row.pad(row.train(_record_conv(train_source, 0)))
  np.testing.assert_array_equal(one["image_pos"], [0, l])
  assert (one["image"][1] == 0).all() and (one["image"][0] != 0).any()


def test_too_many_images_is_too_long_naming_max_images(test_config, tokenizer, train_source):
  row = pipeline.row_layout(test_config, tokenizer)
  img = train_source[0]["image"]
  conv = Conversation(turns=(Turn("user", (Image(0), Image(1), "same?")), Turn("assistant", ("no",))),
                      images=(img, img))
  with pytest.raises(rows.TooLong) as e:
    row.train(conv)
  assert (e.value.n, e.value.budget, e.value.field) == (2, 1, "max_images")
  assert "needs 2 image slots" in str(e.value) and "data.max_images allows 1" in str(e.value)


def test_too_many_text_tokens_is_too_long_naming_text_len(test_config, tokenizer, train_source):
  q, a = _qa(train_source, 0)
  needed = 1 + len(tokenizer.encode(q)) + len(tokenizer.encode(a)) + 1  # bos question answer eos
  conv = _record_conv(train_source, 0)
  with pytest.raises(rows.TooLong) as e:
    pipeline.row_layout(_config(test_config, text_len=needed - 1), tokenizer).train(conv)
  assert (e.value.n, e.value.budget, e.value.field) == (needed, needed - 1, "text_len")
  assert f"needs {needed} text tokens" in str(e.value)
  assert f"data.text_len allows {needed - 1}" in str(e.value)
  # Exactly text_len text tokens fit (the image slots do not count against it): a full row.
  row = pipeline.row_layout(_config(test_config, text_len=needed), tokenizer)
  full = row.pad(row.train(conv))
  assert full["mask_input"].all() and full["text"][-1] == tokenizer.eos_id


# --- packing ---

def _examples(row, train_source, count):
  return [row.train(_record_conv(train_source, r, r % 4)) for r in range(count)]


def _pack(row, examples, bins):
  ds = grain.MapDataset.source(examples).to_iter_dataset()
  ds = grain.experimental.FirstFitPackIterDataset(ds, length_struct=row.lengths(), num_packing_bins=bins,
                                                  shuffle_bins=False)
  return [row.packed(p) for p in ds]


def _check_packed_row(got, l, tokenizer):
  """segments 1, 2, ... in order, positions restarting in each, mask_input on real tokens only, and
  image_pos at each example's slots; returns [(start, length)] of the examples."""
  seg = got["segment"]
  k = int(seg.max())
  spans = []
  for s in range(1, k + 1):
    where = np.flatnonzero(seg == s)
    assert len(where) and (np.diff(where) == 1).all(), f"segment {s} is not one run"
    spans.append((int(where[0]), len(where)))
    np.testing.assert_array_equal(got["positions"][where], np.arange(len(where)))
  assert [a for a, _ in spans] == sorted(a for a, _ in spans)  # 1, 2, ... left to right
  end = spans[-1][0] + spans[-1][1]
  assert (seg[end:] == 0).all() and end == int((seg > 0).sum())
  np.testing.assert_array_equal(got["mask_input"], seg > 0)
  assert (got["text"][end:] == tokenizer.pad_id).all() and (got["mask_loss"][end:] == 0).all()
  # Every shapes example has one image at its start: image_pos = the row index of its first slot.
  m = len(got["image_pos"])
  np.testing.assert_array_equal(got["image_pos"], [a for a, _ in spans] + [l] * (m - k))
  assert (got["image"][k:] == 0).all()
  for a, _ in spans:
    assert got["text"][a + N] == tokenizer.bos_id
  return spans


def test_packed_rows_segments_positions_and_image_pos(test_config, tokenizer, train_source):
  config = _config(test_config, max_images=3)
  row = pipeline.row_layout(config, tokenizer)
  l = row.length
  examples = _examples(row, train_source, 6)
  packed = _pack(row, examples, bins=2)
  assert sum(int(p["segment"].max()) for p in packed) == len(examples)
  seen = []
  for got in packed:
    assert set(got) == KEYS
    chex.assert_shape([got[k] for k in KEYS - {"image", "image_pos"}], (l,))
    chex.assert_shape(got["image"], (3, 32, 32, 3))
    assert got["image_pos"].dtype == np.int32 and got["segment"].dtype == np.int32
    for j, (a, n) in enumerate(_check_packed_row(got, l, tokenizer)):
      seen.append((got["text"][a:a + n].tolist(), got["mask_loss"][a:a + n].tolist(),
                   got["mask_ar"][a:a + n].tolist(), got["image"][j].tobytes()))
  # Every example is in exactly one row, unchanged.
  expected = [(e["text"].tolist(), e["mask_loss"].tolist(), e["mask_ar"].tolist(), e["image"][0].tobytes())
              for e in examples]
  assert sorted(seen) == sorted(expected)


def _iter(config, tokenizer, source):
  return pipeline.train_iterator(config, tokenizer, source, process_index=0, process_count=1)


def test_packed_train_iterator_keys_shapes_and_state(test_config, tokenizer, train_source):
  config = _config(test_config, max_images=3, packing=True)
  l = 20 + 3 * N
  it = _iter(config, tokenizer, train_source)
  batch = next(it)
  plain = next(_iter(_config(test_config, max_images=3), tokenizer, train_source))
  assert set(batch) == set(plain) == KEYS
  for k in KEYS:
    assert batch[k].shape == plain[k].shape and batch[k].dtype == plain[k].dtype, k
  chex.assert_shape(batch["text"], (8, l))
  assert int(batch["segment"].max(axis=1).sum()) > 8  # several examples in some rows
  for i in range(len(batch["text"])):
    _check_packed_row({k: v[i] for k, v in batch.items()}, l, tokenizer)
  next(it)
  state = it.get_state()
  expected = [next(it) for _ in range(2)]
  resumed = _iter(config, tokenizer, train_source)
  resumed.set_state(state)
  chex.assert_trees_all_equal([next(resumed) for _ in range(2)], expected)


def test_packed_loss_is_the_mean_of_the_examples_own_losses(test_config, tokenizer, train_source):
  config = _config(test_config, max_images=3)
  row = pipeline.row_layout(config, tokenizer)
  img = train_source[6]["image"]
  # Shapes questions, a two-image conversation and a text-only one (no image: its slots stay empty).
  two = Conversation(turns=(Turn("user", (Image(0), "left?")), Turn("assistant", ("a circle",)),
                            Turn("user", (Image(1), "and here?")), Turn("assistant", ("two squares",))),
                     images=(img, train_source[7]["image"]))
  text_only = Conversation(turns=(Turn("user", ("what is there?",)), Turn("assistant", ("nothing",))))
  examples = _examples(row, train_source, 5) + [row.train(two), row.train(text_only)]
  packed = _pack(row, examples, bins=3)
  batch = {k: jnp.asarray(np.stack([p[k] for p in packed])) for k in KEYS}
  assert int(batch["segment"].max(axis=1).sum()) == len(examples) and len(packed) < len(examples)
  # image_pos: each example's own image positions, moved to where the example starts in its row.
  by_text = {e["text"].tobytes(): e for e in examples}
  for p in packed:
    want = []
    for s in range(1, int(p["segment"].max()) + 1):
      where = np.flatnonzero(p["segment"] == s)
      e = by_text[p["text"][where].tobytes()]
      want += (where[0] + e["image_pos"]).tolist()
    np.testing.assert_array_equal(p["image_pos"], want + [row.length] * (3 - len(want)))
  model = models.build_model(config.model, tokenizer.vocab_size)
  init_batch = vqa.example_batch(config)
  params = nn.meta.unbox(jax.jit(model.init)(
      jax.random.key(0), *(init_batch[k] for k in TASKS["vqa"].inputs)))["params"]
  loss = jax.jit(lambda b: vqa.loss_fn(model, params, b, norm="example"))
  own = [float(loss({k: jnp.asarray(v)[None] for k, v in row.pad(e).items()})) for e in examples]
  np.testing.assert_allclose(float(loss(batch)), np.mean(own), rtol=1e-5, atol=1e-5)
  assert np.std(own) > 1e-3  # the examples differ, so the per-example weighting is what is checked

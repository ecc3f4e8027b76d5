"""grain train pipeline and eval batches: layout, determinism, sharding, resumption, coverage."""
import copy
import dataclasses

import chex
import grain
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from mm_jax import data
from mm_jax.config import validate
from mm_jax.data import pipeline, shapes
from mm_jax.errors import UserError

PAIRS = 64 * 4  # Test config: 64 train images x 4 questions.


def _iter(config, tokenizer, source, index=0, count=1):
  return pipeline.train_iterator(config, tokenizer, source, process_index=index, process_count=count)


def _take(it, n):
  return [next(it) for _ in range(n)]


def _split_text(tokenizer, row):
  """-> (question, answer) decoded from a train row, using only its masks to find the parts."""
  prefix = row["text"][row["mask_ar"] == 0]
  suffix = row["text"][row["mask_loss"] == 1]
  return tokenizer.decode(prefix), tokenizer.decode(suffix)


def _train_keys(tokenizer, batches):
  keys = []
  for batch in batches:
    for i in range(len(batch["text"])):
      row = {k: v[i] for k, v in batch.items()}
      keys.append((row["image"].tobytes(), *_split_text(tokenizer, row)))
  return keys


def _resized(image, size):
  """The spec: PIL bilinear resize, then [0, 255] -> [-1, 1]."""
  image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
  return image.astype(np.float32) / 127.5 - 1.0


def _eval_keys(batches):
  return [(b["image"][i].tobytes(), b["question"][i], b["answer"][i])
          for b in batches for i in range(len(b["valid"])) if b["valid"][i]]


def test_batch_shapes_dtypes_and_mask_layout(test_config, tokenizer, train_source):
  batch = next(_iter(test_config, tokenizer, train_source))
  b, s, m, n_img = 8, 32, 1, 16  # unified: N = 16 image slots per image, max_images 1
  t = 20 + m * n_img  # L = text_len + max_images x N
  chex.assert_shape(batch["image"], (b, m, s, s, 3))
  for key in ("text", "mask_ar", "mask_loss", "mask_input", "segment", "positions"):
    chex.assert_shape(batch[key], (b, t))
    assert batch[key].dtype == np.int32, key
  chex.assert_shape(batch["image_pos"], (b, m))
  assert batch["image_pos"].dtype == np.int32
  assert set(batch) == {"image", "image_pos", "text", "mask_ar", "mask_loss", "mask_input", "segment",
                        "positions"}
  assert batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1 and batch["image"].std() > 0.1
  pairs = {(q.decode(), a.decode()) for i in range(len(train_source))
           for q, a in zip(train_source[i]["questions"], train_source[i]["answers"])}
  for i in range(b):
    text, ar, loss, inp = (batch[k][i] for k in ("text", "mask_ar", "mask_loss", "mask_input"))
    n_prefix, n = int((ar == 0).sum()), int(inp.sum())
    # plain template: the image's N slots at 0, then bos question answer eos.
    np.testing.assert_array_equal(batch["image_pos"][i], [0])
    assert (text[:n_img] == tokenizer.pad_id).all()
    assert text[n_img] == tokenizer.bos_id and text[n - 1] == tokenizer.eos_id
    np.testing.assert_array_equal(ar, np.arange(t) >= n_prefix)  # 0 exactly on image slots + bos + question.
    assert n_prefix > n_img + 1
    np.testing.assert_array_equal(inp, np.arange(t) < n)  # 1 on the image slots and the real text.
    np.testing.assert_array_equal(loss, (np.arange(t) >= n_prefix) & (np.arange(t) < n))
    assert (text[n:] == tokenizer.pad_id).all() and (text[n_img:n] != tokenizer.pad_id).all()
    np.testing.assert_array_equal(batch["segment"][i], inp)  # one example per row
    np.testing.assert_array_equal(batch["positions"][i], np.arange(t))
    assert _split_text(tokenizer, {"text": text, "mask_ar": ar, "mask_loss": loss}) in pairs


def test_same_seed_same_batches_other_seed_other_batches(test_config, tokenizer, train_source):
  a = _take(_iter(test_config, tokenizer, train_source), 3)
  b = _take(_iter(test_config, tokenizer, train_source), 3)
  chex.assert_trees_all_equal(a, b)
  other = copy.deepcopy(test_config)
  other.seed = 1
  c = _take(_iter(other, tokenizer, train_source), 3)
  assert not np.array_equal(a[0]["text"], c[0]["text"])


def test_each_epoch_covers_every_pair_and_is_reshuffled(test_config, tokenizer, train_source):
  per_epoch = PAIRS // 8
  keys = _train_keys(tokenizer, _take(_iter(test_config, tokenizer, train_source), 2 * per_epoch))
  first, second = keys[:PAIRS], keys[PAIRS:]
  assert len(set(first)) == PAIRS and set(first) == set(second)
  assert first != second


def test_process_shards_are_disjoint_and_cover_the_split(test_config, tokenizer, train_source):
  per_epoch = PAIRS // 2 // 4  # Local batch 4 on each of 2 processes.
  shards = []
  for index in (0, 1):
    it = _iter(test_config, tokenizer, train_source, index, 2)
    batches = _take(it, per_epoch)
    assert batches[0]["text"].shape[0] == 4
    shards.append(_train_keys(tokenizer, batches))
  assert len(set(shards[0])) == len(shards[0]) == PAIRS // 2
  assert not set(shards[0]) & set(shards[1])
  everything = _eval_keys(pipeline.eval_batches(test_config, tokenizer, train_source,
                                                process_index=0, process_count=1))
  assert set(shards[0]) | set(shards[1]) == set(everything)


def test_get_state_set_state_resumes_exactly(test_config, tokenizer, train_source):
  it = _iter(test_config, tokenizer, train_source)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 2)
  resumed = _iter(test_config, tokenizer, train_source)
  resumed.set_state(state)
  chex.assert_trees_all_equal(_take(resumed, 2), expected)


def test_orbax_checkpoint_resumes_exactly(tmp_path, test_config, tokenizer, train_source):
  it = _iter(test_config, tokenizer, train_source)
  _take(it, 2)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 2)
  resumed = _iter(test_config, tokenizer, train_source)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(2, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  chex.assert_trees_all_equal(_take(resumed, 2), expected)


def test_uneven_batch_over_processes_is_a_user_error(test_config, tokenizer, train_source):
  with pytest.raises(UserError, match="--config.global_batch_size to a positive multiple of 3"):
    _iter(test_config, tokenizer, train_source, 0, 3)


def test_text_too_long_is_a_user_error(test_config, tokenizer, train_source):
  config = copy.deepcopy(test_config)
  config.data.text_len = 5
  with pytest.raises(UserError, match=r"record \d+ .* needs \d+ text tokens but --config.data.text_len allows 5"):
    next(_iter(config, tokenizer, train_source))
  with pytest.raises(UserError, match="--config.data.text_len"):
    next(pipeline.eval_batches(config, tokenizer, train_source, process_index=0, process_count=1))


@pytest.mark.parametrize("count", [1, 2])
def test_eval_covers_every_pair_once_with_padding(test_config, tokenizer, count):
  config = copy.deepcopy(test_config)
  config.eval.batch_size = 24  # 16 images x 4 = 64 pairs: the last batch is padded.
  source = pipeline.open_source(config, "validation")
  expected = [(_resized(source[i]["image"], 32).tobytes(), q.decode(), a.decode())
              for i in range(len(source)) for q, a in zip(source[i]["questions"], source[i]["answers"])]
  keys, num_batches = [], set()
  for index in range(count):
    batches = list(pipeline.eval_batches(config, tokenizer, source, process_index=index,
                                         process_count=count))
    num_batches.add(len(batches))
    b = 24 // count
    n_img, t = 16, 20 + 16  # L = text_len + max_images x N
    for batch in batches:
      chex.assert_shape(batch["image"], (b, 1, 32, 32, 3))
      chex.assert_shape(batch["image_pos"], (b, 1))
      chex.assert_shape([batch["text"], batch["mask_input"]], (b, t))
      assert batch["prefix_len"].dtype == np.int32 and batch["valid"].dtype == bool
      assert len(batch["question"]) == len(batch["answer"]) == len(batch["kind"]) == b
      for i in range(b):
        n = batch["prefix_len"][i]  # the prompt's length, image slots included
        np.testing.assert_array_equal(batch["mask_input"][i], np.arange(t) < n)
        assert (batch["text"][i][n:] == tokenizer.pad_id).all()
        if batch["valid"][i]:
          assert batch["image_pos"][i][0] == 0 and (batch["text"][i][:n_img] == tokenizer.pad_id).all()
          assert batch["text"][i][n_img] == tokenizer.bos_id
          assert tokenizer.decode(batch["text"][i]) == batch["question"][i]
        else:
          assert batch["text"][i][0] == tokenizer.bos_id
          assert batch["answer"][i] == batch["question"][i] == "" and n == 1
          assert (batch["image"][i] == 0).all() and batch["image_pos"][i][0] == t  # an empty slot
    keys += _eval_keys(batches)
    assert not batches[-1]["valid"].all() and batches[0]["valid"].all()
  assert num_batches == {3}  # Every process yields the same number of batches.
  assert sorted(keys) == sorted(expected)
  if count == 1:
    assert keys == expected  # Fixed order: record by record, questions in kind order.


def test_blind_images_are_constant(test_config, tokenizer, train_source):
  config = copy.deepcopy(test_config)
  config.data.blind = True
  batch = next(_iter(config, tokenizer, train_source))
  assert (batch["image"] == 0).all() and batch["image"].shape == (8, 1, 32, 32, 3)
  ev = next(pipeline.eval_batches(config, tokenizer, train_source, process_index=0, process_count=1))
  assert (ev["image"] == 0).all()
  seen = next(_iter(test_config, tokenizer, train_source))
  chex.assert_trees_all_equal(batch["text"], seen["text"])  # Only the image changes.


def test_full_size_images_are_not_resized(test_config, tokenizer, train_source):
  config = copy.deepcopy(test_config)
  config.data.image_size = 64
  batch = next(_iter(config, tokenizer, train_source))
  images = {train_source[i]["image"].tobytes() for i in range(len(train_source))}
  for image in batch["image"]:
    restored = np.round((image + 1) * 127.5).astype(np.uint8)
    assert restored.tobytes() in images


def test_unknown_data_name_is_one_line_naming_the_known_ones(test_config):
  config = copy.deepcopy(test_config)
  config.data.name = "coco"
  assert "shapes" in data.SOURCES
  msg = f"data.name='coco' is unknown; use one of {', '.join(data.SOURCES)} (--config.data.name=...)"
  for call in (lambda: data.get("coco"), lambda: pipeline.open_source(config, "train")):
    with pytest.raises(UserError) as e:
      call()
    assert str(e.value) == msg


def test_a_new_source_is_one_record(test_config, tokenizer, train_source, monkeypatch):
  """A source registered in data.SOURCES alone (here: shapes' colour questions and captions) is what
  the train and eval pipelines and the validator's text_len check read."""
  shapes_k = lambda k: 0 if k == 0 else shapes.SOURCE.caption_element
  colors = dataclasses.replace(shapes.SOURCE, kinds=("color",),
                               texts=lambda record, k: shapes.SOURCE.texts(record, shapes_k(k)),
                               field=lambda k: shapes.SOURCE.field(shapes_k(k)))
  monkeypatch.setitem(data.SOURCES, "colors", colors)
  config = copy.deepcopy(test_config)
  config.data.name, config.data.caption_ratio, config.data.text_len = "colors", 1.0, 26
  it = pipeline.train_iterator(config, tokenizer, pipeline.open_source(config, "train"),
                               process_index=0, process_count=1)
  epoch = _train_keys(tokenizer, _take(it, 2 * 64 // config.global_batch_size))
  questions = sorted(q for _, q, _ in epoch)
  assert questions.count("what is there?") == 64 and all(q.startswith("what color") for q in questions[:64])
  ev = list(pipeline.eval_batches(config, tokenizer, train_source, process_index=0, process_count=1))
  assert sum(int(b["valid"].sum()) for b in ev) == 64
  assert {k for b in ev for k, v in zip(b["kind"], b["valid"]) if v} == {"color"}
  elements = list(validate._elements(config, tokenizer, "train", "vqa", True))  # pylint: disable=protected-access
  assert len(elements) == 128 and sum(what == "its caption" for *_, what in elements) == 64

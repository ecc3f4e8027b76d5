"""The shapes generator, its answers and balance, and the TFDS builder."""
import collections
import copy
import os
import re
import time

import chex
import numpy as np
import pytest

from mm_jax.data import shapes
from mm_jax.errors import UserError

_WORDS = r"(\w+)"


def _oracle(scene: shapes.Scene, question: str) -> str:
  """Answers a question from the scene description alone, independently of `shapes.questions`."""
  objs = scene.objects
  if m := re.fullmatch(rf"what color is the {_WORDS}\?", question):
    (o,) = [o for o in objs if o.shape == m[1]]  # Asked only about a shape that occurs once.
    return o.color
  if m := re.fullmatch(r"what color is the shape in the ([a-z ]+)\?", question):
    (o,) = [o for o in objs if shapes.REGIONS[o.region] == m[1]]
    return o.color
  if m := re.fullmatch(r"what shape is in the ([a-z ]+)\?", question):
    (o,) = [o for o in objs if shapes.REGIONS[o.region] == m[1]]
    return o.shape
  if question == "how many shapes are there?":
    return str(len(objs))
  if m := re.fullmatch(rf"how many {_WORDS} shapes are there\?", question):
    return str(sum(o.color == m[1] for o in objs))
  if m := re.fullmatch(rf"how many {_WORDS}s are there\?", question):
    return str(sum(o.shape == m[1] for o in objs))
  if m := re.fullmatch(rf"is there an? {_WORDS} {_WORDS}\?", question):
    return "yes" if any((o.color, o.shape) == (m[1], m[2]) for o in objs) else "no"
  raise AssertionError(f"unknown question {question!r}")


def _kind(question: str) -> str:
  return {"what color": "color", "what shape": "shape", "how many": "count", "is there": "presence"}[
      " ".join(question.split()[:2])]


@pytest.fixture(scope="module")
def many():
  return shapes.generate(7, {"train": 2000})["train"]


def test_generate_is_deterministic_for_a_seed():
  a = shapes.generate(3, {"train": 30, "test": 5})
  b = shapes.generate(3, {"train": 30, "test": 5})
  c = shapes.generate(4, {"train": 30, "test": 5})
  assert a == b
  assert a["train"] != c["train"]
  chex.assert_trees_all_equal(shapes.render(a["train"][0][0]), shapes.render(b["train"][0][0]))


def test_scene_layout(many):
  counts = collections.Counter()
  for scene, _ in many:
    assert 1 <= len(scene.objects) <= 4
    assert min(scene.background) >= 180  # Light, so every shape colour stands out.
    regions = [o.region for o in scene.objects]
    assert regions == sorted(set(regions))  # At most one shape per quadrant.
    for o in scene.objects:
      qx, qy = 32 * (o.region % 2), 32 * (o.region // 2)
      assert qx < o.x and o.x + o.size < qx + 32 and qy < o.y and o.y + o.size < qy + 32
      assert 16 <= o.size <= 24 and o.shape in shapes.SHAPES and o.color in shapes.COLORS
    counts[len(scene.objects)] += 1
  assert set(counts) == {1, 2, 3, 4}


def test_render_draws_each_shape_in_its_colour():
  for scene, _ in shapes.generate(0, {"train": 50})["train"]:
    img = shapes.render(scene)
    chex.assert_shape(img, (64, 64, 3))
    assert img.dtype == np.uint8
    for o in scene.objects:
      # Centre column, 3/4 down the box: inside a circle, a square and a triangle alike.
      cx, cy = o.x + o.size // 2, o.y + (3 * o.size) // 4
      np.testing.assert_array_equal(img[cy, cx], shapes.COLORS[o.color])
      np.testing.assert_array_equal(img[o.y + o.size, o.x + o.size], scene.background)
    empty = set(range(4)) - {o.region for o in scene.objects}
    for region in empty:
      quadrant = img[32 * (region // 2):][:32, 32 * (region % 2):][:, :32]
      assert (quadrant == np.array(scene.background, np.uint8)).all()


def test_answers_are_right_for_the_scene(many):
  for scene, qa in many:
    assert len(qa) == 4
    assert [_kind(q) for q, _ in qa] == list(shapes.QUESTION_KINDS)
    for question, answer in qa:
      assert answer == _oracle(scene, question), (shapes.caption(scene), question, answer)
      assert len(answer.split()) == 1 and answer == answer.lower()
      assert question.endswith("?") and question == question.lower() and "?" not in question[:-1]


def test_caption_lists_every_shape():
  scene = shapes.Scene((220, 220, 220), (
      shapes.Obj(0, "circle", "red", 2, 2, 20), shapes.Obj(3, "square", "orange", 40, 40, 16)))
  assert shapes.caption(scene) == "top left red circle, bottom right orange square"


def test_answers_are_balanced(many):
  """A model that sees only the question must score low: no answer may dominate a kind or a question."""
  text_only_correct = 0
  for k, kind in enumerate(shapes.QUESTION_KINDS):
    answers = collections.Counter(qa[k][1] for _, qa in many)
    top_share = max(answers.values()) / len(many)
    if kind == "presence":
      assert abs(top_share - 0.5) < 0.05, answers
    else:
      assert top_share <= 0.5, (kind, answers)
    if kind == "count":
      assert set(answers) == {"0", "1", "2", "3", "4"} and top_share <= 0.36, answers
    per_question = collections.defaultdict(collections.Counter)
    for _, qa in many:
      per_question[qa[k][0]][qa[k][1]] += 1
    text_only_correct += sum(max(c.values()) for c in per_question.values())
  # Best accuracy of answering each exact question text with its most frequent answer (in-sample, so
  # slightly optimistic); the population value is about 1/3.
  assert text_only_correct / (4 * len(many)) <= 0.38


def test_splits_are_disjoint():
  data = shapes.generate(0, {"train": 3000, "validation": 200, "test": 500})
  keys = {split: {scene.objects for scene, _ in items} for split, items in data.items()}
  assert len(keys["train"]) == 3000 and len(keys["validation"]) == 200 and len(keys["test"]) == 500
  assert not keys["train"] & keys["validation"] and not keys["train"] & keys["test"]
  assert not keys["validation"] & keys["test"]


def test_repeated_scenes_are_redrawn(monkeypatch):
  # Only 3 scenes are possible, so collisions are certain without the dedupe.
  def tiny_scene(rng):
    return shapes.Scene((220, 220, 220), (shapes.Obj(0, shapes.SHAPES[rng.integers(3)], "red", 2, 2, 16),))
  monkeypatch.setattr(shapes, "random_scene", tiny_scene)
  data = shapes.generate(0, {"train": 1, "validation": 1, "test": 1})
  assert len({items[0][0] for items in data.values()}) == 3


def test_builder_round_trip(test_config):
  builder = shapes.build(test_config.data)
  assert "tr64-va16-te16-s0" in builder.data_dir
  assert os.path.exists(os.path.join(builder.data_dir, shapes.TOKENIZER_FILE))
  sizes = dict(train=64, validation=16, test=16)
  expected = shapes.generate(0, sizes)
  sources = builder.as_data_source()
  for split, n in sizes.items():
    assert len(sources[split]) == n
    for i in (0, n - 1):
      record, (scene, qa) = sources[split][i], expected[split][i]
      np.testing.assert_array_equal(record["image"], shapes.render(scene))  # PNG is lossless.
      assert record["caption"].decode() == shapes.caption(scene)
      assert [q.decode() for q in record["questions"]] == [q for q, _ in qa]
      assert [a.decode() for a in record["answers"]] == [a for _, a in qa]


def test_build_reuses_existing_data(test_config):
  builder = shapes.build(test_config.data)
  path = os.path.join(builder.data_dir, shapes.TOKENIZER_FILE)
  before = os.stat(path).st_mtime_ns
  start = time.perf_counter()
  shapes.build(test_config.data)
  assert time.perf_counter() - start < 2.0
  assert os.stat(path).st_mtime_ns == before


def test_other_sizes_get_their_own_directory(test_config):
  data_cfg = copy.deepcopy(test_config.data)
  data_cfg.num_test = 8
  builder = shapes.build(data_cfg)
  assert "tr64-va16-te8-s0" in builder.data_dir
  assert len(builder.as_data_source()["test"]) == 8


def test_only_process_0_builds(monkeypatch, tmp_path, test_config):
  syncs = []
  monkeypatch.setattr(shapes.jax, "process_count", lambda: 2)
  monkeypatch.setattr(shapes.jax, "process_index", lambda: 1)
  monkeypatch.setattr(shapes.multihost_utils, "sync_global_devices", syncs.append)
  builder = shapes.build(test_config.data)  # Already built by "process 0": just opened.
  assert len(builder.as_data_source()["train"]) == 64 and syncs == ["shapes_build"]
  data_cfg = copy.deepcopy(test_config.data)
  data_cfg.data_dir = str(tmp_path / "fresh")
  shapes.build(data_cfg)
  assert not os.path.exists(data_cfg.data_dir)  # Process 1 writes nothing: only process 0 builds.


def test_unwritable_data_dir_is_a_user_error(tmp_path, test_config):
  blocker = tmp_path / "file"
  blocker.write_text("not a directory")
  data_cfg = copy.deepcopy(test_config.data)
  data_cfg.data_dir = str(blocker / "data")
  with pytest.raises(UserError) as e:
    shapes.build(data_cfg)
  assert str(e.value) == (f"data_dir {data_cfg.data_dir!r} is not writable (Not a directory); "
                          "set --config.data.data_dir to a writable directory")
  assert os.listdir(tmp_path) == ["file"]


def test_smaller_vocab_than_the_shipped_tokenizer_is_a_user_error(test_config):
  data_cfg = copy.deepcopy(test_config.data)
  data_cfg.vocab_size = 64
  with pytest.raises(UserError, match="has 128 pieces but data.vocab_size is 64"):
    shapes.build(data_cfg)


def test_bad_split_size_is_a_user_error(test_config):
  data_cfg = copy.deepcopy(test_config.data)
  data_cfg.num_validation = 0
  with pytest.raises(UserError, match="--config.data.num_validation"):
    shapes.build(data_cfg)


def test_built_data_is_reused_from_a_read_only_dir(monkeypatch, test_config):
  """A built copy is opened without the writability probe (a shared, read-only data_dir works)."""
  def no_write(path):
    raise AssertionError(f"probed {path}")
  monkeypatch.setattr(shapes, "_check_writable", no_write)
  assert len(shapes.build(test_config.data).as_data_source()["train"]) == 64

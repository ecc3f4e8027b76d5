"""The shapes export (mm_jax.data.export) and the generated tasks (mm_jax.data.shapes_tasks): the qa
export is the native source's elements, the records have the documented layouts, multi_turn and
multi_image are right and balanced, shapes_sizes exports at its own sizes, shapes_video as videos that
prepare imports, and bad flags stop the real command with one line."""
import collections
import copy
import io
import json
import os
import pathlib
import re
import subprocess
import sys

import PIL.Image
import pytest

from conftest import REPO, load_config
from mm_jax import data
from mm_jax.data import export, pipeline, shapes, shapes_tasks
from mm_jax.models import native as native_family
import mm_jax.data.prepare as prepare  # the module (mm_jax.data.prepare is also data's function)
from mm_jax.data.conversation import Conversation
from mm_jax.errors import UserError

SMALL = dict(num_train=12, num_validation=4, num_test=5, dataset_seed=0, caption_ratio=0.5)
PROG = "mm_jax.data.export"


def _cfg(**sizes):
  return type("DataCfg", (), {**SMALL, **sizes})()


def _command(*args) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", PROG, *args], cwd=REPO, capture_output=True,
                        text=True, timeout=300, check=False)


def _read(out: pathlib.Path, split: str, fmt: str) -> list[dict]:
  if fmt == "llava":
    return json.loads((out / f"{split}.json").read_text())
  return [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def native(tmp_path_factory):
  """The native shapes data of SMALL (TFDS built, images left encoded): {split: [(question, answer,
  png bytes, kind)]}, in Source.element's order."""
  config = copy.deepcopy(load_config("test"))
  config.data.update(SMALL)
  config.data.data_dir = str(tmp_path_factory.mktemp("native"))
  src = data.get("shapes")
  out = {}
  for split in shapes.SPLITS:
    raw = src.open(config.data, split, text_only=True)
    elements = []
    for j in range(src.num_elements(config.data, len(raw), train=split == "train")):
      r, k = src.element(config.data, len(raw), j)
      question, answer = src.texts(raw[r], k)
      kind = src.kinds[k] if k < src.num_questions else "caption"
      elements.append((question, answer, bytes(raw[r]["image"]), kind, r))
    out[split] = elements
  return out


def test_qa_export_is_the_native_elements(native, tmp_path):
  out = tmp_path / "llava"
  flags = [f"--{k}={v}" for k, v in SMALL.items()]
  result = _command(f"--out={out}", "--format=llava", *flags)  # the real command, once
  assert result.returncode == 0, result.stderr
  assert f"Wrote 54 qa records to {out}/train.json" in result.stdout  # 12 x 4 questions + 6 captions
  export.export(str(tmp_path / "messages"), "messages", **SMALL)
  assert len(native["train"]) == 12 * 4 + 6 and len(native["test"]) == 5 * 4
  for split, elements in native.items():
    llava, messages = _read(out, split, "llava"), _read(tmp_path / "messages", split, "messages")
    convs = list(shapes_tasks.conversations(split, "qa", _cfg()))
    assert len(llava) == len(messages) == len(convs) == len(elements)
    for (question, answer, png, kind, r), lr, mr, conv in zip(elements, llava, messages, convs):
      human, gpt = lr["conversations"]
      assert human["value"] == f"<image>\n{question}" and gpt["value"] == answer
      user, assistant = mr["messages"]
      assert user["content"] == f"<image>{question}" and assistant["content"] == answer
      assert lr["id"] == mr["id"] == conv.id == f"{split}/{r}/{kind}"
      assert lr["kind"] == mr["kind"] == kind
      assert lr["image"] == f"images/{split}/{r}.png" and mr["images"] == [lr["image"]]
      assert (out / lr["image"]).read_bytes() == png == conv.images[0]  # byte-identical
      assert (tmp_path / "messages" / lr["image"]).read_bytes() == png
    assert sorted(os.listdir(out / "images" / split)) == sorted(
        f"{i}.png" for i in range(SMALL[f"num_{split}"]))  # each scene once


def test_shapes_sizes_export_is_its_native_elements_at_their_own_sizes(tmp_path):
  """--dataset=shapes_sizes through the command: the records and PNGs of the TFDS build, byte for byte,
  the images of many sizes."""
  config = copy.deepcopy(load_config("native,test", "shapes_native"))
  config.data.update(SMALL)
  config.data.data_dir = str(tmp_path / "native")
  src, out = data.get("shapes_sizes"), tmp_path / "out"
  result = _command(f"--out={out}", "--format=messages", "--dataset=shapes_sizes",
                    *(f"--{k}={v}" for k, v in SMALL.items()))
  assert result.returncode == 0, result.stderr
  sizes = set()
  for split in shapes.SPLITS:
    raw, records = src.open(config.data, split, text_only=True), _read(out, split, "messages")
    assert len(records) == src.num_elements(config.data, len(raw), train=split == "train")
    for j, rec in enumerate(records):
      r, k = src.element(config.data, len(raw), j)
      question, answer = src.texts(raw[r], k)
      assert [m["content"] for m in rec["messages"]] == [f"<image>{question}", answer]
      png = (out / rec["images"][0]).read_bytes()
      assert rec["images"] == [f"images/{split}/{r}.png"] and png == bytes(raw[r]["image"])
      sizes.add(PIL.Image.open(io.BytesIO(png)).size)
  assert len(sizes) > 5


def test_shapes_video_exports_as_videos_that_prepare_imports_and_the_native_rows_read(tmp_path):
  """--dataset=shapes_video through the command in both formats: the TFDS build's mp4s byte for byte,
  LLaVA-Video's "video" key and {"type": "video"} parts; prepare imports them and a native row reads
  each as a video (2 tubelets of the video config's patches, its video placeholders)."""
  config = copy.deepcopy(load_config("video,test", "shapes_video"))
  config.data.update(SMALL)
  config.data.data_dir = str(tmp_path / "native")
  src = data.get("shapes_video")
  for fmt in export.FORMATS:
    out = tmp_path / fmt
    result = _command(f"--out={out}", f"--format={fmt}", "--dataset=shapes_video",
                      *(f"--{k}={v}" for k, v in SMALL.items()))
    assert result.returncode == 0, result.stderr
    raw, records = src.open(config.data, "train"), _read(out, "train", fmt)
    assert len(records) == src.num_elements(config.data, len(raw), train=True)
    for j, rec in enumerate(records):
      r, k = src.element(config.data, len(raw), j)
      question, answer = src.texts(raw[r], k)
      path = f"videos/train/{r}.mp4"
      if fmt == "llava":
        assert rec["video"] == path and [t["value"] for t in rec["conversations"]] == [
            f"<image>\n{question}", answer]
      else:
        assert rec["messages"][0]["content"] == [{"type": "video", "video": path},
                                                 {"type": "text", "text": question}]
        assert "images" not in rec
      assert (out / path).read_bytes() == bytes(raw[r]["video"])
  prepared = tmp_path / "prepared"
  prepare.run(prepare.Options(inputs=(("train", str(tmp_path / "llava" / "train.json")),),
                              out=str(prepared), workers=1))
  reader = prepare.read(str(prepared), "train")
  row = native_family.rows(config, pipeline.load_tokenizer(config))
  ex = row.train(reader[0])
  assert bytes(reader[0].images[0]) == bytes(src.open(config.data, "train")[0]["video"])
  assert ex["patches"].shape[0] == 2 * 16 and ex["patch_ids"][:, 0].max() == 2  # 2 tubelets, 2 blocks
  assert (ex["text"] == row.video_id).sum() == 8  # 2 x 16 patches / merge 2 x 2


def test_caption_elements_follow_source_element():
  """caption_ratio 0.5 of 12 records: the captions of records c * 12 // 6; > 1: repeats keep ids unique."""
  convs = list(shapes_tasks.conversations("train", "qa", _cfg()))
  captions = [c for c in convs if shapes_tasks.kind(c) == "caption"]
  assert [c.id for c in captions] == [f"train/{r}/caption" for r in (0, 2, 4, 6, 8, 10)]
  items = shapes.generate(0, dict(train=12, validation=4, test=5))["train"]
  assert [c.turns[1].text for c in captions] == [shapes.caption(items[r][0]) for r in range(0, 12, 2)]
  assert all(c.turns[0].text == shapes.CAPTION_PROMPT for c in captions)
  assert not [c for c in shapes_tasks.conversations("test", "qa", _cfg()) if "caption" in c.id]
  twice = [c.id for c in shapes_tasks.conversations("train", "qa", _cfg(caption_ratio=2.0))]
  assert len(twice) == len(set(twice)) == 12 * 4 + 24 and "train/0/caption/1" in twice


@pytest.mark.parametrize("task", shapes_tasks.TASKS)
@pytest.mark.parametrize("fmt", ["llava", "messages", "parts"])
def test_records_have_the_documented_fields(task, fmt, tmp_path):
  export.export(str(tmp_path), "llava" if fmt == "llava" else "messages", task, **SMALL,
                messages_parts=fmt == "parts")
  num_images = 2 if task == "multi_image" else 1
  for split in shapes.SPLITS:
    records = _read(tmp_path, split, "llava" if fmt == "llava" else "messages")
    assert len({r["id"] for r in records}) == len(records)
    for r in records:
      assert re.fullmatch(rf"{split}/\d+/{r['kind']}(/\d+)?", r["id"])
      if fmt == "llava":
        assert set(r) == {"id", "kind", "image", "conversations"}
        paths = [r["image"]] if num_images == 1 else r["image"]
        turns = [(t["from"], t["value"]) for t in r["conversations"]]
        assert [role for role, _ in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0][1].count("<image>\n") == num_images  # where the images are, one newline each
        assert turns[0][1].startswith("<image>\n") == (num_images == 1)  # multi_image: question first
        assert "<image>" not in "".join(v for _, v in turns[1:])
      else:
        assert set(r) == {"id", "kind", "messages", "images"}
        paths = r["images"]
        roles = [m["role"] for m in r["messages"]]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        first, *rest = [m["content"] for m in r["messages"]]
        if fmt == "parts":
          assert [c for c in first if c["type"] == "image"] == [{"type": "image"}] * num_images
          assert all(set(c) == {"type", "text"} for c in first if c["type"] == "text")
          assert all(c == [{"type": "text", "text": c[0]["text"]}] for c in rest)
        else:
          assert first.count("<image>") == num_images
          assert first.startswith("<image>") == (num_images == 1)
          assert all(isinstance(c, str) and "<image>" not in c for c in rest)
      assert len(paths) == num_images and len(set(paths)) == num_images
      assert all(re.fullmatch(rf"images/{split}/\d+\.png", p) and (tmp_path / p).is_file()
                 for p in paths)


def test_multi_turn_asks_two_questions_of_a_record():
  items = shapes.generate(0, dict(train=12, validation=4, test=24))["test"]
  convs = list(shapes_tasks.conversations("test", "multi_turn", _cfg(num_test=24)))
  assert len(convs) == 24
  scored = collections.Counter()
  for r, (conv, (_, qa)) in enumerate(zip(convs, items)):
    conv.check()
    user1, answer1, user2, answer2 = conv.turns
    assert conv.image_order() == [0] and user1.parts[0].index == 0
    pairs = [(user1.text, answer1.text), (user2.text, answer2.text)]
    assert pairs[0] != pairs[1] and all(p in qa for p in pairs)
    prompt, reference = conv.until_last_answer()
    assert reference == answer2.text and len(prompt.turns) == 3  # the last answer is what is scored
    assert shapes_tasks.kind(conv) == shapes.QUESTION_KINDS[qa.index(pairs[1])]
    scored[shapes_tasks.kind(conv)] += 1
  assert set(scored.values()) == {6}  # every kind scored equally often


def _count(scene, color) -> int:
  return sum(o.color == color for o in scene.objects)


def test_multi_image_answers_are_right_and_balanced():
  sizes = dict(num_train=600, num_validation=60, num_test=126)
  data_ = shapes.generate(0, dict(train=600, validation=60, test=126))
  by_split = {s: list(shapes_tasks.conversations(s, "multi_image", _cfg(**sizes),
                                                 image=lambda split, i: (split, i)))
              for s in shapes.SPLITS}
  for split, convs in by_split.items():
    assert len(convs) == len(data_[split])
    answers, colors, per_text = collections.Counter(), collections.Counter(), collections.defaultdict(
        collections.Counter)
    for i, conv in enumerate(convs):
      conv.check()
      (user, assistant) = conv.turns
      assert conv.image_order() == [0, 1] and all(s == split for s, _ in conv.images)
      a, b = (data_[split][j][0] for _, j in conv.images)
      assert a.objects != b.objects and i in [j for _, j in conv.images]  # two scenes, one of them i
      m = re.fullmatch(r"which of the two images has more (\w+) shapes\? first:  second: ", user.text)
      color = m[1]
      assert _count(a, color) != _count(b, color)  # never a tie
      assert assistant.text == ("first" if _count(a, color) > _count(b, color) else "second")
      answers[assistant.text] += 1
      colors[color] += 1
      per_text[user.text][assistant.text] += 1
    assert abs(answers["first"] - answers["second"]) <= 1, answers
    assert max(colors.values()) - min(colors.values()) <= 1, colors
    # The text alone: the best guess per question text is right at most ~0.6 of the time.
    text_only = sum(max(c.values()) for c in per_text.values()) / len(convs)
    assert text_only <= 0.6, (split, text_only)
    for c in per_text.values():
      assert abs(c["first"] - c["second"]) <= 1
  # Deterministic from dataset_seed, another seed another task.
  again = list(shapes_tasks.conversations("test", "multi_image", _cfg(**sizes)))
  assert [c.to_json() for c in again] == [
      c.to_json() for c in shapes_tasks.conversations("test", "multi_image", _cfg(**sizes))]
  other = list(shapes_tasks.conversations("test", "multi_image", _cfg(**sizes, dataset_seed=1)))
  assert [c.to_json() for c in other] != [c.to_json() for c in again]


def test_conversations_default_to_png_bytes():
  (conv,) = list(shapes_tasks.conversations("test", "multi_image", _cfg(num_test=2)))[:1]
  assert isinstance(conv, Conversation) and all(isinstance(i, bytes) for i in conv.images)
  items = shapes.generate(0, dict(train=12, validation=4, test=2))["test"]
  assert set(conv.images) == {shapes.png_bytes(s) for s, _ in items}


def test_a_split_too_small_for_multi_image_writes_nothing(tmp_path):
  out = tmp_path / "out"
  with pytest.raises(UserError, match="cannot make a multi_image pair"):
    export.export(str(out), "llava", "multi_image", **{**SMALL, "num_test": 1})
  assert not out.exists()


@pytest.mark.parametrize("args, expected", [
    (["--format=csv"], "flag --format=csv: value should be one of <llava|messages>"),
    (["--format=llava", "--task=vqa"], "value should be one of <qa|multi_turn|multi_image>"),
    (["--format=llava", "--num_train=0"], "--num_train=0 must be a positive integer"),
    (["--format=messages", "--num_test=-3"], "--num_test=-3 must be a positive integer"),
    (["--format=llava", "--caption_ratio=-1"], "--caption_ratio=-1.0 must be a number >= 0"),
    (["--format=llava", "--out={file}"], "is a file; give a directory"),
    (["--out={dir}"], "--format is required"),
    (["--format=llava", "--dataset=shapes_big"], "--dataset=shapes_big is unknown"),
    (["--format=llava", "--dataset=shapes_sizes", "--task=multi_image"], "exports --task=qa"),
])
def test_bad_flags_are_one_line(args, expected, tmp_path):
  file = tmp_path / "a_file"
  file.write_text("kept")
  dir_ = tmp_path / "out"
  args = [a.format(file=file, dir=dir_) for a in args]
  if not any(a.startswith("--out") for a in args):
    args.append(f"--out={dir_}")
  result = _command(*args)
  assert result.returncode != 0
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"{PROG}: error: ") and expected in last, result.stderr
  assert file.read_text() == "kept" and not dir_.exists()  # nothing written

"""python -m mm_jax.data.prepare: import, read back, determinism, resume, parts, bad records, statistics.

The in-process tests run one worker (no fork of the test process); the command runs in subprocesses.
"""
import io
import json
import os
import signal
import struct
import subprocess
import sys
import time
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow_datasets as tfds

import mm_jax.data.prepare as prepare  # the module (mm_jax.data.prepare is also data's function)
from mm_jax.data import shards
from mm_jax.data import tokenizer as tokenizer_lib
from mm_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def png(seed: int = 0, size: int = 64) -> bytes:
  pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
  buf = io.BytesIO()
  Image.fromarray(pixels).save(buf, format="PNG")
  return buf.getvalue()


def bomb_png() -> bytes:
  """A valid small PNG whose IHDR says 100000x100000 (its CRC fixed): a decompression bomb."""
  data = bytearray(png(size=8))
  assert data[12:16] == b"IHDR"
  data[16:24] = struct.pack(">II", 100_000, 100_000)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
  return bytes(data)


def llava_record(i: int, image="img/{i}.png", **kw) -> dict:
  image = image.format(i=i) if isinstance(image, str) else image
  return {"id": f"ex{i}", "image": image, "conversations": [
      {"from": "human", "value": f"<image>\nquestion {i}?"}, {"from": "gpt", "value": f"answer {i}"}],
      **kw}


def write_data(root, n: int, name: str = "train.jsonl", bad: dict | None = None) -> str:
  """n LLaVA records (JSONL) under root, image i at root/img/i.png; bad: {index: record} replaces."""
  os.makedirs(root / "img", exist_ok=True)
  lines = []
  for i in range(n):
    (root / "img" / f"{i}.png").write_bytes(png(i, size=16))
    record = (bad or {}).get(i, llava_record(i))
    lines.append(record if isinstance(record, str) else json.dumps(record))
  path = root / name
  path.write_text("".join(line + "\n" for line in lines))
  return str(path)


def options(path, out, **kw) -> prepare.Options:
  inputs = kw.pop("inputs", (("train", str(path)),))
  return prepare.Options(inputs=inputs, out=str(out), workers=1, **kw)


def command(*args, timeout=120) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "mm_jax.data.prepare", *args], cwd=REPO,
                        capture_output=True, text=True, timeout=timeout,
                        env=dict(os.environ, JAX_PLATFORMS="cpu"))


def ids(out, split="train") -> list[str]:
  reader = prepare.read(str(out), split)
  return [reader[i].id for i in range(len(reader))]


def test_import_reads_back_through_tfds_and_read(tmp_path):
  path = write_data(tmp_path, 5)
  messages = tmp_path / "val.jsonl"  # another split, in the other format
  messages.write_text(json.dumps({"messages": [
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "which?"},
                                   {"type": "image", "image": "img/1.png"}]},
      {"role": "assistant", "content": "the first"}], "images": ["img/0.png"]}) + "\n")
  stats = prepare.run(options(path, tmp_path / "out", examples_per_shard=2,
                              inputs=(("train", path), ("validation", str(messages)))))
  assert stats["train"]["examples"] == 5 and stats["train"]["shards"] == 3
  assert stats["validation"] == dict(stats["validation"], examples=1, images=2, max_images=2, turns=2)
  source = tfds.builder_from_directory(str(tmp_path / "out")).as_data_source()
  record = source["train"][3]
  assert record["id"] == b"ex3"
  assert list(record["images"]) == [(tmp_path / "img" / "3.png").read_bytes()]  # stored as they are
  assert json.loads(record["conversation"])["turns"][0]["parts"] == [{"image": 0}, {"text": "question 3?"}]
  conv = prepare.read(str(tmp_path / "out"), "validation")[0]
  assert conv.images == tuple((tmp_path / "img" / f"{i}.png").read_bytes() for i in (0, 1))
  assert conv.turns[0].parts[1] == "which?" and conv.id == "validation/0"
  assert json.loads((tmp_path / "out" / "statistics.json").read_text()) == stats
  assert ids(tmp_path / "out") == [f"ex{i}" for i in range(5)]


def test_the_command_writes_the_same_shards_whatever_the_workers(tmp_path):
  path = write_data(tmp_path, 7)
  prepare.run(options(path, tmp_path / "one", examples_per_shard=2))
  result = command(f"--input=train={path}", f"--out={tmp_path / 'two'}", "--workers=2",
                   "--examples_per_shard=2")
  assert result.returncode == 0, result.stderr
  assert "train: 7 examples of 7 records (0 skipped)" in result.stdout
  assert "4/4 shards, 7 examples" in result.stderr and "examples/s" in result.stderr
  for k in range(4):
    name = shards.shard_name("train", k, 4)
    assert (tmp_path / "one" / name).read_bytes() == (tmp_path / "two" / name).read_bytes()


def test_a_rerun_skips_finished_shards_and_writes_every_example_once(tmp_path, capsys):
  bad = {5: llava_record(5, image="img/missing.png")}
  path = write_data(tmp_path, 8, bad=bad)
  out = tmp_path / "out"
  with pytest.raises(shards.BadInput, match=r"train.jsonl:6 \(train record 5\) image 'img/missing"):
    prepare.run(options(path, out, examples_per_shard=2))
  names = [shards.shard_name("train", k, 4) for k in range(4)]
  assert [os.path.exists(out / n) for n in names] == [True, True, False, False]  # kept
  assert not (out / "dataset_info.json").exists()
  assert not [f for f in os.listdir(out / shards.WORK) if ".tmp-" in f]
  (out / shards.WORK / f"{names[2]}.tmp-host-1").write_bytes(b"half")  # an interrupted writer's
  mtimes = [os.stat(out / n).st_mtime_ns for n in names[:2]]
  write_data(tmp_path, 8)  # fixed
  capsys.readouterr()
  stats = prepare.run(options(path, out, examples_per_shard=2))
  assert "2 of this part's 4 shards already written" in capsys.readouterr().err
  assert [os.stat(out / n).st_mtime_ns for n in names[:2]] == mtimes
  assert not [f for f in os.listdir(out / shards.WORK) if ".tmp-" in f]
  assert stats["train"]["examples"] == 8 and ids(out) == [f"ex{i}" for i in range(8)]
  with pytest.raises(UserError, match="holds another import .*differs in examples_per_shard"):
    prepare.run(options(path, out, examples_per_shard=3))


def test_skip_counts_and_lists_the_bad_records(tmp_path):
  bad = {1: llava_record(1, image="img/none.png"), 3: "{not json", 4: json.dumps({
      "conversations": [{"from": "human", "value": "hi"}]})}
  path = write_data(tmp_path, 6, bad=bad)
  stats = prepare.run(options(path, tmp_path / "out", examples_per_shard=4, bad_records="skip"))
  s = stats["train"]
  assert (s["records"], s["examples"], s["skipped"], s["images"], s["turns"]) == (6, 3, 3, 3, 6)
  assert [w.split(" ", 1)[0] for w in s["skipped_first"]] == [
      f"{path}:2", f"{path}:4", f"{path}:5"]
  assert "does not exist" in s["skipped_first"][0] and "not valid JSON" in s["skipped_first"][1]
  assert "no assistant turn" in s["skipped_first"][2]
  assert ids(tmp_path / "out") == ["ex0", "ex2", "ex5"]
  assert "train: 3 examples of 6 records (3 skipped)" in prepare.summary(stats)[0]


def test_token_length_percentiles_with_a_tokenizer(tmp_path):
  path = write_data(tmp_path, 6)
  tok = tokenizer_lib.train([f"question {i}? answer {i}" for i in range(50)], 40,
                            str(tmp_path / "tok.model"))
  stats = prepare.run(options(path, tmp_path / "out", tokenizer=str(tmp_path / "tok.model")))
  lengths = [len(tok.encode(f"question {i}?")) + len(tok.encode(f"answer {i}")) for i in range(6)]
  assert stats["train"]["tokens"]["max"] == max(lengths)
  assert min(lengths) <= stats["train"]["tokens"]["p50"] <= stats["train"]["tokens"]["p99"]
  assert "tokens p50" in prepare.summary(stats)[0]


def test_two_parts_share_the_output_and_the_last_writes_the_metadata(tmp_path):
  path = write_data(tmp_path, 9)
  out = tmp_path / "out"
  assert prepare.run(options(path, out, examples_per_shard=2, shard_index=0, num_shards=2)) is None
  written = sorted(f for f in os.listdir(out) if f.startswith(shards.NAME))
  assert written == [shards.shard_name("train", k, 5) for k in range(2)]  # part 0: shards 0-1
  assert not (out / "dataset_info.json").exists()
  with pytest.raises(UserError, match="3 shards are not written yet"):
    prepare.merge(str(out))
  stats = prepare.run(options(path, out, examples_per_shard=2, shard_index=1, num_shards=2))
  assert stats["train"]["examples"] == 9 and ids(out) == [f"ex{i}" for i in range(9)]
  os.remove(out / "dataset_info.json")
  assert prepare.merge(str(out)) == stats and ids(out) == [f"ex{i}" for i in range(9)]


def _bad_case(tmp_path, name):
  """(the input file, the reason expected in the error) for one kind of bad input; records 0-1 are
  good (shard 0 of 2 examples each), record 2 (line 3) is the bad one."""
  os.makedirs(tmp_path, exist_ok=True)
  outside = tmp_path / "outside.png"
  outside.write_bytes(png(1, size=16))
  root = tmp_path / "data"
  os.makedirs(root / "img", exist_ok=True)
  record, reason = None, None
  if name == "missing image":
    record, reason = llava_record(2, image="img/nope.png"), "image 'img/nope.png' does not exist"
  elif name == "unreadable image":
    (root / "img" / "junk.png").write_bytes(b"this is no png" * 10)
    record, reason = llava_record(2, image="img/junk.png"), "'img/junk.png' is not a readable image"
  elif name == "unreadable video":  # an mp4's first bytes, then no video in it
    (root / "img" / "junk.mp4").write_bytes(b"\x00\x00\x00\x18ftypisom" + b"not a video" * 10)
    record, reason = llava_record(2, image="img/junk.mp4"), "'img/junk.mp4' is not a readable video"
  elif name == "placeholder count":
    record = llava_record(2, image=["img/0.png", "img/1.png"])
    reason = "the text has 1 <image> placeholders but 'image' has 2 images"
  elif name == "unknown role":
    record = {"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}
    reason = "conversations[1].from is 'bot', an unknown role"
  elif name == "no assistant turn":
    record, reason = {"conversations": [{"from": "human", "value": "x"}]}, "no assistant turn"
  elif name == "malformed JSON":
    record, reason = '{"id": "ex2", "conversations": [', "the line is not valid JSON"
  elif name == "dotdot":
    record, reason = llava_record(2, image="../outside.png"), "'../outside.png' leaves --image_root"
  elif name == "absolute":
    record, reason = llava_record(2, image=str(outside)), "is an absolute path"
  elif name == "symlink":
    os.symlink(outside, root / "img" / "link.png")
    record, reason = llava_record(2, image="img/link.png"), "'img/link.png' is a symlink to"
  elif name == "bomb":
    (root / "img" / "bomb.png").write_bytes(bomb_png())
    record = llava_record(2, image="img/bomb.png")
    reason = "header says 100000x100000 = 10000000000 pixels, more than --max_image_pixels=50000000"
  path = write_data(root, 4, bad={2: record})
  return path, reason


BAD_CASES = ("missing image", "unreadable image", "unreadable video", "placeholder count", "unknown role",
             "no assistant turn", "malformed JSON", "dotdot", "absolute", "symlink", "bomb")


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_records_stop_with_file_line_and_reason(tmp_path, name):
  path, reason = _bad_case(tmp_path, name)
  with pytest.raises(shards.BadInput) as e:
    prepare.run(options(path, tmp_path / "out", examples_per_shard=2))
  assert str(e.value).startswith(f"{path}:3 (train record 2) ") and reason in str(e.value)
  assert str(e.value).endswith("or set --bad_records=skip to leave bad records out")
  assert "\n" not in str(e.value)
  assert (tmp_path / "out" / shards.shard_name("train", 0, 2)).exists()


def test_outside_paths_are_read_with_allow_outside_root(tmp_path):
  for name in ("dotdot", "absolute", "symlink"):
    path, _ = _bad_case(tmp_path / name, name)
    stats = prepare.run(options(path, tmp_path / name / "out", allow_outside_root=True))
    assert stats["train"]["examples"] == 4
  path, _ = _bad_case(tmp_path / "bomb", "bomb")  # under a higher limit: its structure is sound
  stats = prepare.run(options(path, tmp_path / "bomb" / "out", max_image_pixels=10 ** 11))
  assert stats["train"]["examples"] == 4


def test_bad_flags_and_inputs(tmp_path):
  (tmp_path / "empty.jsonl").write_text("")
  cases = [(dict(out=""), "--out is required"), (dict(inputs=()), "--input is required"),
           (dict(examples_per_shard=0), "--examples_per_shard=0 must be at least 1"),
           (dict(shard_index=2, num_shards=2), "--shard_index=2 must be in"),
           (dict(bad_records="drop"), "--bad_records=drop is unknown"),
           (dict(format="csv"), "--format=csv is unknown"),
           (dict(image_root=str(tmp_path / "nowhere")), "is not a directory"),
           (dict(inputs=(("train", str(tmp_path / "nope.jsonl")),)), "no such file"),
           (dict(tokenizer=str(tmp_path / "tok.model")), "--tokenizer: tokenizer .* does not exist"),
           (dict(tokenizer=str(tmp_path / "empty.jsonl")), "--tokenizer=.* cannot be loaded"),
           (dict(inputs=(("train", str(tmp_path / "empty.jsonl")),)), "empty.jsonl:1 has no records")]
  for kw, message in cases:
    kw = dict(dict(out=str(tmp_path / "out"), inputs=(("train", str(tmp_path / "empty.jsonl")),)), **kw)
    with pytest.raises(UserError, match=message):
      prepare.run(prepare.Options(workers=1, **kw))
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
@pytest.mark.parametrize("name", BAD_CASES + ("empty file",))
def test_the_command_stops_at_a_bad_record_with_one_line(tmp_path, name):
  if name == "empty file":
    (tmp_path / "empty.jsonl").write_text("\n")
    path, reason, where = str(tmp_path / "empty.jsonl"), "has no records", f"{tmp_path}/empty.jsonl:1"
  else:
    path, reason = _bad_case(tmp_path, name)
    where = f"{path}:3 (train record 2)"
  result = command(f"--input={path}", f"--out={tmp_path / 'out'}", "--examples_per_shard=2",
                   "--workers=1")
  assert result.returncode == 1
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"mm_jax.data.prepare: error: {where}") and reason in last, last
  if name != "empty file":
    assert (tmp_path / "out" / shards.shard_name("train", 0, 2)).exists()
    assert not (tmp_path / "out" / shards.shard_name("train", 1, 2)).exists()


@pytest.mark.slow
def test_the_command_in_two_parts_then_merge(tmp_path):
  path = write_data(tmp_path, 5)
  out = tmp_path / "out"
  results = {part: command(f"--input={path}", f"--out={out}", "--examples_per_shard=2",
                           "--num_shards=2", f"--shard_index={part}", "--workers=1") for part in (1, 0)}
  assert [r.returncode for r in results.values()] == [0, 0], results[1].stderr + results[0].stderr
  assert "part 1 of 2 done; 1 shards of the other parts are not written yet" in results[1].stderr
  assert "train: 5 examples of 5 records" in results[0].stdout  # the last to finish: the metadata
  os.remove(out / "dataset_info.json")
  result = command(f"--merge={out}")
  assert result.returncode == 0, result.stderr
  assert "train: 5 examples of 5 records (0 skipped)" in result.stdout
  assert ids(out) == [f"ex{i}" for i in range(5)]
  result = command(f"--merge={tmp_path}")
  assert result.returncode == 1 and "holds no import" in result.stderr.splitlines()[-1]


@pytest.mark.slow
def test_the_command_skips_and_counts_every_kind_of_bad_record(tmp_path):
  lines, good = [], 0
  for k, name in enumerate(BAD_CASES):
    path, _ = _bad_case(tmp_path / str(k), name)
    with open(path) as f:
      records = f.read().splitlines()
    if name == "symlink":  # under all.jsonl's directory, the root here, its target is inside
      continue
    lines += [r.replace('"img/', f'"{k}/data/img/') for r in records]
    good += 3
  (tmp_path / "all.jsonl").write_text("\n".join(lines) + "\n")
  result = command(f"--input={tmp_path / 'all.jsonl'}", f"--out={tmp_path / 'out'}",
                   "--bad_records=skip", "--examples_per_shard=5")
  assert result.returncode == 0, result.stderr
  stats = json.loads((tmp_path / "out" / "statistics.json").read_text())["train"]
  assert (stats["examples"], stats["skipped"]) == (good, len(lines) - good)
  assert f"({len(lines) - good} skipped)" in result.stdout and "  skipped " in result.stdout


@pytest.mark.slow
def test_kill_9_then_rerun_imports_every_example_once(tmp_path):
  n, distinct = 20_000, 64
  os.makedirs(tmp_path / "img")
  images = [png(i) for i in range(distinct)]  # 64 px
  with open(tmp_path / "train.jsonl", "w") as f:
    for i in range(n):
      (tmp_path / "img" / f"{i}.png").write_bytes(images[i % distinct])
      f.write(json.dumps(llava_record(i)) + "\n")
  out = tmp_path / "out"
  args = [sys.executable, "-m", "mm_jax.data.prepare", f"--input={tmp_path / 'train.jsonl'}",
          f"--out={out}", "--examples_per_shard=500"]
  proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                          start_new_session=True)  # its own process group: the workers die with it
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.isdir(out) and sum(f.startswith(shards.NAME) for f in os.listdir(out)) >= 4:
      break
    time.sleep(0.05)
  assert proc.poll() is None, "the import finished before it could be killed"
  os.killpg(proc.pid, signal.SIGKILL)
  proc.wait()
  written = [f for f in os.listdir(out) if f.startswith(shards.NAME)]
  assert 4 <= len(written) < 40 and not (out / "dataset_info.json").exists()
  mtimes = {f: os.stat(out / f).st_mtime_ns for f in written}
  result = command(f"--input={tmp_path / 'train.jsonl'}", f"--out={out}", "--examples_per_shard=500",
                   timeout=300)
  assert result.returncode == 0, result.stderr
  assert f"{len(written)} of this part's 40 shards already written" in result.stderr
  assert {f: os.stat(out / f).st_mtime_ns for f in written} == mtimes  # not redone
  got = ids(out)
  assert len(got) == n and sorted(got) == sorted(f"ex{i}" for i in range(n))
  assert not [f for f in os.listdir(out / shards.WORK) if ".tmp-" in f]

"""The native family's data path (data/native_rows.py) on the varied-size shapes_sizes data: each image
at its own size, its placeholders and M-RoPE positions, batches padded to patch buckets, one compiled
train step per bucket; Pixtral's row breaks as an option; and its bad inputs through the real command (one
line, exit 1, workdir as it was)."""
import copy
import hashlib
import json
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, command_env, load_config, make_run
from mm_jax import data
from mm_jax.data import native_images, pipeline
from mm_jax.train import sharding
from mm_jax.errors import UserError

CONFIG = f"{REPO}/configs/shapes_native.py:native,test"


@pytest.fixture(scope="module")
def native_config(tmp_path_factory):
  config = load_config("native,test", "shapes_native")
  config.data.data_dir = str(tmp_path_factory.mktemp("sizes_data"))
  pipeline.open_source(config, "train")  # builds the data and its tokenizer
  return config


def test_rows_keep_each_image_at_its_size(native_config):
  tok, src = data.open_split(native_config, "train")
  row = pipeline.row_layout(native_config, tok)
  assert row.buckets == (64, 80, 100) and row.length == native_config.data.text_len + 25
  source = data.get("shapes_sizes")
  examples, sizes = [], set()
  for r in range(6):
    record = src[r]
    ex = row.train(source.conversation(record, 0))
    h, w = record["image"].shape[:2]
    sizes.add((h, w))
    gh, gw = (x // 16 for x in native_images.smart_resize(h, w, row.still))
    assert len(ex["patches"]) == gh * gw and ex["patches"].shape[1] == 3 * 16 * 16
    assert int((ex["text"] == 0).sum()) == gh * gw // 4  # one placeholder per merged token
    assert ex["positions"].shape == (len(ex["text"]), 3)
    assert ex["patch_ids"][:, 0].tolist() == [1] * (gh * gw)
    examples.append(ex)
  assert len(sizes) > 3  # the images really differ in size
  batch = row.collate(examples[:2])
  want = row.bucket(max(len(e["patches"]) for e in examples[:2]))
  assert batch["patches"].shape == (2, want, 768) and batch["text"].shape == (2, row.length)
  assert batch["positions"].shape == (2, row.length, 3)


def test_row_breaks_end_each_row_of_tokens_and_the_image(native_config):
  """family_options.native.row_break_ids (Pixtral's layout): a break after each row of merged tokens,
  the image end last, ordinary text tokens between the placeholders; M-RoPE puts each at the column
  after its row; the row length has room for them; a train step runs on such a batch."""
  config = copy.deepcopy(native_config)
  brk, end = 5, 6
  config.model.family_options = {"native": {"row_break_ids": (brk, end)}}
  tok, src = data.open_split(config, "train")
  row = pipeline.row_layout(config, tok)
  assert row.length == config.data.text_len + 2 * 25
  record = src[0]
  ex = row.train(data.get("shapes_sizes").conversation(record, 0))
  gh, gw = (x // 32 for x in native_images.smart_resize(*record["image"].shape[:2], row.still))
  start = int(np.argmax(ex["text"] == 0))
  image = ex["text"][start:start + gh * (gw + 1)].tolist()
  assert image == native_images.image_tokens((1, gh * 2, gw * 2), 2, 0, (brk, end))
  assert image.count(0) == gh * gw and image.count(brk) == gh - 1 and image[-1] == end
  pos = ex["positions"][start:start + gh * (gw + 1)] - ex["positions"][start]
  assert pos[gw].tolist() == [0, 0, gw] and pos[-1].tolist() == [0, gh - 1, gw]
  after = ex["positions"][start + gh * (gw + 1)] - ex["positions"][start]
  assert after.tolist() == [max(gh, gw + 1)] * 3
  config.global_batch_size = 2
  mm, tx = make_run(config, jax.devices()[:1], tok.vocab_size)
  batch = row.collate([ex, row.train(data.get("shapes_sizes").conversation(src[1], 0))])
  _, metrics = mm.make_train_step(tx)(mm.init_train_state(tx, seed=0), sharding.to_global(batch, mm.mesh))
  assert np.isfinite(float(metrics["loss"]))


def test_batches_take_the_smallest_bucket_that_holds_them(native_config):
  config = copy.deepcopy(native_config)
  config.global_batch_size = 1
  tok, src = data.open_split(config, "train")
  it = data.train_iterator(config, tok, src, process_index=0, process_count=1)
  seen = {next(it)["patches"].shape[1] for _ in range(24)}
  assert seen <= {64, 80, 100} and len(seen) > 1


def _run(args, timeout=600, devices=8):
  env = command_env(devices)
  return subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=env, capture_output=True, text=True,
                        timeout=timeout)


@pytest.mark.slow  # a real run, then its eval
def test_a_run_compiles_one_train_step_per_bucket_and_evaluates(native_config, tmp_path):
  work = tmp_path / "run"
  r = _run(["mm_jax.train", f"--config={CONFIG}", f"--workdir={work}",
            f"--config.data.data_dir={native_config.data.data_dir}", "--config.global_batch_size=1",
            "--config.total_steps=12", "--config.log_every=6", "--config.checkpoint_every=12",
            "--config.eval.batch_size=1"], devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  last = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
  assert 1 < last["train_programs"] <= 3, last
  r = _run(["mm_jax.eval", f"--config={CONFIG}", f"--workdir={work}",
            f"--config.data.data_dir={native_config.data.data_dir}", "--config.eval.batch_size=4"],
           devices=1)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "vqa_exact_match" in r.stdout


def _snapshot(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*"))}


@pytest.mark.slow  # each case through its command
@pytest.mark.parametrize("flags, expected", [
    (("--config.data.native.patch_buckets=(48,)",), "patch_buckets cannot hold the largest image"),
    (("--config.data.native.min_side=150",), "a side under data.native.min_side=150"),
    (("--config.model.family_options={'native': {'row_break_ids': (5,)}}",), "row_break_ids=(5,): give two"),
])
def test_bad_native_inputs_one_line_nothing_written(native_config, tmp_path, flags, expected):
  work = tmp_path / "work"
  work.mkdir()
  (work / "notes.txt").write_text("mine")
  before = _snapshot(work)
  r = _run(["mm_jax.train", f"--config={CONFIG}", f"--workdir={work}",
            f"--config.data.data_dir={native_config.data.data_dir}", *flags])
  assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith("mm_jax.train: error: ") and expected in line, r.stderr[-2000:]
  assert _snapshot(work) == before


def test_a_video_with_fewer_frames_than_asked_is_named(native_config):
  config = copy.deepcopy(native_config)
  config.data.native.video_frames = 10
  from mm_jax.data import native_rows  # pylint: disable=g-import-not-at-top
  row = native_rows.NativeRow(config, None, (0,))
  frames = np.zeros((6, 64, 96, 3), np.uint8)
  with pytest.raises(UserError, match="the video has 6 frames but 10 were asked"):
    row._media(frames)  # pylint: disable=protected-access
  config.data.native.video_frames = 4
  row = native_rows.NativeRow(config, None, (0,))
  patches, grid, moving = row._media(frames)  # pylint: disable=protected-access
  assert moving and grid[0] == 4 and len(patches) == np.prod(grid)

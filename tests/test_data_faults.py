"""Data faults (data.bad_records): records of the real on-disk dataset are corrupted in a copy (garbled
PNG bytes, a missing field, a wrong image shape, a short questions list, a truncated proto, flipped
bytes in the array_record file, text longer than data.text_len). "fail" stops with one line naming the
split, record index, field, reason and fix (also from grain's threads and through the CLI); "skip"
keeps batches whole, counts the bad elements in the metrics, and stays deterministic and resumable."""
import copy
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys

import chex
import grain
import numpy as np
from PIL import Image
import pytest
from array_record.python import array_record_module
from tensorflow_datasets.proto import tf_example_pb2

from conftest import REPO, command_env
from mm_jax.data import captions, pipeline, records, shapes
from mm_jax.errors import UserError

pytestmark = pytest.mark.slow  # end to end through the commands

QA = shapes.SOURCE.num_questions


def _split_file(data_dir, split):
  return next(pathlib.Path(data_dir).glob(f"shapes/*/1.0.0/shapes-{split}.array_record-*"))


def _rewrite(path, edits):
  """Rewrites an array_record file (tfds's writer options) with edits {index: fn(Example) -> bytes}."""
  reader = array_record_module.ArrayRecordReader(str(path))
  raws = reader.read_all()
  reader.close()
  writer = array_record_module.ArrayRecordWriter(str(path), "group_size:1")
  for i, raw in enumerate(raws):
    writer.write(edits[i](tf_example_pb2.Example.FromString(raw)) if i in edits else raw)
  writer.close()


def _garble_png(ex):
  png = bytearray(ex.features.feature["image"].bytes_list.value[0])
  png[30:90] = bytes(60)  # header chunk and start of the data: PIL cannot identify it
  ex.features.feature["image"].bytes_list.value[0] = bytes(png)
  return ex.SerializeToString()


def _drop_caption(ex):
  del ex.features.feature["caption"]
  return ex.SerializeToString()


def _small_image(ex):
  buf = io.BytesIO()
  Image.new("RGB", (32, 48), (200, 0, 0)).save(buf, format="PNG")
  ex.features.feature["image"].bytes_list.value[0] = buf.getvalue()
  return ex.SerializeToString()


def _three_questions(ex):
  del ex.features.feature["questions"].bytes_list.value[3]
  return ex.SerializeToString()


def _truncate(ex):
  return ex.SerializeToString()[:100]


FAULTS = {  # how -> (field, reason pattern)
    _garble_png: ("field 'image'", "cannot be decoded"),
    _drop_caption: ("field 'caption'", "is missing"),
    _small_image: ("field 'image'", r"is uint8 \(48, 32, 3\) but the dataset declares uint8 \(64, 64, 3\)"),
    _three_questions: ("field 'questions'", "cannot be parsed"),
    _truncate: ("", "is not a readable tf.train.Example"),
}


@pytest.fixture(scope="module")
def bad(test_config, tmp_path_factory):
  """(config, {record: fault}) over a copy of the test data with 5 train and 1 validation record bad.

  The first bad train element is drawn at step 3 (global batch 2), none in steps 1-2.
  """
  config = copy.deepcopy(test_config)
  config.data.data_dir = str(tmp_path_factory.mktemp("bad") / "data")
  shutil.copytree(test_config.data.data_dir, config.data.data_dir)
  n = 64 * QA
  ids = grain.MapDataset.range(n).shuffle(seed=config.seed).repeat(None)
  early = {ids[k] // QA for k in range(16)}
  third = [ids[k] // QA for k in range(16, 24) if ids[k] // QA not in early]
  later = [r for r in range(64) if r not in early and r != third[0]]
  chosen = dict(zip([third[0]] + later[:4], FAULTS))
  _rewrite(_split_file(config.data.data_dir, "train"), chosen)
  _rewrite(_split_file(config.data.data_dir, "validation"), {5: _garble_png})
  return config, chosen


def _skip(config):
  config = copy.deepcopy(config)
  config.data.bad_records = "skip"
  return config


def _it(config, tokenizer, source):
  return pipeline.train_iterator(config, tokenizer, source, process_index=0, process_count=1)


def test_each_fault_names_split_index_field_reason_and_fix(bad):
  config, chosen = bad
  source = pipeline.open_source(config, "train")
  version_dir = str(_split_file(config.data.data_dir, "train").parent)
  for r, fault in chosen.items():
    field, reason = FAULTS[fault]
    with pytest.raises(records.BadRecord, match=f"^train record {r} {field}.*{reason}") as e:
      source[r]
    msg = str(e.value)
    assert "\n" not in msg and f"delete {version_dir} to regenerate it" in msg
    assert msg.endswith("or set --config.data.bad_records=skip to skip bad records")
  good = next(r for r in range(64) if r not in chosen)
  assert source[good]["image"].shape == (64, 64, 3)


def test_unknown_policy_is_a_user_error(bad):
  config = copy.deepcopy(bad[0])
  config.data.bad_records = "ignore"
  with pytest.raises(UserError, match="--config.data.bad_records to one of fail, skip"):
    pipeline.open_source(config, "train")


def test_fail_surfaces_from_the_grain_threads_at_its_step(bad, tokenizer):
  config, chosen = bad
  first = next(iter(chosen))
  it = _it(config, tokenizer, pipeline.open_source(config, "train"))
  next(it), next(it)  # steps 1-2 read only good records
  with pytest.raises(records.BadRecord, match=f"^train record {first} field 'image' cannot be decoded"):
    next(it)


def test_skip_replaces_bad_elements_deterministically(bad, tokenizer, test_config):
  config = _skip(bad[0])
  source = pipeline.open_source(config, "train")
  per_epoch = 64 * QA // 8
  batches = [next(it) for it in [_it(config, tokenizer, source)] for _ in range(per_epoch + 3)]
  # The clean data's batches: every row not replaced is the same element, array for array.
  clean = _it(_skip(test_config), tokenizer, pipeline.open_source(_skip(test_config), "train"))
  for batch, want in zip(batches, [next(clean) for _ in range(per_epoch)]):
    assert batch["image"].shape == (8, 1, 32, 32, 3) and batch["skipped"].dtype == np.int32
    kept = batch["skipped"] == 0
    for k in ("image", "text", "mask_ar", "mask_loss", "mask_input"):
      np.testing.assert_array_equal(batch[k][kept], want[k][kept])
    assert (want["skipped"] == 0).all()
  assert sum(int(b["skipped"].sum()) for b in batches[:per_epoch]) == QA * len(bad[1])
  assert batches[0]["skipped"].sum() == batches[1]["skipped"].sum() == 0
  assert batches[2]["skipped"].sum() > 0
  # Same batches again, and after a resume from a saved state.
  again = _it(config, tokenizer, source)
  chex.assert_trees_all_equal([next(again) for _ in range(3)], batches[:3])
  resumed = _it(config, tokenizer, source)
  resumed.set_state(again.get_state())
  chex.assert_trees_all_equal([next(resumed) for _ in range(per_epoch)], batches[3:per_epoch + 3])


def test_flipped_bytes_in_the_file_name_the_record(test_config, tokenizer, tmp_path):
  config = copy.deepcopy(test_config)
  config.data.data_dir = str(tmp_path / "data")
  shutil.copytree(test_config.data.data_dir, config.data.data_dir)
  path = _split_file(config.data.data_dir, "train")
  data = bytearray(path.read_bytes())
  data[20000:20016] = bytes(b ^ 0xFF for b in data[20000:20016])  # inside one record's chunk
  path.write_bytes(bytes(data))
  source = pipeline.open_source(config, "train")
  failing = []
  for r in range(len(source)):
    try:
      source[r]
    except records.BadRecord as e:
      failing.append(r)
      assert e.field == "record" and "cannot be read (RuntimeError: Corrupted Riegeli" in str(e)
  assert len(failing) == 1
  it = _it(_skip(config), tokenizer, pipeline.open_source(_skip(config), "train"))
  assert sum(int(next(it)["skipped"].sum()) for _ in range(64 * QA // 8)) == QA


def _needed(tokenizer, source):
  """Tokens each training element needs (bos, question, answer, eos), by element id."""
  out = []
  for r in range(len(source)):
    rec = source[r]
    for q, a in zip(rec["questions"], rec["answers"]):
      out.append(2 + len(tokenizer.encode(q.decode())) + len(tokenizer.encode(a.decode())))
  return np.array(out)


def test_text_longer_than_text_len_follows_the_policy(test_config, tokenizer, train_source):
  needed = _needed(tokenizer, train_source)
  text_len = int(np.sort(needed)[-20]) - 1  # at least 20 elements too long, most fine
  config = copy.deepcopy(test_config)
  config.data.text_len = text_len
  with pytest.raises(records.BadRecord, match=rf"^train record \d+ field 'questions\[\d\]' needs \d+ text "
                     rf"tokens but --config.data.text_len allows {text_len}; set --config.data.text_len "
                     "to at least"):
    it = _it(config, tokenizer, train_source)
    for _ in range(64 * QA // 8):
      next(it)
  config = _skip(config)
  it = _it(config, tokenizer, train_source)
  skipped = sum(int(next(it)["skipped"].sum()) for _ in range(64 * QA // 8))
  assert skipped == (needed > text_len).sum() > 0
  prefix_needed = sum(1 + len(tokenizer.encode(q.decode())) > text_len
                      for r in range(len(train_source)) for q in train_source[r]["questions"])
  ev = list(pipeline.eval_batches(config, tokenizer, train_source, process_index=0, process_count=1))
  assert sum(int(b["skipped"].sum()) for b in ev) == prefix_needed
  assert sum(int(b["valid"].sum()) for b in ev) == 64 * QA - prefix_needed
  config.data.text_len = 3  # nothing fits: skipping would never end
  with pytest.raises(UserError, match="elements in a row are bad under data.bad_records=skip"):
    next(_it(config, tokenizer, train_source))


def test_eval_follows_the_policy(bad, tokenizer):
  config = bad[0]
  source = pipeline.open_source(config, "validation")
  with pytest.raises(records.BadRecord, match="^validation record 5 field 'image'"):
    list(pipeline.eval_batches(config, tokenizer, source, process_index=0, process_count=1))
  with pytest.raises(records.BadRecord, match="^validation record 5"):
    captions.captions(config, source)
  config = _skip(config)
  source = pipeline.open_source(config, "validation")
  ev = list(pipeline.eval_batches(config, tokenizer, source, process_index=0, process_count=1))
  skipped = np.concatenate([b["skipped"] for b in ev])
  assert np.flatnonzero(skipped).tolist() == [5 * QA + k for k in range(QA)]
  assert not np.concatenate([b["valid"] for b in ev])[skipped].any()
  assert [i for i, c in enumerate(captions.captions(config, source)) if c is None] == [5]
  cap = list(captions.eval_batches(config, tokenizer, source, list(range(16)), process_index=0,
                                   process_count=1))
  index = np.concatenate([b["index"] for b in cap])
  assert index[5] == -1 and np.concatenate([b["skipped"] for b in cap]).tolist() == [
      i == 5 for i in range(16)]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
  """A persistent compilation cache shared by this file's runs: each compiles once, not thrice."""
  return tmp_path_factory.mktemp("jax_cache")


def _train(workdir, data_dir, cache, *overrides):
  env = command_env(JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1")
  return subprocess.run([sys.executable, "-m", "mm_jax.train", f"--config={REPO}/configs/shapes_tiny.py:test",
                         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *overrides],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)


def _metrics(workdir):
  lines = (workdir / "metrics.jsonl").read_text().splitlines()
  timed = ("steps_per_sec", "tokens_per_s", "mfu")  # depend on the clock, not on the run
  return [{k: v for k, v in json.loads(l).items() if k not in timed} for l in lines]


@pytest.fixture(scope="module")
def skip_run(bad, jax_cache, tmp_path_factory):
  """The metrics of a 4-step CLI run on the damaged copy under skip."""
  workdir = tmp_path_factory.mktemp("skip_run")
  r = _train(workdir, bad[0].data.data_dir, jax_cache, "--config.data.bad_records=skip")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"skipping train record {next(iter(bad[1]))} field 'image'" in r.stderr
  return _metrics(workdir)


def test_train_skip_counts_in_metrics_and_repeats_exactly(bad, tokenizer, skip_run, jax_cache, tmp_path):
  config = _skip(bad[0])
  it = _it(config, tokenizer, pipeline.open_source(config, "train"))
  skipped = [int(next(it)["skipped"].sum()) for _ in range(4)]
  assert [(m["step"], m["data_skipped"]) for m in skip_run] == [
      (2, skipped[0] + skipped[1]), (4, skipped[2] + skipped[3])]
  assert skip_run[1]["data_skipped"] > 0  # steps 3-4 hold the first bad element
  r = _train(tmp_path, config.data.data_dir, jax_cache, "--config.data.bad_records=skip")
  assert r.returncode == 0, r.stderr[-3000:]
  assert _metrics(tmp_path) == skip_run  # losses included: the same replacements, bitwise


def test_cli_fail_is_one_line_saves_nothing_after_the_fault_and_resumes(bad, skip_run, jax_cache,
                                                                        tmp_path):
  config, chosen = bad
  r = _train(tmp_path, config.data.data_dir, jax_cache)
  assert r.returncode == 1, r.stderr[-3000:]
  assert "Traceback" not in r.stderr and "W1" not in r.stderr, r.stderr  # no tfds noise either
  line = r.stderr.strip().splitlines()
  assert len(line) == 1 and line[0].startswith(
      f"mm_jax.train: error: train record {next(iter(chosen))} field 'image' cannot be decoded"), line
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["2"]  # step 2 complete, nothing after it
  assert [m["step"] for m in _metrics(tmp_path)] == [2]
  # The fix the line names: the same command with skip resumes at step 2, as if it never stopped.
  r = _train(tmp_path, config.data.data_dir, jax_cache, "--config.data.bad_records=skip")
  assert r.returncode == 0 and "Resuming from the checkpoint at step 2" in r.stdout, r.stderr[-3000:]
  assert _metrics(tmp_path)[-1] == skip_run[-1]

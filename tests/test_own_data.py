"""Shapes through the general path: exported as LLaVA JSON and as messages JSONL, imported, and read by
the conversations source, the pipeline gives bitwise the native path's batches."""
import copy
import subprocess
import sys

import numpy as np
import pytest

from mm_jax import data
from mm_jax.config import files
from mm_jax.data import pipeline, prepare

EXT = {"llava": "json", "messages": "jsonl"}


def _export_and_prepare(config, tmp, fmt: str) -> str:
  d, out = config.data, str(tmp / f"prepared_{fmt}")
  sizes = [f"--num_train={d.num_train}", f"--num_validation={d.num_validation}",
           f"--num_test={d.num_test}", f"--dataset_seed={d.dataset_seed}",
           f"--caption_ratio={d.caption_ratio}"]
  export = str(tmp / f"export_{fmt}")
  for cmd in (["mm_jax.data.export", f"--out={export}", f"--format={fmt}", *sizes],
              ["mm_jax.data.prepare", *(f"--input={s}={export}/{s}.{EXT[fmt]}"
                                        for s in ("train", "validation", "test")),
               f"--out={out}", "--workers=1"]):
    subprocess.run([sys.executable, "-m", *cmd], check=True, capture_output=True, cwd=files.REPO)
  return out


@pytest.fixture(scope="module")
def prepared(test_config, tmp_path_factory):
  tmp = tmp_path_factory.mktemp("own")
  return {fmt: _export_and_prepare(test_config, tmp, fmt) for fmt in EXT}


def _imported(test_config, path: str):
  c = copy.deepcopy(test_config)
  c.data.update(name="conversations", path=path, tokenizer=data.get("shapes").tokenizer(test_config.data))
  return c


def test_both_formats_import_to_the_same_records(prepared):
  for split in ("train", "test"):
    a, b = prepare.read(prepared["llava"], split), prepare.read(prepared["messages"], split)
    assert len(a) == len(b) > 0
    for i in range(len(a)):
      assert a[i] == b[i], (split, i)


def test_imported_batches_equal_the_native_ones(test_config, tokenizer, prepared):
  native = pipeline.train_iterator(test_config, tokenizer, data.open_split(test_config, "train")[1],
                                   process_index=0, process_count=1)
  c = _imported(test_config, prepared["llava"])  # messages: the same records (the test above)
  tok, source = data.open_split(c, "train")
  assert tok.vocab_size == tokenizer.vocab_size
  it = pipeline.train_iterator(c, tok, source, process_index=0, process_count=1)
  for _ in range(3):
    want, got = next(native), next(it)
    assert set(got) == set(want)
    for k in want:
      np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_imported_eval_prompts_equal_the_native_ones(test_config, tokenizer, prepared):
  native = next(pipeline.eval_batches(test_config, tokenizer, data.open_split(test_config, "test")[1],
                                      process_index=0, process_count=1))
  c = _imported(test_config, prepared["llava"])
  tok, source = data.open_split(c, "test")
  got = next(pipeline.eval_batches(c, tok, source, process_index=0, process_count=1))
  for k in ("image", "image_pos", "text", "mask_input", "prefix_len", "valid"):
    np.testing.assert_array_equal(got[k], native[k], err_msg=k)
  assert got["question"] == native["question"] and got["answer"] == native["answer"]
  assert got["kind"] == native["kind"] and got["id"] == native["id"]


# --- bad conversations through the real train command ---

def _write_messages(tmp, lengths: list[int]) -> str:
  """A messages JSONL, one PNG per conversation; conversation i's answer has lengths[i] words."""
  import json  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  (tmp / "images").mkdir()
  with open(tmp / "train.jsonl", "w") as f:
    for i, n in enumerate(lengths):
      Image.new("RGB", (32, 32), (10 * i, 0, 0)).save(tmp / "images" / f"{i}.png")
      f.write(json.dumps({"id": f"c{i}", "images": [f"images/{i}.png"], "messages": [
          {"role": "user", "content": "<image>what is there?"},
          {"role": "assistant", "content": " ".join(["red circle"] * n)}]}) + "\n")
  return str(tmp / "train.jsonl")


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["fail", "skip"])
def test_a_conversation_over_the_budget_follows_the_policy(test_config, tmp_path, policy):
  path = _write_messages(tmp_path, [1, 1, 40, 1, 1, 1, 1, 1])  # record 2: far over text_len
  out = str(tmp_path / "prepared")
  subprocess.run([sys.executable, "-m", "mm_jax.data.prepare", f"--input=train={path}", f"--out={out}",
                  "--workers=1"], check=True, capture_output=True, cwd=files.REPO)
  tok = data.get("shapes").tokenizer(test_config.data)
  run = subprocess.run(
      [sys.executable, "-m", "mm_jax.train", f"--config={files.REPO}/configs/shapes_tiny.py:test",
       f"--workdir={tmp_path / 'w'}", "--config.data.name=conversations", f"--config.data.path={out}",
       f"--config.data.tokenizer={tok}", f"--config.data.bad_records={policy}", "--config.total_steps=2",
       "--config.global_batch_size=8", "--config.log_every=1", "--config.checkpoint_every=2"],
      capture_output=True, text=True, cwd=files.REPO)
  if policy == "fail":
    assert run.returncode != 0
    last = run.stderr.strip().splitlines()[-1]
    assert "train record 2" in last and "text_len" in last and "bad_records=skip" in last, last
    assert not (tmp_path / "w" / "checkpoints").exists() or not any((tmp_path / "w" / "checkpoints").iterdir())
  else:
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = (tmp_path / "w" / "metrics.jsonl").read_text()
    assert '"data_skipped": 1' in metrics or '"data_skipped": 2' in metrics, metrics

"""README's "fine-tune an imported model on your own JSONL", end to end through the real commands: a tiny
random PaliGemma saved the Hugging Face way (its tokenizer.model a SentencePiece model with <image>),
`python -m mm_jax.convert`, a hand-written messages JSONL (PNG files, two-image and multi-turn
conversations) through `python -m mm_jax.data.prepare`, then `python -m mm_jax.train` and
`python -m mm_jax.eval` with the README's flags (only the sizes made small)."""
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import sentencepiece as spm
import transformers
from PIL import Image

import hf_tiny
from conftest import REPO
from mm_jax.convert import writer

pytestmark = pytest.mark.slow  # end to end through the commands

COLORS = {"red": (220, 20, 20), "green": (20, 200, 40), "blue": (30, 40, 210), "yellow": (230, 220, 30)}
TEXT_LEN = 32
EXTRA = ("the quick brown fox jumps over a lazy dog while five wizards box and quack; square circle "
         "triangle left right top bottom small large many few one two three four")


def _tokenizer(path, sentences) -> spm.SentencePieceProcessor:
  """A SentencePiece model over the data's text, <image> a user-defined piece (PaliGemma's layout)."""
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_prefix=str(path.with_suffix("")), model_type="bpe",
      vocab_size=160, hard_vocab_limit=False, character_coverage=1.0, user_defined_symbols=["<image>"],
      pad_id=0, unk_id=1, bos_id=2, eos_id=3, num_threads=1, minloglevel=2)
  return spm.SentencePieceProcessor(model_file=str(path))


def _conversations(tmp) -> dict[str, list[dict]]:
  """16 train and 4 test messages records, their PNGs in tmp/images: one image, two, and multi-turn."""
  (tmp / "images").mkdir()
  names = list(COLORS)

  def png(i, color):
    name = f"{i}.png"  # relative to --image_root=mine/images, as in the README
    Image.new("RGB", (24 + 4 * (i % 5), 32), COLORS[color]).save(tmp / "images" / name)  # siglip resizes
    return name

  records = []
  for i in range(20):
    a, b = names[i % 4], names[(i * 3 + 1) % 4]
    if i % 4 == 1:  # two images
      same = "yes" if a == b else "no"
      records.append({"id": f"c{i}/pair", "images": [png(2 * i, a), png(2 * i + 1, b)], "messages": [
          {"role": "user", "content": "<image><image>are they the same color?"},
          {"role": "assistant", "content": same}]})
    elif i % 4 == 2:  # multi-turn, list content
      records.append({"id": f"c{i}/chat", "images": [png(2 * i, a)], "messages": [
          {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is it?"}]},
          {"role": "assistant", "content": [{"type": "text", "text": a}]},
          {"role": "user", "content": "is it red?"},
          {"role": "assistant", "content": "yes" if a == "red" else "no"}]})
    else:
      records.append({"id": f"c{i}/color", "images": [png(2 * i, a)], "messages": [
          {"role": "user", "content": "<image>what color is it?"},
          {"role": "assistant", "content": a}]})
  return {"train": records[:16], "test": records[16:]}


def _run(*args):
  r = subprocess.run([sys.executable, "-m", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                     timeout=600)
  assert r.returncode == 0, f"{args[0]} exited {r.returncode}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
  return r


def test_finetune_an_imported_paligemma_on_own_jsonl(tmp_path):
  mine = tmp_path / "mine"
  mine.mkdir()
  splits = _conversations(mine)
  for split, records in splits.items():
    (mine / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
  texts = [m["content"] if isinstance(m["content"], str) else m["content"][-1]["text"]
           for rs in splits.values() for r in rs for m in r["messages"]]

  hf_dir = tmp_path / "paligemma"
  hf_dir.mkdir()
  sp = _tokenizer(hf_dir / "tokenizer.model", texts + [EXTRA] * 4 + EXTRA.split())
  vocab, image_id = sp.get_piece_size(), sp.piece_to_id("<image>")
  # At least data.vocab_size (128, configs/base.py): models.tokens_per_image builds the model with that
  # as the tokenizer's size, so a smaller imported vocabulary is refused (the README's models are far larger).
  assert vocab >= 128, vocab
  assert sp.id_to_piece(image_id) == "<image>" and image_id != sp.unk_id()
  hf = hf_tiny.build(transformers.PaliGemmaForConditionalGeneration, transformers.PaliGemmaConfig(
      vision_config=dict(hf_tiny.SIGLIP_VISION, vision_use_head=False),
      text_config=dict(model_type="gemma", vocab_size=vocab, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16),
      image_token_index=image_id, vocab_size=vocab, projection_dim=64, hidden_size=64))
  hf_tiny.save(hf, hf_dir)

  # The README block, sizes made small: text_len, steps, batches (8: one row per fake CPU device).
  out, data, work = tmp_path / "pg_import", tmp_path / "data_mine", tmp_path / "work_mine"
  r = _run("mm_jax.convert", f"--hf_dir={hf_dir}", f"--out={out}")
  assert (out / "tokenizer.model").read_bytes() == (hf_dir / "tokenizer.model").read_bytes()
  _run("mm_jax.data.prepare", f"--input=train={mine}/train.jsonl", f"--input=test={mine}/test.jsonl",
       f"--image_root={mine}/images", f"--out={data}", f"--tokenizer={out}/tokenizer.model", "--workers=1")
  stats = json.loads((data / "statistics.json").read_text())
  assert stats["train"]["examples"] == 16 and stats["test"]["examples"] == 4, stats
  assert stats["train"]["max_images"] == 2, stats
  own = ["--config.data.name=conversations", f"--config.data.path={data}",
         "--config.data.chat_template=paligemma", "--config.data.image_processor=siglip",
         "--config.data.max_images=2", f"--config.data.text_len={TEXT_LEN}"]
  small = ["--config.total_steps=3", "--config.global_batch_size=8", "--config.log_every=1"]
  r = _run("mm_jax.train", f"--config={out}/config.py", f"--workdir={work}", *own, "--config.optim.lr=1e-5",
           *small)
  loaded = re.search(rf"Loaded (\d+) params from {re.escape(str(out))} \(step 0\)\.", r.stdout)
  assert loaded, r.stdout[-2000:]  # init.parts of OUT/config.py
  logged = [json.loads(line) for line in (work / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged if "loss" in m] == [1, 2, 3], logged
  assert all(np.isfinite(m["loss"]) for m in logged if "loss" in m), logged
  r = _run("mm_jax.eval", f"--config={out}/config.py", f"--workdir={work}", *own,
           "--config.eval.metrics=('vqa_accuracy', 'exact_match')", "--config.eval.batch_size=8")

  # Checkpoint 3 started from the imported params: close to them, moved by three small steps.
  config = hf_tiny.load_config(str(out))
  _, imported = hf_tiny.ours(str(out), config)
  _, tuned = hf_tiny.ours(str(work), config)
  imported, tuned = writer.flat_params(imported), writer.flat_params(tuned)
  assert set(imported) == set(tuned) and int(loaded[1]) == len(imported)  # every param, none left at init
  for path in ("decoder/embedder/embedding", "encoder/patch_embed/kernel", "connector/proj/kernel"):
    assert not np.array_equal(imported[path], tuned[path]), path
  moved = max(hf_tiny.max_diff(imported[k], tuned[k]) for k in imported)
  assert moved < 1e-3, moved

  result = json.loads((work / "eval" / "test.json").read_text())
  assert result["step"] == 3 and result["num_examples"] == 4, result
  assert 0.0 <= result["vqa_accuracy"] <= 1.0 and "vqa_exact_match" in result, result
  predictions = [json.loads(line) for line in
                 (work / "eval" / "test.predictions.jsonl").read_text().splitlines()]
  assert [p["id"] for p in predictions] == [r["id"] for r in splits["test"]], predictions
  assert [p["answer"] for p in predictions] == [r["messages"][-1]["content"] for r in splits["test"]]
  assert all("vqa_accuracy" in p and "exact_match" in p for p in predictions), predictions

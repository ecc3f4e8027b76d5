"""SentencePiece training, loading, encode/decode; HF tokenizer.json; both against transformers.

The builders here (a Gemma-style and a Llama-style SentencePiece model, a Llama-3-style byte-level BPE
tokenizer.json) are trained in memory; tests/test_chat.py uses them too.
"""
import io
import json
import os
import random

import pytest
import sentencepiece as spm

from mm_jax.data import shapes
from mm_jax.data import tokenizer as tokenizer_lib
from mm_jax.errors import UserError

WORDS = ("the quick brown fox jumps over lazy dog what color is circle square red green blue how many "
         "shapes are there left right of image yes no 你好 世界 中文 東京 🙂 😀 🎉 café naïve über résumé "
         "12 345 6789 hello, world! (a) [b] {c} x=y+z; it's don't").split()
GEMMA_TOKENS = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<image>"]
LLAMA3_TOKENS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                 "<|eot_id|>", "<|image|>"]
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def corpus(n: int = 3000, seed: int = 0) -> list[str]:
  rng = random.Random(seed)
  out = []
  for _ in range(n):
    words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
    out.append("".join(w + rng.choice([" ", " ", " ", "  ", "\n", "\t", ", "]) for w in words).rstrip(" "))
  return out


def random_strings(n: int, seed: int = 1) -> list[str]:
  """ASCII, CJK, emoji, accented Latin, whitespace runs, newlines, tabs, leading/trailing spaces; none
  spells a special token (transformers would match those, sentencepiece does not)."""
  rng = random.Random(seed)
  pools = [[chr(c) for c in range(0x20, 0x7f)], [chr(c) for c in range(0x4e00, 0x4e00 + 300)],
           [chr(c) for c in range(0x1f600, 0x1f650)], [chr(c) for c in range(0xc0, 0x180)],
           [" ", "  ", "   ", "\n", "\n\n", "\t", " \t ", "\r\n"], WORDS, [" " + w for w in WORDS]]
  out = []
  while len(out) < n:
    s = "".join(rng.choice(rng.choice(pools)) for _ in range(rng.randint(0, 20)))
    s = " " * (rng.random() < 0.2) * rng.randint(1, 3) + s + " " * (rng.random() < 0.2) * rng.randint(1, 3)
    if not ("<" in s and ">" in s):
      out.append(s)
  return out


def sentencepiece_dir(path, *, gemma: bool) -> str:
  """A directory holding tokenizer.model, with the settings of the real ones: Gemma's (no dummy prefix,
  <pad> 0 <eos> 1 <bos> 2 <unk> 3, its turn and image tokens) or Llama 2's (dummy prefix, <unk> 0 <s> 1
  </s> 2, LLaVA's <image>); both BPE with byte fallback, identity normalization, spaces kept."""
  ids = (dict(pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
              bos_piece="<bos>") if gemma else dict(unk_id=0, bos_id=1, eos_id=2, pad_id=-1))
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(corpus()), model_writer=buf, model_type="bpe", vocab_size=700,
      hard_vocab_limit=False, byte_fallback=True, character_coverage=1.0, split_digits=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False, add_dummy_prefix=not gemma,
      allow_whitespace_only_pieces=True, user_defined_symbols=GEMMA_TOKENS if gemma else ["<image>"],
      num_threads=1, minloglevel=2, **ids)
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "tokenizer.model"), "wb") as f:
    f.write(buf.getvalue())
  return str(path)


def byte_bpe_dir(path) -> str:
  """A directory holding a Llama-3-style tokenizer.json (its split regex, byte-level BPE, its special
  tokens) and a tokenizer_config.json naming bos and eos."""
  from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=g-import-not-at-top
  tk = Tokenizer(models.BPE())
  tk.pre_tokenizer = pre_tokenizers.Sequence([
      pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
      pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
  tk.decoder = decoders.ByteLevel()
  tk.train_from_iterator(corpus(), trainers.BpeTrainer(
      vocab_size=800, special_tokens=LLAMA3_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
      show_progress=False))
  os.makedirs(path, exist_ok=True)
  tk.save(os.path.join(path, "tokenizer.json"))
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}, f)
  return str(path)


def _corpus(n=200):
  out = []
  for scene, qa in shapes.generate(1, {"train": n})["train"]:
    out += [t for pair in qa for t in pair] + [shapes.caption(scene)]
  return out


def test_round_trip_and_special_ids(tmp_path):
  corpus = _corpus()
  tok = tokenizer_lib.train(corpus, 128, str(tmp_path / "t.model"))
  assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2, 3)
  assert 40 < tok.vocab_size <= 128
  for text in corpus:
    ids = tok.encode(text)
    assert ids and all(4 <= i < tok.vocab_size for i in ids)  # No unk, no specials in text.
    assert tok.decode(ids) == text


def test_training_is_deterministic(tmp_path):
  corpus = _corpus()
  tokenizer_lib.train(corpus, 128, str(tmp_path / "a.model"))
  tokenizer_lib.train(corpus, 128, str(tmp_path / "b.model"))
  assert (tmp_path / "a.model").read_bytes() == (tmp_path / "b.model").read_bytes()
  tokenizer_lib.train(corpus[::-1][:500], 128, str(tmp_path / "c.model"))
  assert (tmp_path / "a.model").read_bytes() != (tmp_path / "c.model").read_bytes()


def test_vocab_size_is_a_maximum(tmp_path):
  # A tiny corpus cannot fill 1000 pieces; training must still succeed with fewer.
  tok = tokenizer_lib.train(["how many red shapes are there?", "red", "two"] * 20, 1000,
                            str(tmp_path / "t.model"))
  assert tok.vocab_size < 1000
  assert tok.decode(tok.encode("how many red shapes are there?")) == "how many red shapes are there?"


def test_load_and_decode_stops_at_eos(tmp_path):
  path = str(tmp_path / "t.model")
  trained = tokenizer_lib.train(_corpus(50), 128, path)
  tok = tokenizer_lib.Tokenizer.load(path)
  assert tok.vocab_size == trained.vocab_size
  ids = tok.encode("is there a red circle?")
  assert ids == trained.encode("is there a red circle?")
  answer = tok.encode("yes")
  assert tok.decode([tok.bos_id, *ids, *answer, tok.eos_id, *tok.encode("no"), tok.pad_id]) == \
      "is there a red circle? yes"
  assert tok.decode(ids + [tok.pad_id] * 3) == "is there a red circle?"


def test_shipped_tokenizer_covers_the_dataset(tokenizer, train_source):
  for i in range(len(train_source)):
    record = train_source[i]
    for text in (*record["questions"], *record["answers"], record["caption"]):
      text = text.decode()
      assert tokenizer.decode(tokenizer.encode(text)) == text
      assert tokenizer.unk_id not in tokenizer.encode(text)


def test_decode_drops_ids_past_the_tokenizer(tmp_path):
  """A model's vocabulary may be larger than its tokenizer's (LLaVA-1.5); those ids decode to nothing."""
  tok = tokenizer_lib.train(_corpus(50), 128, str(tmp_path / "t.model"))
  ids = tok.encode("yes")
  assert tok.decode([tok.vocab_size, *ids, tok.vocab_size + 7]) == "yes"


# --- parity with transformers ---

@pytest.mark.parametrize("gemma", [True, False], ids=["gemma", "llama"])
def test_sentencepiece_matches_transformers(tmp_path, gemma):
  import transformers  # pylint: disable=g-import-not-at-top
  path = sentencepiece_dir(tmp_path, gemma=gemma)
  ours = tokenizer_lib.load(os.path.join(path, "tokenizer.model"))
  ref = (transformers.GemmaTokenizer if gemma else transformers.LlamaTokenizer).from_pretrained(path)
  assert type(ours) is tokenizer_lib.Tokenizer
  for text in random_strings(1000):
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == ref.decode(ids, skip_special_tokens=True), text
    # Llama's dummy prefix costs one leading space on the way back, in both.
    assert ours.decode(ids) == (text[1:] if not gemma and text.startswith(" ") else text), text


def test_hf_tokenizer_matches_transformers(tmp_path):
  import transformers  # pylint: disable=g-import-not-at-top
  path = byte_bpe_dir(tmp_path)
  ours = tokenizer_lib.load(path)
  ref = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(path, "tokenizer.json"))
  assert type(ours) is tokenizer_lib.HFTokenizer
  assert ours.vocab_size == len(ref)
  for text in random_strings(1000):
    ids = ours.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False), text
    assert ours.decode(ids) == text == ref.decode(ids)


# --- HFTokenizer and load ---

def test_hf_special_ids_and_decode(tmp_path):
  path = byte_bpe_dir(tmp_path)
  tok = tokenizer_lib.load(os.path.join(path, "tokenizer.json"))
  assert (tok.bos_id, tok.eos_id) == (tok.token_to_id("<|begin_of_text|>"), tok.token_to_id("<|eot_id|>"))
  assert tok.pad_id is None and tok.unk_id is None  # none configured, none of the well-known ones
  assert tok.token_to_id("<|image|>") is not None and tok.token_to_id("<image>") is None
  os.remove(os.path.join(path, "tokenizer_config.json"))
  bare = tokenizer_lib.load(path)  # the well-known names instead
  assert (bare.bos_id, bare.eos_id) == (tok.bos_id, tok.token_to_id("<|end_of_text|>"))
  ids = tok.encode("is there a red circle?")
  assert tok.pieces(ids)[0] == "is"
  assert tok.decode([tok.bos_id, *ids, tok.eos_id, *tok.encode("no")]) == "is there a red circle?"
  assert tok.decode([tok.vocab_size, *ids, tok.vocab_size + 7]) == "is there a red circle?"


def test_hf_special_ids_from_config_objects(tmp_path):
  """tokenizer_config.json may write a token as an AddedToken object; pad may be any token."""
  path = byte_bpe_dir(tmp_path)
  with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
    json.dump({"bos_token": {"content": "<|begin_of_text|>", "special": True},
               "eos_token": "<|end_of_text|>", "pad_token": "<|eot_id|>"}, f)
  tok = tokenizer_lib.load(path)
  assert tok.bos_id == tok.token_to_id("<|begin_of_text|>")
  assert (tok.eos_id, tok.pad_id) == (tok.token_to_id("<|end_of_text|>"), tok.token_to_id("<|eot_id|>"))


def test_sentencepiece_token_to_id(tmp_path):
  tok = tokenizer_lib.load(sentencepiece_dir(tmp_path, gemma=True))
  assert type(tok) is tokenizer_lib.Tokenizer  # a directory with only tokenizer.model
  assert tok.token_to_id("<start_of_turn>") == 4 and tok.token_to_id("<eos>") == tok.eos_id == 1
  assert tok.token_to_id("<unk>") == tok.unk_id == 3
  assert tok.token_to_id("<|eot_id|>") is None
  assert tok.pieces(tok.encode("<start_of_turn>user"))[0] == "<start_of_turn>"  # user-defined: matched


def test_load_picks_by_file(tmp_path):
  sentencepiece_dir(tmp_path / "both", gemma=False)
  byte_bpe_dir(tmp_path / "both")
  assert type(tokenizer_lib.load(str(tmp_path / "both"))) is tokenizer_lib.HFTokenizer  # json first
  assert type(tokenizer_lib.load(str(tmp_path / "both" / "tokenizer.model"))) is tokenizer_lib.Tokenizer
  (tmp_path / "empty").mkdir()
  for bad in (tmp_path / "empty", tmp_path / "missing.model"):
    with pytest.raises(UserError, match="tokenizer"):
      tokenizer_lib.load(str(bad))


def test_trained_tokenizer_loads_through_load(tmp_path):
  path = str(tmp_path / "t.model")
  trained = tokenizer_lib.train(_corpus(50), 128, path)
  tok = tokenizer_lib.load(path)
  assert tok.encode("  is there a red circle? ") == trained.encode("  is there a red circle? ")
  assert tok.token_to_id("<s>") == tok.bos_id and tok.token_to_id("</s>") == tok.eos_id

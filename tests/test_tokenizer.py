"""SentencePiece training, loading, encode/decode."""
from mm_jax.data import shapes
from mm_jax.data import tokenizer as tokenizer_lib


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

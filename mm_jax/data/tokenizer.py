"""SentencePiece tokenizer: trained in memory from the dataset's text, or loaded from a .model file.

Ids 0-3 are fixed: pad 0, unk 1, bos 2, eos 3. `vocab_size` at training time is a maximum (the small,
repetitive corpus may not support that many pieces); the real size is `Tokenizer.vocab_size`.
"""
from collections.abc import Iterable, Sequence
import io
import os

import sentencepiece as spm

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3


def train(sentences: Iterable[str], vocab_size: int, path: str) -> "Tokenizer":
  """Trains a BPE model on `sentences`, writes it to `path` (atomically) and returns it loaded.

  Deterministic: the same sentences in the same order give byte-identical model files.
  """
  buf = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(sentences), model_writer=buf, model_type="bpe", vocab_size=vocab_size,
      hard_vocab_limit=False,  # A maximum, not a requirement: the corpus is small.
      character_coverage=1.0, byte_fallback=False,  # byte_fallback would need vocab_size >= 256+.
      pad_id=PAD_ID, unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID,
      num_threads=1, minloglevel=2)  # One thread: no dependence on thread timing.
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "wb") as f:
    f.write(buf.getvalue())
  os.replace(tmp, path)  # Readers never see a half-written model.
  return Tokenizer(buf.getvalue())


class Tokenizer:
  """Encodes text to ids without bos/eos; callers add those where the layout needs them."""

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
    self.unk_id = self._sp.unk_id()

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  def encode(self, text: str) -> list[int]:
    return self._sp.encode(text)

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes up to the first eos; pad and bos are dropped, and so are ids past the last piece (a
    model's vocabulary may be larger than its tokenizer's, e.g. LLaVA-1.5: 32064 vs 32000)."""
    ids = [int(i) for i in ids]
    if self.eos_id in ids:
      ids = ids[:ids.index(self.eos_id)]
    return self._sp.decode([i for i in ids
                            if i not in (self.pad_id, self.bos_id) and 0 <= i < self.vocab_size])

  def pieces(self, ids: Sequence[int]) -> list[str]:
    return [self._sp.id_to_piece(int(i)) for i in ids]

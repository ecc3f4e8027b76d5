"""Tokenizers: SentencePiece (trained in memory from the dataset's text, or a .model file) and Hugging Face
tokenizer.json (through the `tokenizers` library), with one API.

  tok = tokenizer.load(path)        # x.model -> Tokenizer; tokenizer.json or a dir holding one -> HFTokenizer
  ids = tok.encode("is it red?")    # no bos/eos: callers add those where the layout needs them
  tok.decode(ids + [tok.eos_id])    # "is it red?": stops at eos, drops pad, bos and ids past the vocab
  tok.token_to_id("<image>")        # a special token's id, None where the tokenizer lacks it

Trained models: ids 0-3 are fixed (pad 0, unk 1, bos 2, eos 3); `vocab_size` at training time is a maximum
(the small, repetitive corpus may not support that many pieces), the real size is `Tokenizer.vocab_size`.

Parity with transformers 5 (tests/test_tokenizer.py, without special tokens): a .model encodes as the
model's own tokenizer class built from it does: GemmaTokenizer (no dummy prefix: Gemma, PaliGemma) and
LlamaTokenizer with its defaults legacy=False, add_prefix_space=True (Llama 2, LLaVA-1.5), i.e. Metaspace
with prepend_scheme "first". Two places differ from plain sentencepiece there: text that starts with a space
gets no extra "▁" (sentencepiece would add one, " hi" -> "▁", "▁hi"), and in a rendered chat the text after
a special token gets no dummy prefix. Control pieces written in text ("</s>") stay text in `encode`
(transformers would match them; `encode_chat` refuses them). A tokenizer.json runs as the `tokenizers`
library runs it, as PreTrainedTokenizerFast(tokenizer_file=...) does; note transformers 5's LlamaTokenizer
rebuilds its pipeline from the vocab, so a Llama-2-era tokenizer.json written in legacy mode (a Prepend
normalizer) puts a "▁" after special tokens here and not there.
"""
from collections.abc import Iterable, Sequence
import io
import json
import os

import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2
import tokenizers

from mm_jax.errors import UserError

PAD_ID, UNK_ID, BOS_ID, EOS_ID = 0, 1, 2, 3
Spans = list[tuple[int, int]]  # (start, end) character offsets of each token in its text


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


def load(path: str) -> "Tokenizer | HFTokenizer":
  """The tokenizer at `path`: a SentencePiece .model, a tokenizer.json, or a directory holding one of them
  (tokenizer.json first: it carries the added tokens, e.g. LLaVA's <image>, that tokenizer.model lacks)."""
  if os.path.isdir(path):
    for name in ("tokenizer.json", "tokenizer.model", "spiece.model"):
      if os.path.isfile(os.path.join(path, name)):
        return load(os.path.join(path, name))
    raise UserError(f"{path} holds no tokenizer.json, tokenizer.model or spiece.model; point the tokenizer "
                    "path at the model's tokenizer file or at the directory that holds it")
  if not os.path.isfile(path):
    raise UserError(f"tokenizer {path} does not exist; give a .model, a tokenizer.json or their directory")
  if path.endswith(".json"):
    return HFTokenizer.load(path)
  return Tokenizer.load(path)


class Tokenizer:
  """A SentencePiece model. Encodes text to ids without bos/eos; callers add those where the layout needs
  them."""

  def __init__(self, model_proto: bytes):
    self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    self.vocab_size = self._sp.get_piece_size()
    self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
    self.unk_id = self._sp.unk_id()
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(model_proto)
    norm = proto.normalizer_spec
    # Metaspace "first" adds no "▁" to text that starts with one; sentencepiece always does. Only matters
    # where leading whitespace survives normalization (real checkpoints; not our trained nmt_nfkc models).
    self._prefix = norm.add_dummy_prefix
    self._keeps_spaces = not norm.remove_extra_whitespaces
    self._bare = self._sp  # the same model without the dummy prefix, for text that must not get one
    if self._prefix:
      norm.add_dummy_prefix = False
      self._bare = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    Type = sentencepiece_model_pb2.ModelProto.SentencePiece
    self._special = {i for i, p in enumerate(proto.pieces) if p.type in (Type.CONTROL, Type.USER_DEFINED)}

  @classmethod
  def load(cls, path: str) -> "Tokenizer":
    with open(path, "rb") as f:
      return cls(f.read())

  def encode(self, text: str) -> list[int]:
    return self._run(text, first=True)

  def _run(self, text: str, first: bool) -> list[int]:
    return self._processor(text, first).encode(text)

  def _processor(self, text: str, first: bool):
    if first and not (self._keeps_spaces and text.startswith((" ", "▁"))):
      return self._sp
    return self._bare

  def encode_chat(self, text: str, specials: Spans) -> tuple[list[int], Spans]:
    """Encodes a rendered chat as transformers tokenizes one: the spans `specials` of `text` are one special
    token each, the text between them is encoded as text, with the dummy prefix only at the very start.
    Returns the ids and each token's character span. Raises ValueError where the text itself would
    produce a special token (e.g. a user turn that says "<image>")."""
    ids, spans, pos = [], [], 0
    for start, end in [*sorted(specials), (len(text), len(text))]:
      if pos < start:
        run = text[pos:start]
        pieces = self._processor(run, pos == 0).encode(run, return_type="proto").pieces
        offsets = _char_offsets(run)
        for p in pieces:
          if p.id in self._special:
            raise ValueError(f"the text {run!r} holds the special token {p.piece!r}; remove it from the data")
          ids.append(p.id)
          spans.append((pos + offsets[p.begin], pos + offsets[p.end]))
      if start < end:
        i = self.token_to_id(text[start:end])
        if i is None:
          raise ValueError(f"the tokenizer has no token {text[start:end]!r}")
        ids.append(i)
        spans.append((start, end))
      pos = max(pos, end)
    return ids, spans

  def decode(self, ids: Sequence[int]) -> str:
    """Decodes up to the first eos; pad and bos are dropped, and so are ids past the last piece (a
    model's vocabulary may be larger than its tokenizer's, e.g. LLaVA-1.5: 32064 vs 32000)."""
    return self._sp.decode(_kept(self, ids))

  def pieces(self, ids: Sequence[int]) -> list[str]:
    return [self._sp.id_to_piece(int(i)) for i in ids]

  def token_to_id(self, token: str) -> int | None:
    i = self._sp.piece_to_id(token)
    return None if i == self.unk_id and token != self._sp.id_to_piece(i) else i


class HFTokenizer:
  """A Hugging Face tokenizer.json, with Tokenizer's API. Special ids come from the tokenizer_config.json
  beside it where present, else from the well-known special tokens; None where absent."""

  _KNOWN = dict(bos=("<s>", "<bos>", "<|begin_of_text|>", "<|startoftext|>"),
                eos=("</s>", "<eos>", "<|end_of_text|>", "<|endoftext|>"),
                pad=("<pad>", "<|pad|>", "[PAD]"), unk=("<unk>", "[UNK]"))

  def __init__(self, tokenizer_json: str, config: dict | None = None):
    self._tk = tokenizers.Tokenizer.from_str(tokenizer_json)
    vocab = self._tk.get_vocab(with_added_tokens=True)
    self.vocab_size = max(vocab.values()) + 1  # added ids may leave gaps; any id below is in range
    config = config or {}
    for kind, known in self._KNOWN.items():
      setattr(self, f"{kind}_id", self._special_id(config.get(f"{kind}_token"), known))
    added = self._tk.get_added_tokens_decoder()
    # Added tokens that text can produce: whitespace ones (Gemma's "\n\n") are ordinary text.
    self._added = {i for i, t in added.items() if t.content.strip()}

  def _special_id(self, configured, known: Sequence[str]) -> int | None:
    if isinstance(configured, dict):  # an AddedToken written out: {"content": "<s>", ...}
      configured = configured.get("content")
    for token in ([configured] if configured else known):
      if (i := self._tk.token_to_id(token)) is not None:
        return i
    return None

  @classmethod
  def load(cls, path: str) -> "HFTokenizer":
    """From a tokenizer.json (or the directory holding it) and the tokenizer_config.json beside it."""
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    with open(path, encoding="utf-8") as f:
      text = f.read()
    config_path = os.path.join(os.path.dirname(path), "tokenizer_config.json")
    config = None
    if os.path.isfile(config_path):
      with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    return cls(text, config)

  def encode(self, text: str) -> list[int]:
    return self._tk.encode(text, add_special_tokens=False).ids

  def encode_chat(self, text: str, specials: Spans) -> tuple[list[int], Spans]:
    """Tokenizer.encode_chat's contract. The whole text is encoded at once, as apply_chat_template does, so
    each span in `specials` must come out as exactly one added token."""
    enc = self._tk.encode(text, add_special_tokens=False)
    ids, spans = list(enc.ids), [tuple(o) for o in enc.offsets]
    want = {tuple(s): text[s[0]:s[1]] for s in specials}
    for i, span in zip(ids, spans):
      if span in want:
        if self._tk.token_to_id(want.pop(span)) != i:
          raise ValueError(f"{text[span[0]:span[1]]!r} did not encode as its token")
      elif i in self._added:
        raise ValueError(f"the text {text!r} holds the special token {self._tk.id_to_token(i)!r} at "
                         f"{span}; remove it from the data")
    if want:
      token = next(iter(want.values()))
      raise ValueError(f"{token!r} is not an added token of this tokenizer.json, so text cannot produce it")
    return ids, spans

  def decode(self, ids: Sequence[int]) -> str:
    """Tokenizer.decode's rules; the other special tokens (e.g. <end_of_turn>) are dropped too."""
    return self._tk.decode(_kept(self, ids), skip_special_tokens=True)

  def pieces(self, ids: Sequence[int]) -> list[str]:
    return [self._tk.id_to_token(int(i)) for i in ids]

  def token_to_id(self, token: str) -> int | None:
    return self._tk.token_to_id(token)


def _kept(tok, ids: Sequence[int]) -> list[int]:
  """The ids decode reads: up to the first eos, without pad, bos and ids out of range."""
  ids = [int(i) for i in ids]
  if tok.eos_id is not None and tok.eos_id in ids:
    ids = ids[:ids.index(tok.eos_id)]
  return [i for i in ids if i not in (tok.pad_id, tok.bos_id) and 0 <= i < tok.vocab_size]


def _char_offsets(text: str) -> list[int]:
  """UTF-8 byte offset -> character offset, for every byte offset 0..len(bytes)."""
  out = []
  for i, ch in enumerate(text):
    out += [i] * len(ch.encode("utf-8"))
  return out + [len(text)]

r"""The `tfds` source: a question-answering dataset TFDS already prepared, by name in a data_dir, its
fields named in the config.

  python -m mm_jax.train --config=configs/shapes_tiny.py --workdir=w --config.data.name=tfds \
    --config.data.data_dir=~/tensorflow_datasets --config.data.tfds.name=my_vqa/1.0.0 \
    --config.data.tfds.question=question --config.data.tfds.answer=answers \
    --config.data.tokenizer=tok.model

The split must be stored as array_record (TFDS's random-access format: `download_and_prepare(
file_format="array_record")`). Each record is one conversation: the user turn holds the image and the
question, the assistant turn the answer. An answer field holding several answers (VQAv2's ten) trains on
the first and scores against all of them (eval.metrics=("vqa_accuracy",)); data.tfds.kind names an
optional field to score per kind (e.g. a question type).
"""
import numpy as np
import tensorflow_datasets as tfds

from mm_jax.data.conversation import Conversation, Image, Turn
from mm_jax.data.source import Source
from mm_jax.errors import UserError

SPLITS = ("train", "validation", "test")


def _open(data_cfg, split: str, text_only: bool = False):
  name = data_cfg.tfds.name
  if not name:
    raise UserError("data.name=tfds needs --config.data.tfds.name (a dataset prepared in data.data_dir, "
                    "e.g. my_vqa/1.0.0)")
  try:
    builder = tfds.builder(name, data_dir=data_cfg.data_dir)
  except Exception as e:  # pylint: disable=broad-except  # tfds raises several kinds for a missing one
    raise UserError(f"data.tfds.name={name!r} is not a dataset prepared in data.data_dir="
                    f"{data_cfg.data_dir!r} ({type(e).__name__}); prepare it there with TFDS or fix the "
                    "name") from None
  if split not in builder.info.splits:
    raise UserError(f"{name} has no {split!r} split (it has {', '.join(builder.info.splits)})")
  missing = [f for f in _fields(data_cfg) if f not in builder.info.features]
  if missing:
    raise UserError(f"{name} has no field {missing[0]!r} (it has {', '.join(builder.info.features)}); "
                    f"set --config.data.tfds.* to its field names")
  decoders = {data_cfg.tfds.image: tfds.decode.SkipDecoding()} if text_only else None
  return builder.as_data_source(decoders=decoders)[split]


def _fields(data_cfg) -> list[str]:
  t = data_cfg.tfds
  return [f for f in (t.image, t.question, t.answer, t.kind) if f]


def _text(value) -> str:
  return value.decode() if isinstance(value, bytes) else str(value)


def _answers(record, field: str) -> list[str]:
  value = record[field]
  if isinstance(value, (list, tuple, np.ndarray)) and not isinstance(value, (bytes, str)):
    return [_text(v) for v in value]
  return [_text(value)]


class _Mapped:
  """The record -> Conversation functions of one config's field mapping."""

  def __init__(self):
    self.cfg = None

  def bind(self, data_cfg):
    self.cfg = data_cfg.tfds
    return self

  def conversation(self, record, k: int = 0) -> Conversation:
    del k
    c = self.cfg
    answers = _answers(record, c.answer)
    if not answers:
      raise ValueError(f"field {c.answer!r} holds no answer")
    return Conversation(turns=(Turn("user", (Image(0), _text(record[c.question]))),
                               Turn("assistant", (answers[0],))), images=(record[c.image],))

  def texts(self, record, k: int) -> tuple[str, str]:
    del k
    return _text(record[self.cfg.question]), _answers(record, self.cfg.answer)[0]

  def kind(self, record) -> str:
    return _text(record[self.cfg.kind]) if self.cfg.kind else ""

  def references(self, record, k: int) -> list[str]:
    del k
    return _answers(record, self.cfg.answer)


MAPPED = _Mapped()


def _bound_open(data_cfg, split: str, text_only: bool = False):
  MAPPED.bind(data_cfg)  # the record functions below read this config's field names
  return _open(data_cfg, split, text_only)


SOURCE = Source(
    splits=SPLITS, open=_bound_open, tokenizer=lambda d: _no_tokenizer(), kinds=("",),
    texts=MAPPED.texts, field=lambda k: "record", caption=lambda record: MAPPED.texts(record, 0)[1],
    to_conversation=MAPPED.conversation, conversations=True, record_kind=MAPPED.kind,
    references=MAPPED.references)


def _no_tokenizer() -> str:
  raise UserError("data.name=tfds has no tokenizer of its own; set --config.data.tokenizer to the "
                  "model's (a SentencePiece .model or a tokenizer.json)")

r"""The `conversations` source: a dataset `python -m mm_jax.data.prepare` wrote (your own data).

  python -m mm_jax.data.prepare --input train=train.jsonl --image_root imgs/ --out data/mine
  python -m mm_jax.train --config=configs/shapes_tiny.py --workdir=w \
    --config.data.name=conversations --config.data.path=data/mine --config.data.tokenizer=tok.model

Each record is one whole conversation (data/conversation.py) and its encoded images: one training
element, and in evaluation the prompt up to its last assistant turn, scored against that turn. A record
id of the form "<anything>/<kind>" is scored under that kind too (the shapes export writes
"test/17/color"). There is no dataset tokenizer: data.tokenizer names the model's.
"""
import os

import tensorflow_datasets as tfds

from mm_jax.data.conversation import Conversation
from mm_jax.data.source import Source
from mm_jax.errors import UserError

SPLITS = ("train", "validation", "test")


def _open(data_cfg, split: str, text_only: bool = False):
  """The split's TFDS random-access source (images are stored encoded, so text_only changes nothing)."""
  del text_only
  path = data_cfg.path
  if not path or not os.path.isfile(os.path.join(path, "dataset_info.json")):
    raise UserError(f"data.path={path!r} is not a prepared dataset (no dataset_info.json); run "
                    "python -m mm_jax.data.prepare --out DIR first and set --config.data.path=DIR")
  builder = tfds.builder_from_directory(path)
  if split not in builder.info.splits:
    raise UserError(f"{path} has no {split!r} split (it has {', '.join(builder.info.splits)}); prepare "
                    f"it with --input {split}=FILE or evaluate with --split= one of those")
  return builder.as_data_source()[split]


def _tokenizer(data_cfg) -> str:
  raise UserError("data.name=conversations has no tokenizer of its own; set --config.data.tokenizer to "
                  "the model's (a SentencePiece .model or a tokenizer.json)")


def conversation(record, k: int = 0) -> Conversation:
  del k
  return Conversation.from_json(record["conversation"].decode(), images=list(record["images"]))


def _texts(record, k: int) -> tuple[str, str]:
  """(the last user turn's text, the last assistant turn's): what an evaluation scores."""
  del k
  conv = conversation(record)
  before, answer = conv.until_last_answer()
  users = [t.text for t in before.turns if t.role == "user"]
  return (users[-1] if users else ""), answer


def _kind(record) -> str:
  rid = record["id"].decode()
  return rid.rsplit("/", 1)[1] if "/" in rid else ""


SOURCE = Source(
    splits=SPLITS, open=_open, tokenizer=_tokenizer, kinds=("",), texts=_texts,
    field=lambda k: "conversation", caption=lambda record: _texts(record, 0)[1],
    to_conversation=conversation, conversations=True, record_kind=_kind)

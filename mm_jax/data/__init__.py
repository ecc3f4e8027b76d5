"""Data: the sources (SOURCES, each a source.Source found by config.data.name), their SentencePiece
tokenizers, and the grain pipelines over them (pipeline: question answering, captions: pairs).

  src = data.get(config.data.name)                # unknown names: a UserError naming the known ones
  tokenizer, split = data.open_split(config, "train")

A new source: one module whose SOURCE is a source.Source, and its line in SOURCES.
"""
from mm_jax.data import conversations, shapes, shapes_sizes, shapes_video, tfds_source
from mm_jax.data.source import Source
from mm_jax.errors import UserError

SOURCES = {"shapes": shapes.SOURCE, "shapes_sizes": shapes_sizes.SOURCE, "shapes_video": shapes_video.SOURCE,
           "conversations": conversations.SOURCE, "tfds": tfds_source.SOURCE}


def get(name: str) -> Source:
  """The source record of config.data.name."""
  if name not in SOURCES:
    raise UserError(f"data.name={name!r} is unknown; use one of {', '.join(SOURCES)} "
                    "(--config.data.name=...)")
  return SOURCES[name]


# The pipelines look their source up with get(), so they are imported once it is defined.
# pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.data import captions  # isort: skip
from mm_jax.data.pipeline import eval_batches, load_tokenizer, open_source, train_iterator  # isort: skip
from mm_jax.data.records import BadRecord, SkipMeter  # isort: skip
# pylint: enable=g-import-not-at-top,wrong-import-position


def open_split(config, split: str):
  """(tokenizer, random-access source of `split`); builds the dataset into data.data_dir if needed."""
  return load_tokenizer(config), open_source(config, split)

"""Data: the generated `shapes` TFDS dataset, its SentencePiece tokenizer, and the grain pipelines."""
from mm_jax.data import captions
from mm_jax.data.pipeline import eval_batches, load_tokenizer, open_source, train_iterator
from mm_jax.data.records import BadRecord, SkipMeter
from mm_jax.data.shapes import QUESTION_KINDS

# model.task -> its training iterator (config, tokenizer, source, *, process_index, process_count).
TRAIN_ITERATORS = {"vqa": train_iterator, "contrastive": captions.train_iterator}


def prepare(config, split: str):
  """(tokenizer, random-access source of `split`); builds the dataset into data.data_dir if needed."""
  return load_tokenizer(config), open_source(config, split)

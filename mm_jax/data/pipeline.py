r"""Input pipelines: the (image, question, answer) elements of a source -> numpy batches for the trainer
and the evaluator.

  source = open_source(config, "train")   # a split of data.get(data.name), built on first use
  tok = load_tokenizer(config)            # the data's tokenizer (or data.tokenizer); vocab_size is real
  it = train_iterator(config, tok, source, process_index=jax.process_index(),
                      process_count=jax.process_count())
  batch = next(it)   # forever; it.get_state() / set_state(), or orbax IteratorSave / IteratorRestore
  for batch in eval_batches(config, tok, source_val, process_index=..., process_count=...): ...

The elements are the source's (source.Source: its questions, then in training its captioning elements),
shuffled with config.seed and reshuffled every epoch. The global batches, and the iterator state, are
the same whatever the process count: each process makes its own block of rows. The batches' layouts:
train_iterator and eval_batches. Bad records (data.bad_records): records.py.
"""
import dataclasses
import json
import math
import os
from typing import Any

from etils import epath
import grain
import jax
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image

from mm_jax.data import get
from mm_jax.data import records as records_lib
from mm_jax.data import tokenizer as tokenizer_lib
from mm_jax.errors import UserError


def open_source(config, split: str) -> records_lib.Records:
  """Returns the random-access source of `split` ('train', 'validation', 'test'), built on first use;
  its items are checked records (a bad one raises records.BadRecord)."""
  src = get(config.data.name)
  if split not in src.splits:
    raise UserError(f"unknown split {split!r}; use one of {', '.join(src.splits)}")
  policy = records_lib.policy(config.data)
  return records_lib.Records(src.open(config.data, split), policy)


def load_tokenizer(config) -> tokenizer_lib.Tokenizer:
  """data.tokenizer (a SentencePiece .model, e.g. an imported model's) or the dataset's own."""
  path = config.data.tokenizer
  if path:
    if not os.path.isfile(path):
      raise UserError(f"data.tokenizer {path!r} does not exist; give a SentencePiece .model file or "
                      "'' for the dataset's own tokenizer")
    return tokenizer_lib.Tokenizer.load(path)
  return tokenizer_lib.Tokenizer.load(get(config.data.name).tokenizer(config.data))


def train_iterator(config, tokenizer: tokenizer_lib.Tokenizer, source, *, process_index: int,
                   process_count: int) -> grain.DatasetIterator:
  """Returns an endless, checkpointable iterator over this process's training batches, of
  b = global_batch_size // process_count rows:

    image      float32 [b, S, S, 3]  in [-1, 1] (all zeros if data.blind); S = data.image_size
    text       int32   [b, T]        [bos] question | answer [eos] | pad ...; T = data.text_len
    mask_ar    int32   [b, T]        0 on the prefix (full attention), 1 on suffix and padding (causal)
    mask_loss  int32   [b, T]        1 on the suffix (answer + eos) only
    mask_input int32   [b, T]        1 on every real token, 0 on padding
    skipped    int32   [b]           only under data.bad_records=skip: 1 where a bad element was replaced
  """
  num = get(config.data.name).num_elements(config.data, len(source))
  return shuffled_batches(config, num, _TrainExample(config, tokenizer, source),
                          process_index=process_index, process_count=process_count)


def shuffled_batches(config, num_elements: int, make_element, *, process_index: int,
                     process_count: int) -> grain.DatasetIterator:
  """Elements make_element(j), j in [0, num_elements): shuffled with config.seed and reshuffled every
  epoch, in global batches of config.global_batch_size of which process p of P makes rows
  [p*b, (p+1)*b), b = global_batch_size // P; endless, deterministic and checkpointable. The processes'
  batches, concatenated in order, are the 1-process batch (sharding.check_batch checks that the mesh
  places them so), and the state is the global batch index: a checkpoint written by P processes
  resumes with any other count (IteratorRestore)."""
  size = config.global_batch_size
  b = _local_batch_size(size, process_count, "global_batch_size")
  ids = grain.MapDataset.range(num_elements).shuffle(seed=config.seed).repeat(None)  # reseeded per epoch
  make = records_lib.guarded(make_element, num_elements, records_lib.policy(config.data))
  ds = ids.batch(size, drop_remainder=True).map(_Rows(make, process_index * b, b))
  threads = config.data.num_threads
  # Elements are computed by index, so the order never depends on thread timing.
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, 2 * threads))
  return iter(ds.to_iter_dataset(options))


class _Rows:
  """Global batch of element ids -> this process's rows [start, start + size), made and stacked."""

  def __init__(self, make_element, start: int, size: int):
    self._make, self._start, self._size = make_element, start, size

  def __call__(self, ids_G: np.ndarray) -> dict[str, np.ndarray]:
    rows = [self._make(j) for j in ids_G[self._start:self._start + self._size]]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}


class _IteratorHandler(grain.checkpoint.CheckpointHandler):
  """grain's orbax handler (same files: process_I-of-N.json), whose restore also takes a state written
  by another process count: the states are global batch indices, the same in every process."""

  def restore(self, directory: epath.Path, item=None, args=None):
    item = item or args.item
    if (directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json").exists():
      return super().restore(directory, item=item, args=args)
    states = {p.read_text() for p in directory.glob("process_*-of-*.json")}
    if len(states) != 1:
      raise UserError(f"the data iterator states in {directory} are {len(states)} different ones; "
                      "resume with the process count that wrote them")
    item.set_state(json.loads(states.pop()))
    item.start_prefetch()
    return item


@ocp.args.register_with_handler(_IteratorHandler, for_save=True)
@dataclasses.dataclass
class IteratorSave(ocp.args.CheckpointArgs):
  """orbax args: save a train iterator (grain.checkpoint.CheckpointSave's format)."""
  item: Any


@ocp.args.register_with_handler(_IteratorHandler, for_restore=True)
@dataclasses.dataclass
class IteratorRestore(ocp.args.CheckpointArgs):
  """orbax args: restore a train iterator in place, whatever process count saved it."""
  item: Any


def eval_batches(config, tokenizer: tokenizer_lib.Tokenizer, source, *, process_index: int,
                 process_count: int):
  """Yields every (image, question) pair of the split once (this process's share), in a fixed order.

  Every process yields the same number of batches (the last ones padded), so collectives stay in step.
  The prefix only: image, text ([bos] question | pad), mask_input, prefix_len int32 [b], valid bool [b]
  (False on padding rows: [bos] alone, prefix_len 1, so no row is empty, and rows of a bad element
  under data.bad_records=skip), skipped bool [b], and lists question, answer, kind (of the source's
  kinds; '' on padding rows).
  """
  batch_size = _local_batch_size(config.eval.batch_size, process_count, "eval.batch_size")
  src = get(config.data.name)
  num_pairs = src.num_elements(config.data, len(source), train=False)
  num_batches = math.ceil(num_pairs / (batch_size * process_count))
  mine = list(range(process_index, num_pairs, process_count))
  mine += [None] * (num_batches * batch_size - len(mine))
  text_len, size = config.data.text_len, config.data.image_size
  skip = records_lib.policy(config.data) == "skip"
  cached = (None, None)  # (record index, record or its BadRecord): the pairs of an image read once
  for start in range(0, len(mine), batch_size):
    rows = []
    for j in mine[start:start + batch_size]:
      if j is None:
        rows.append(_eval_padding_row(tokenizer, text_len, size))
        continue
      r, k = src.element(config.data, len(source), j)
      if cached[0] != r:
        cached = (r, _read(source, r))
      try:
        rows.append(_eval_row(config, src, tokenizer, source, r, k, cached[1]))
      except records_lib.BadRecord as e:
        if not skip:
          raise
        records_lib.note_skipped(e)
        rows.append(dict(_eval_padding_row(tokenizer, text_len, size), skipped=True))
    yield _stack_eval(rows)


def _read(source, r: int):
  try:
    return source[r]
  except records_lib.BadRecord as e:
    return e


def _eval_row(config, src, tokenizer, source, r: int, k: int, record) -> dict:
  if isinstance(record, records_lib.BadRecord):
    raise record
  question, answer = src.texts(record, k)
  prefix = _prefix(tokenizer, question)
  text_len = config.data.text_len
  if len(prefix) > text_len:
    raise _too_long(src, source, r, k, question, len(prefix), text_len)
  return dict(image=_image(record["image"], config), text=_padded(prefix, text_len),
              mask_input=_mask(len(prefix), text_len), prefix_len=len(prefix), valid=True,
              question=question, answer=answer, kind=src.kinds[k], skipped=False)


class _TrainExample:
  """Element index -> one unbatched training element (a question or, after them, a caption)."""

  def __init__(self, config, tokenizer, source):
    self._config, self._tokenizer, self._source = config, tokenizer, source
    self._src = get(config.data.name)

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    r, k = self._src.element(self._config.data, len(self._source), int(j))
    record = self._source[r]
    question, answer = self._src.texts(record, k)
    prefix = _prefix(self._tokenizer, question)
    suffix = self._tokenizer.encode(answer) + [self._tokenizer.eos_id]
    n, text_len = len(prefix) + len(suffix), self._config.data.text_len
    if n > text_len:
      raise _too_long(self._src, self._source, r, k, question, n, text_len, answer)
    is_prefix = np.arange(text_len) < len(prefix)
    is_real = np.arange(text_len) < n
    return dict(
        image=_image(record["image"], self._config),
        text=_padded(prefix + suffix, text_len),
        mask_ar=(~is_prefix).astype(np.int32),
        mask_loss=(is_real & ~is_prefix).astype(np.int32),
        mask_input=is_real.astype(np.int32))


def _local_batch_size(global_size: int, process_count: int, field: str) -> int:
  if global_size % process_count or global_size < process_count:
    raise UserError(f"{field} {global_size} does not split evenly over {process_count} processes; "
                    f"set --config.{field} to a positive multiple of {process_count}")
  return global_size // process_count


def _prefix(tokenizer, question: str) -> list[int]:
  return [tokenizer.bos_id] + tokenizer.encode(question)


def _too_long(src, source, r: int, k: int, question: str, n: int, text_len: int,
              answer: str | None = None) -> records_lib.BadRecord:
  what = f"{question!r}" + ("" if answer is None else f" with its answer {answer!r}")
  return source.bad(r, src.field(k), f"({what}) needs {n} tokens but --config.data.text_len is {text_len}",
                    f"set it to at least {n}")


def _padded(ids: list[int], length: int) -> np.ndarray:
  out = np.full([length], tokenizer_lib.PAD_ID, np.int32)
  out[:len(ids)] = ids
  return out


def _mask(n: int, length: int) -> np.ndarray:
  return (np.arange(length) < n).astype(np.int32)


def _image(image: np.ndarray, config) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [S, S, 3] in [-1, 1]."""
  size = config.data.image_size
  if config.data.blind:
    return np.zeros([size, size, 3], np.float32)
  if image.shape[:2] != (size, size):
    image = np.asarray(Image.fromarray(image).resize((size, size), Image.BILINEAR))
  return image.astype(np.float32) / 127.5 - 1.0


def _eval_padding_row(tokenizer, text_len: int, size: int) -> dict:
  return dict(image=np.zeros([size, size, 3], np.float32), text=_padded([tokenizer.bos_id], text_len),
              mask_input=_mask(1, text_len), prefix_len=1, valid=False, question="", answer="",
              kind="", skipped=False)


def _stack_eval(rows: list[dict]) -> dict:
  return dict(
      image=np.stack([r["image"] for r in rows]),
      text=np.stack([r["text"] for r in rows]),
      mask_input=np.stack([r["mask_input"] for r in rows]),
      prefix_len=np.array([r["prefix_len"] for r in rows], np.int32),
      valid=np.array([r["valid"] for r in rows], bool),
      skipped=np.array([r["skipped"] for r in rows], bool),
      question=[r["question"] for r in rows],
      answer=[r["answer"] for r in rows],
      kind=[r["kind"] for r in rows])

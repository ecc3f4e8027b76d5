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

from mm_jax.data import get, images
from mm_jax.data import records as records_lib
from mm_jax.data import rows as rows_lib
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
  """data.tokenizer (a SentencePiece .model or a tokenizer.json, e.g. an imported model's) or the
  dataset's own."""
  path = config.data.tokenizer
  if path:
    if not os.path.exists(path):
      raise UserError(f"data.tokenizer {path!r} does not exist; give a SentencePiece .model, a "
                      "tokenizer.json (or their directory), or '' for the dataset's own tokenizer")
    return tokenizer_lib.load(path)
  return tokenizer_lib.Tokenizer.load(get(config.data.name).tokenizer(config.data))


def row_layout(config, tokenizer) -> rows_lib.Row:
  """The rows of config's model: its image tokens in the sequence (and how many per image) or not."""
  from mm_jax import models  # pylint: disable=g-import-not-at-top  # models need data's registries
  own = models.family_of(config.model).rows
  if own is not None:  # a family with rows of its own (native: images at their own size)
    return own(config, tokenizer)
  n = models.tokens_per_image(config)
  # Mllama's consecutive image groups count the <|image|> tokens' rows: they stay in the text
  cross = config.model.get("family_options", {}).get("cross", {})
  keep = config.model.family == "cross" and cross.get("image_groups") == "consecutive"
  return rows_lib.Row(config, tokenizer, in_sequence=n > 0, tokens_per_image=n, keep_placeholder=keep)


def train_iterator(config, tokenizer, source, *, process_index: int,
                   process_count: int) -> grain.DatasetIterator:
  """Returns an endless, checkpointable iterator over this process's training batches, of
  b = global_batch_size // process_count rows of L tokens (data/rows.py has the layout and L):

    image      float32 [b, M, S, S, 3]  in [-1, 1] (all zeros if data.blind); M = data.max_images
    image_pos  int32   [b, M]        where each image sits (L: an empty slot)
    text       int32   [b, L]        the chat template's tokens, image slots in place, then pad
    mask_ar    int32   [b, L]        0 on the prefix (full attention), 1 on suffix and padding (causal)
    mask_loss  int32   [b, L]        1 on the assistant turns' tokens only
    mask_input int32   [b, L]        1 on every real token, 0 on padding
    segment    int32   [b, L]        the example of each token (data.packing: several per row), 0 pad
    positions  int32   [b, L]        RoPE positions, from 0 in every example
    skipped    int32   [b]           only under data.bad_records=skip: 1 where a bad element was replaced

  data.packing: rows of several examples (grain's first-fit packing over this process's share of
  the shuffled elements); its iterator state resumes with the same process count.
  """
  num = get(config.data.name).num_elements(config.data, len(source))
  row = row_layout(config, tokenizer)
  make = _TrainExample(config, row, source)
  if config.data.packing:
    if not hasattr(row, "packed"):
      raise UserError(f"data.packing is not supported by the {config.model.family} family's rows yet; "
                      "set --config.data.packing=False")
    return packed_batches(config, num, make, row, process_index=process_index,
                          process_count=process_count)
  if hasattr(row, "collate"):  # rows padded per batch (native: to the batch's patch bucket); with
    # several processes each makes only its rows, so all pad to the largest bucket (one shape)
    collate = lambda rows: row.collate(rows, largest=process_count > 1)
    return shuffled_batches(config, num, make, process_index=process_index, process_count=process_count,
                            collate=collate)
  return shuffled_batches(config, num, lambda j: row.pad(make(j)), process_index=process_index,
                          process_count=process_count)


def packed_batches(config, num_elements: int, make_element, row: rows_lib.Row, *, process_index: int,
                   process_count: int) -> grain.DatasetIterator:
  """Process p's share of the shuffled elements (every P-th), first-fit packed into rows of
  row.length, batched by b: endless and checkpointable (grain's packing state)."""
  b = _local_batch_size(config.global_batch_size, process_count, "global_batch_size")
  ids = grain.MapDataset.range(num_elements).shuffle(seed=config.seed).repeat(None)
  make = records_lib.guarded(make_element, num_elements, records_lib.policy(config.data))
  threads = config.data.num_threads
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, 2 * threads))
  skip = records_lib.policy(config.data) == "skip"
  ds = ids[process_index::process_count].map(make).to_iter_dataset(options)
  ds = grain.experimental.FirstFitPackIterDataset(
      ds, length_struct=dict(row.lengths(), **({"skipped": 1} if skip else {})), num_packing_bins=b,
      shuffle_bins=False)
  ds = ds.map(row.packed if not skip else _with_skipped(row.packed)).batch(b, drop_remainder=True)
  return iter(ds)


def _with_skipped(packed):
  def f(p):  # a row's count of replaced examples: SkipMeter sums them to the bad elements met
    return dict(packed(p), skipped=np.int32(p["skipped"].sum()))
  return f


def shuffled_batches(config, num_elements: int, make_element, *, process_index: int,
                     process_count: int, collate=None) -> grain.DatasetIterator:
  """Elements make_element(j), j in [0, num_elements): shuffled with config.seed and reshuffled every
  epoch, in global batches of config.global_batch_size of which process p of P makes rows
  [p*b, (p+1)*b), b = global_batch_size // P; endless, deterministic and checkpointable. The processes'
  batches, concatenated in order, are the 1-process batch (sharding.check_batch checks that the mesh
  places them so), and the state is the global batch index: a checkpoint written by P processes
  resumes with any other count (IteratorRestore). collate(list of elements) -> the batch (default:
  each key stacked)."""
  size = config.global_batch_size
  b = _local_batch_size(size, process_count, "global_batch_size")
  ids = grain.MapDataset.range(num_elements).shuffle(seed=config.seed).repeat(None)  # reseeded per epoch
  make = records_lib.guarded(make_element, num_elements, records_lib.policy(config.data))
  ds = ids.batch(size, drop_remainder=True).map(_Rows(make, process_index * b, b, collate))
  threads = config.data.num_threads
  # Elements are computed by index, so the order never depends on thread timing.
  options = grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(1, 2 * threads))
  return iter(ds.to_iter_dataset(options))


class _Rows:
  """Global batch of element ids -> this process's rows [start, start + size), made and stacked."""

  def __init__(self, make_element, start: int, size: int, collate=None):
    self._make, self._start, self._size, self._collate = make_element, start, size, collate

  def __call__(self, ids_G: np.ndarray) -> dict[str, np.ndarray]:
    rows = [self._make(j) for j in ids_G[self._start:self._start + self._size]]
    if self._collate is not None:
      return self._collate(rows)
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
  """Yields every element of the split once (this process's share), in a fixed order, its prompt:
  the conversation up to its last answer, ending in the chat template's generation prompt.

  Every process yields the same number of batches (the last ones padded), so collectives stay in step.
  image, image_pos, text (the prompt, then pad), mask_input, prefix_len int32 [b], valid bool [b]
  (False on padding rows: [bos] alone, prefix_len 1, so no row is empty, and rows of a bad element
  under data.bad_records=skip), skipped bool [b], and lists question (the last user turn's text),
  answer (the last assistant turn's), answers (every reference: the source's, else [answer]), kind
  (of the source's kinds; '' on padding rows), id.
  """
  batch_size = _local_batch_size(config.eval.batch_size, process_count, "eval.batch_size")
  src = get(config.data.name)
  row = row_layout(config, tokenizer)
  num_pairs = src.num_elements(config.data, len(source), train=False)
  num_batches = math.ceil(num_pairs / (batch_size * process_count))
  mine = list(range(process_index, num_pairs, process_count))
  mine += [None] * (num_batches * batch_size - len(mine))
  skip = records_lib.policy(config.data) == "skip"
  cached = (None, None)  # (record index, record or its BadRecord): the pairs of an image read once
  for start in range(0, len(mine), batch_size):
    rows = []
    for j in mine[start:start + batch_size]:
      if j is None:
        rows.append(_eval_padding_row(tokenizer, row))
        continue
      r, k = src.element(config.data, len(source), j)
      if cached[0] != r:
        cached = (r, _read(source, r))
      try:
        rows.append(_eval_row(src, row, source, r, k, cached[1]))
      except records_lib.BadRecord as e:
        if not skip:
          raise
        records_lib.note_skipped(e)
        rows.append(dict(_eval_padding_row(tokenizer, row), skipped=True))
    yield _stack_eval(rows)


def _read(source, r: int):
  try:
    return source[r]
  except records_lib.BadRecord as e:
    return e


def _eval_row(src, row: rows_lib.Row, source, r: int, k: int, record) -> dict:
  if isinstance(record, records_lib.BadRecord):
    raise record
  try:
    conv = src.conversation(record, k)
    ex, answer = row.prompt(conv)
  except (ValueError, KeyError, UserError) as e:
    raise _bad(src, source, r, k, e) from None
  out, kind = row.pad(ex), src.kind(record, k)
  user = [t for t in conv.turns if t.role == "user"]
  return dict({k: out[k] for k in _eval_keys(row)}, prefix_len=len(ex["text"]), valid=True,
              question=user[-1].text.strip() if user else "", answer=answer, kind=kind,
              answers=src.references(record, k) if src.references else [answer],
              id=conv.id or f"{source.split}/{r}/{kind or k}", skipped=False)


class _TrainExample:
  """Element index -> one unbatched, unpadded training example (data/rows.py)."""

  def __init__(self, config, row: rows_lib.Row, source):
    self._config, self._row, self._source = config, row, source
    self._src = get(config.data.name)

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    r, k = self._src.element(self._config.data, len(self._source), int(j))
    record = self._source[r]
    try:
      return self._row.train(self._src.conversation(record, k))
    except (ValueError, KeyError, UserError) as e:
      raise _bad(self._src, self._source, r, k, e) from None


def _bad(src, source, r: int, k: int, e: Exception) -> records_lib.BadRecord:
  """A conversation the row cannot hold (too long, too many images, a bad image or turn)."""
  if isinstance(e, rows_lib.TooLong):
    return source.bad(r, src.field(k), str(e), f"set --config.data.{e.field} to at least {e.n}")
  return source.bad(r, src.field(k), str(e), "fix or drop the record")


def _local_batch_size(global_size: int, process_count: int, field: str) -> int:
  if global_size % process_count or global_size < process_count:
    raise UserError(f"{field} {global_size} does not split evenly over {process_count} processes; "
                    f"set --config.{field} to a positive multiple of {process_count}")
  return global_size // process_count


def _padded(ids: list[int], length: int) -> np.ndarray:
  out = np.full([length], tokenizer_lib.PAD_ID, np.int32)
  out[:len(ids)] = ids
  return out


def _image(image: np.ndarray, config) -> np.ndarray:
  """uint8 [H, W, 3] -> float32 [S, S, 3] in [-1, 1] (the contrastive pairs' images)."""
  size = config.data.image_size
  if config.data.blind:
    return np.zeros([size, size, 3], np.float32)
  return images.preprocess("plain", image, size)


def _eval_keys(row) -> tuple[str, ...]:
  """The arrays an eval batch carries: the row's own (native: patches, patch_ids, positions)."""
  return getattr(row, "eval_keys", ("image", "image_pos", "text", "mask_input"))


def _eval_padding_row(tokenizer, row: rows_lib.Row) -> dict:
  if hasattr(row, "blank"):
    ex = row.blank([tokenizer.bos_id])
  else:
    ex = dict(text=np.asarray([tokenizer.bos_id], np.int32), mask_ar=np.zeros([1], np.int32),
              mask_loss=np.zeros([1], np.int32), image=np.zeros([0, row.size, row.size, 3], np.float32),
              image_pos=np.zeros([0], np.int32))
  out = row.pad(ex)
  return dict({k: out[k] for k in _eval_keys(row)}, prefix_len=1, valid=False, question="", answer="",
              kind="", answers=[], id="", skipped=False)


def _stack_eval(rows: list[dict]) -> dict:
  out = {k: np.stack([r[k] for r in rows]) for k, v in rows[0].items() if isinstance(v, np.ndarray)}
  out.update(prefix_len=np.array([r["prefix_len"] for r in rows], np.int32),
             valid=np.array([r["valid"] for r in rows], bool),
             skipped=np.array([r["skipped"] for r in rows], bool),
             **{k: [r[k] for r in rows] for k in ("question", "answer", "answers", "kind", "id")})
  return out

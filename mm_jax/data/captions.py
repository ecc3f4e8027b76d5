r"""(image, caption) pairs of a source (data.get(data.name)), for contrastive training and retrieval eval.

  it = train_iterator(config, tok, source, process_index=..., process_count=...)  # as pipeline's
  for batch in eval_batches(config, tok, source, indices, process_index=..., process_count=...): ...

Train: element j is record j of the split, shuffled, batched over processes and checkpointed as
pipeline.train_iterator's. Batches of b = global_batch_size // process_count:

  image  float32 [b, S, S, 3]  in [-1, 1]; S = data.image_size
  text   int32   [b, T]        caption tokens, eos, then pad (0) up to T = data.text_len (no bos)

Eval: the records `indices` once, image and text as above, index int32 [b] (-1 on padding rows) and
skipped bool [b]. Bad records (records.py): under "skip" a bad train element is replaced by the next
good one (batch["skipped"]), a bad eval record is a padding row, and captions() gives it None.
"""
import math

import numpy as np

from mm_jax.data import get
from mm_jax.data import pipeline
from mm_jax.data import records as records_lib
from mm_jax.data.pipeline import _image, _local_batch_size, _padded


def captions(config, source) -> list[str | None]:
  """The caption of every record of the split, in order (None: a bad record, under skip)."""
  src, out = get(config.data.name), []
  for i in range(len(source)):
    record = source.get(i)  # the source's policy: records.Records
    out.append(None if record is None else src.caption(record))
  return out


def caption_tokens(tokenizer, caption: str, text_len: int, record: int, source,
                   field: str = "caption") -> np.ndarray:
  ids = tokenizer.encode(caption) + [tokenizer.eos_id]
  if len(ids) > text_len:
    raise source.bad(record, field, f"({caption!r}) needs {len(ids)} tokens with eos but "
                     f"--config.data.text_len is {text_len}", f"set it to at least {len(ids)}")
  return _padded(ids, text_len)


class _Pair:
  """Record index -> one unbatched (image, caption tokens) element."""

  def __init__(self, config, tokenizer, source):
    self._config, self._tokenizer, self._source = config, tokenizer, source
    self._src = get(config.data.name)

  def __call__(self, j: int) -> dict[str, np.ndarray]:
    record = self._source[int(j)]
    return dict(image=_image(record["image"], self._config),
                text=caption_tokens(self._tokenizer, self._src.caption(record),
                                    self._config.data.text_len, int(j), self._source,
                                    self._src.field(self._src.caption_element)))


def train_iterator(config, tokenizer, source, *, process_index: int, process_count: int):
  """An endless, checkpointable iterator over this process's (image, caption) training batches."""
  return pipeline.shuffled_batches(config, len(source), _Pair(config, tokenizer, source),
                                   process_index=process_index, process_count=process_count)


def eval_batches(config, tokenizer, source, indices: list[int], *, process_index: int,
                 process_count: int):
  """Yields the records `indices` (this process's share) once, in a fixed order."""
  batch_size = _local_batch_size(config.eval.batch_size, process_count, "eval.batch_size")
  num_batches = math.ceil(len(indices) / (batch_size * process_count))
  mine = list(indices[process_index::process_count])
  mine += [-1] * (num_batches * batch_size - len(mine))
  pair = _Pair(config, tokenizer, source)
  skip = records_lib.policy(config.data) == "skip"
  size, text_len = config.data.image_size, config.data.text_len
  padding = dict(image=np.zeros([size, size, 3], np.float32), text=_padded([tokenizer.eos_id], text_len))
  for start in range(0, len(mine), batch_size):
    rows, index, skipped = [], [], []
    for j in mine[start:start + batch_size]:
      try:
        rows.append(padding if j < 0 else pair(j))
        index.append(j)
        skipped.append(False)
      except records_lib.BadRecord as e:
        if not skip:
          raise
        records_lib.note_skipped(e)
        rows.append(padding)
        index.append(-1)
        skipped.append(True)
    yield dict(image=np.stack([r["image"] for r in rows]), text=np.stack([r["text"] for r in rows]),
               index=np.array(index, np.int32), skipped=np.array(skipped, bool))

"""The (image, caption) pipeline: layout, determinism, disjoint process shards, per-epoch reshuffle,
resume from a saved state, and eval batches padded alike on every process."""
import copy
import hashlib

import numpy as np
import pytest

from mm_jax.data import captions
from mm_jax.errors import UserError


def _it(config, tokenizer, source, index=0, count=1):
  return captions.train_iterator(config, tokenizer, source, process_index=index, process_count=count)


def _keys(batch) -> list[str]:
  """One key per element: its image's hash (the images of a split are all different)."""
  return [hashlib.sha1(img.tobytes()).hexdigest() for img in batch["image"]]


def test_layout_caption_eos_pad(test_config, tokenizer, train_source):
  batch = next(_it(test_config, tokenizer, train_source))
  b, t, s = test_config.global_batch_size, test_config.data.text_len, test_config.data.image_size
  assert batch["image"].shape == (b, s, s, 3) and batch["text"].shape == (b, t)
  assert batch["image"].dtype == np.float32 and batch["text"].dtype == np.int32
  assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
  all_captions = set(captions.captions(test_config, train_source))
  for row in batch["text"]:
    n = int(np.argmax(row == tokenizer.eos_id)) + 1
    assert row[n - 1] == tokenizer.eos_id and (row[n:] == tokenizer.pad_id).all()
    assert tokenizer.bos_id not in row.tolist()
    assert tokenizer.decode(row.tolist()) in all_captions


def test_deterministic_and_reshuffled_every_epoch(test_config, tokenizer, train_source):
  per_epoch = len(train_source) // test_config.global_batch_size
  a, b = _it(test_config, tokenizer, train_source), _it(test_config, tokenizer, train_source)
  first = [_keys(next(a)) for _ in range(2 * per_epoch)]
  assert first == [_keys(next(b)) for _ in range(2 * per_epoch)]
  epoch1, epoch2 = sum(first[:per_epoch], []), sum(first[per_epoch:], [])
  assert sorted(epoch1) == sorted(epoch2) and len(set(epoch1)) == len(train_source)
  assert epoch1 != epoch2
  other = copy.deepcopy(test_config)
  other.seed = 1
  assert _keys(next(_it(other, tokenizer, train_source))) != first[0]


def test_process_shards_are_disjoint_and_cover_the_split(test_config, tokenizer, train_source):
  n = len(train_source) // 2 // (test_config.global_batch_size // 2)  # batches per epoch per process
  shards = [sum((_keys(next(it)) for _ in range(n)), [])
            for it in (_it(test_config, tokenizer, train_source, i, 2) for i in range(2))]
  assert not set(shards[0]) & set(shards[1])
  assert len(set(shards[0]) | set(shards[1])) == len(train_source)


def test_resumes_from_a_saved_state(test_config, tokenizer, train_source):
  it = _it(test_config, tokenizer, train_source)
  next(it)
  state = it.get_state()
  want = [_keys(next(it)) for _ in range(3)]
  fresh = _it(test_config, tokenizer, train_source)
  fresh.set_state(state)
  assert [_keys(next(fresh)) for _ in range(3)] == want


def test_eval_batches_pad_every_process_alike(test_config, tokenizer, train_source):
  indices = [0, 3, 5, 7, 8, 9, 11, 20, 21, 30, 33]
  shares = [list(captions.eval_batches(test_config, tokenizer, train_source, indices, process_index=i,
                                       process_count=2)) for i in range(2)]
  assert len(shares[0]) == len(shares[1]) == 2  # 11 records, 4 rows per process per batch
  seen = np.concatenate([b["index"] for share in shares for b in share])
  assert sorted(seen[seen >= 0].tolist()) == indices and (seen == -1).sum() == 16 - 11
  first = shares[0][0]
  caption = captions.captions(test_config, train_source)[first["index"][0]]
  assert tokenizer.decode(first["text"][0].tolist()) == caption


def test_too_long_caption_names_the_fix(test_config, tokenizer, train_source):
  config = copy.deepcopy(test_config)
  config.data.text_len = 4
  with pytest.raises(UserError, match="set it to at least"):
    next(_it(config, tokenizer, train_source))

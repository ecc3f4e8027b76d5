r"""Data faults: records that cannot be used, and the policy for them (config.data.bad_records).

  source = Records(tfds_source, policy)   # source[i]: a checked record, or BadRecord
  make = guarded(make_element, num, policy)  # element maker that applies the policy

A record is bad when its bytes cannot be read from the array_record file, it is not a tf.train.Example,
a field does not decode (e.g. garbled PNG bytes), is missing, has the wrong shape, count or encoding, or
its text needs more tokens than data.text_len (never truncated: a cut answer is a wrong target).
BadRecord (a UserError) names the split, the record index (in the TFDS split's array_record file), the
field, the reason and the fix. "fail" (default): the first bad record stops the run with that one line
(grain re-raises it in the main thread unchanged). "skip": see guarded (training) and the pipelines'
eval batches; the first LOG_LIMIT bad records a process meets are logged as warnings.
"""
import re
import threading

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import tensorflow_datasets as tfds

from mm_jax.errors import UserError

POLICIES = ("fail", "skip")
MAX_SEARCH = 1000  # bad elements in a row under skip before giving up
LOG_LIMIT = 10
_REGENERATE = "the dataset is damaged: delete {dir} to regenerate it"


def policy(data_cfg) -> str:
  """data_cfg.bad_records (config.data), checked."""
  value = data_cfg.bad_records
  if value not in POLICIES:
    raise UserError(f"data.bad_records={value!r} is unknown; set --config.data.bad_records to "
                    f"one of {', '.join(POLICIES)}")
  return value


class BadRecord(UserError):
  """A record (or one of its elements) that cannot be used: where, what and the fix, on one line."""

  def __init__(self, split: str, index: int, field: str, reason: str, fix: str):
    self.split, self.index, self.field, self.reason, self.fix = split, index, field, reason, fix
    super().__init__(f"{self.where} {reason}; {fix}, or set --config.data.bad_records=skip to "
                     "skip bad records")

  @property
  def where(self) -> str:
    field = "" if self.field == "record" else f" field {self.field!r}"
    return f"{self.split} record {self.index}{field}"


def _short(e: BaseException) -> str:
  """An exception as one short line, without object addresses."""
  msg = re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "", str(e))
  msg = " ".join(msg.split())[:160].rstrip(" :")
  return f"{type(e).__name__}: {msg}" if msg else type(e).__name__


class Records:
  """A TFDS array_record source whose items are checked records: source[i] returns the decoded
  record or raises BadRecord. len(), and the split's name and directory, as the TFDS source."""

  def __init__(self, source, bad_records: str = "fail"):
    self._source, self.bad_records = source, bad_records
    self.split = str(source.split)
    self.directory = str(source.dataset_info.data_dir)
    self._features = source.dataset_info.features
    image = self._features["image"] if "image" in self._features.keys() else None
    self._image_shape = None if image is None else tuple(image.shape)
    self._image_dtype = None if image is None else np.dtype(image.np_dtype)
    self._texts = {k: getattr(f, "shape", ()) for k, f in self._features.items()
                   if _is_text(f)}  # caption: (), questions/answers: (4,), a sequence: (None,)

  def __len__(self) -> int:
    return len(self._source)

  def bad(self, index: int, field: str, reason: str, fix: str | None = None) -> BadRecord:
    return BadRecord(self.split, index, field, reason,
                     fix or _REGENERATE.format(dir=self.directory))

  def __getitem__(self, i) -> dict:
    i = int(i)
    try:
      raw = self._source.data_source[i]
    except IndexError:
      raise
    except Exception as e:  # e.g. a chunk hash mismatch in the array_record file
      raise self.bad(i, "record", f"cannot be read ({_short(e)})") from None
    try:
      record = self._features.deserialize_example_np(raw)
    except Exception as e:
      raise self.bad(i, *self._diagnose(raw, e)) from None
    self._check(i, record)
    return record

  def get(self, i):
    """source[i], or None for a bad record under the skip policy."""
    try:
      return self[i]
    except BadRecord as e:
      if self.bad_records != "skip":
        raise
      note_skipped(e)
      return None

  def _diagnose(self, raw: bytes, error: Exception) -> tuple[str, str]:
    """(field, reason) of a record that does not decode: parse, then decode field by field."""
    parser = getattr(self._features, "_example_parser_np", None)  # tfds internals: best effort
    if parser is None:
      return "record", f"cannot be decoded ({_short(error)})"
    try:
      parsed = parser.parse_example(raw)
    except Exception as e:
      m = re.match(r"Error wh?ile parsing feature (\w+): (.*)", str(e))
      if m:
        return m[1], f"cannot be parsed ({m[2][:160]})"
      return "record", f"is not a readable tf.train.Example ({_short(e)})"
    for name in self._features.keys():
      try:
        self._features[name].decode_example_np(parsed[name])
      except Exception as e:
        return name, f"cannot be decoded ({_short(e)})"
    return "record", f"cannot be decoded ({_short(error)})"

  def _check(self, i: int, record: dict) -> None:
    if self._image_shape is None:  # encoded images (a conversation's): checked as they are decoded
      self._check_texts(i, record)
      return
    image = record.get("image")
    if image is None:
      raise self.bad(i, "image", "is missing")
    declared = self._image_shape  # None: any size there (shapes_sizes)
    if (image.ndim != len(declared) or image.dtype != self._image_dtype
        or any(d is not None and d != n for d, n in zip(declared, image.shape))):
      raise self.bad(i, "image", f"is {image.dtype} {tuple(image.shape)} but the dataset declares "
                     f"{self._image_dtype} {self._image_shape}")
    self._check_texts(i, record)

  def _check_texts(self, i: int, record: dict) -> None:
    for name, shape in self._texts.items():
      value = record.get(name)
      values = [value] if not shape else list(value) if value is not None else []
      if value is None or (shape and shape[0] is not None and len(values) != shape[0]):
        raise self.bad(i, name, "is missing" if value is None else
                       f"has {len(values)} entries, not {shape[0]}")
      for v in values:
        try:
          v.decode("utf-8")
        except (AttributeError, UnicodeDecodeError) as e:
          raise self.bad(i, name, f"is not UTF-8 text ({_short(e)})") from None


def _is_text(feature) -> bool:
  """A Text feature, or a Sequence of them."""
  inner = getattr(feature, "feature", feature)
  return isinstance(inner, tfds.features.Text)


_log_lock = threading.Lock()
_logged: set = set()


def note_skipped(e: BadRecord) -> None:
  """Logs the first LOG_LIMIT bad records this process skips (each once)."""
  with _log_lock:
    key = (e.split, e.index, e.field)
    if key in _logged or len(_logged) > LOG_LIMIT:
      return
    _logged.add(key)
    if len(_logged) <= LOG_LIMIT:
      logging.warning("data.bad_records=skip: skipping %s %s", e.where, e.reason)
    else:
      logging.warning("data.bad_records=skip: more bad records; they are only counted")


class guarded:  # pylint: disable=invalid-name
  """make_element(j) under the policy: 'fail' as is; 'skip' replaces a bad element j by the next good
  one, (j + 1) % num, (j + 2) % num, ..., and adds skipped (1 when replaced).

  A pure function of j, so batches keep their size and a resumed run reads bitwise the same batches;
  over an epoch the replaced rows are exactly the bad elements (SkipMeter sums them for the metrics).
  More than MAX_SEARCH bad elements in a row stop the run: the data is unusable, not a few bad records.
  Eval: the rows of a bad element are left out of the scores like padding rows (valid False / index
  -1) and flagged in batch["skipped"].
  """

  def __init__(self, make_element, num: int, bad_records: str):
    self._make, self._num, self._skip = make_element, num, bad_records == "skip"

  def __call__(self, j) -> dict:
    if not self._skip:
      return self._make(j)
    j = int(j)
    for step in range(min(self._num, MAX_SEARCH)):
      try:
        element = self._make((j + step) % self._num)
      except BadRecord as e:
        note_skipped(e)
        last = e
        continue
      return dict(element, skipped=np.int32(step > 0))
    raise UserError(f"{min(self._num, MAX_SEARCH)} elements in a row are bad under "
                    f"data.bad_records=skip, the last: {last.where} {last.reason}; {last.fix}")


class SkipMeter:
  """Counts the rows of global train batches that replaced a bad element, between log steps.

    skips = SkipMeter(config)
    state, out = train_step(state, skips.add(sharding.to_global(next(it), mesh)))  # every step
    metrics = {..., **skips.pop()}                                                  # at log steps

  pop() gives {"data_skipped": n} (global, every process the same) under skip, {} under fail.
  """

  def __init__(self, config):
    self._on, self._n, self._add = policy(config.data) == "skip", 0, None

  def add(self, global_batch: dict) -> dict:
    """Counts the batch's replaced rows (on device: no host sync until pop()); returns the batch."""
    if self._on:
      skipped = global_batch["skipped"]
      if self._add is None:  # replicated, so every process can read the global count
        replicated = NamedSharding(skipped.sharding.mesh, P())
        self._add = jax.jit(lambda n, x: n + jnp.sum(x), out_shardings=replicated)
      self._n = self._add(self._n, skipped)
    return global_batch

  def pop(self) -> dict:
    if not self._on:
      return {}
    n, self._n = int(jax.device_get(self._n)), 0
    return {"data_skipped": n}

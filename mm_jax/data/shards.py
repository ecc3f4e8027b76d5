r"""The shards of `python -m mm_jax.data.prepare`: input records -> checked examples -> ArrayRecord files.

  settings = Settings(out=DIR, bad_records="skip")
  stats = write_shard(Task(settings, "train", shard=3, num_shards=20, first=3000, records=[...]))
  write_metadata(DIR, {"train": [stats of shard 0, 1, ...]})     # dataset_info.json, features.json

FEATURES is what an example stores. A shard is written under DIR/.prepare/ and renamed into place once
complete, its statistics (DIR/.prepare/<shard>.json) first: a shard in place is finished, and a rerun
skips it. Images are stored as the files hold them (never decoded) after these checks, each a
ValueError naming the image and the reason: the path stays under its root (no "../" out, no absolute
path, no symlink out, unless allow_outside_root), the file exists, PIL identifies it and verify()
passes (no pixel decoded), and its header's width x height is at most max_image_pixels (a
decompression bomb is refused from the header). A video file (data/video.py's is_video: by its bytes)
instead must have a video stream whose first frame PyAV decodes, of at most max_image_pixels.
"""
import dataclasses
import io
import json
import os
import posixpath
import socket

from array_record.python import array_record_module
from etils import epath
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from tensorflow_datasets.core import example_serializer

from mm_jax.data import formats, video
from mm_jax.data import tokenizer as tokenizer_lib
from mm_jax.errors import UserError

NAME = "conversations"  # the dataset's name in its file names and dataset_info.json
WORK = ".prepare"       # DIR/.prepare: the plan, each shard's statistics, shards being written
SKIPPED_LISTED = 10     # skipped records listed (the first ones) per shard and per split
FEATURES = tfds.features.FeaturesDict({
    "id": tfds.features.Text(),             # the record's "id", else "<split>/<index>"
    "conversation": tfds.features.Text(),   # Conversation.to_json(): the turns, images by index
    "images": tfds.features.Sequence(       # the encoded bytes (PNG, JPEG, ...), by image index
        tfds.features.Tensor(shape=(), dtype=np.object_)),
})


_SERIALIZER = example_serializer.ExampleSerializer(FEATURES.get_serialized_info())


def serialize(ex: dict) -> bytes:
  """FEATURES.serialize_example(ex), its proto map in a fixed order: the same bytes in any process."""
  proto = _SERIALIZER.get_tf_example(FEATURES.encode_example(ex))
  return proto.SerializeToString(deterministic=True)


@dataclasses.dataclass(frozen=True)
class Settings:
  out: str
  bad_records: str = "fail"
  max_image_pixels: int = 50_000_000
  allow_outside_root: bool = False
  tokenizer: str = ""


@dataclasses.dataclass(frozen=True)
class Task:
  """Shard `shard` of `split`: its records (path, image root, format, line, raw record), the first at
  index `first` of the split."""
  settings: Settings
  split: str
  shard: int
  num_shards: int
  first: int
  records: list


class BadInput(UserError):
  """A record that cannot be imported: `<file>:<line> (<split> record <index>) <reason>; <fix>`."""

  def __init__(self, path: str, line: int, split: str, index: int, reason: str):
    self.path, self.line, self.split, self.index, self.reason = path, line, split, index, reason
    super().__init__(f"{self.where} {reason}, or set --bad_records=skip to leave bad records out")

  @property
  def where(self) -> str:
    return f"{self.path}:{self.line} ({self.split} record {self.index})"

  def __reduce__(self):  # the workers send it back pickled
    return BadInput, (self.path, self.line, self.split, self.index, self.reason)


def shard_name(split: str, shard: int, num_shards: int) -> str:
  """TFDS's default file name template: {DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}."""
  return f"{NAME}-{split}.array_record-{shard:05d}-of-{num_shards:05d}"


def stats_path(out: str, split: str, shard: int, num_shards: int) -> epath.Path:
  return epath.Path(out) / WORK / f"{shard_name(split, shard, num_shards)}.json"


def is_done(out: str, split: str, shard: int, num_shards: int) -> bool:
  return ((epath.Path(out) / shard_name(split, shard, num_shards)).exists()
          and stats_path(out, split, shard, num_shards).exists())


def resolve(root: str, rel: str, allow_outside: bool) -> epath.Path:
  """The image file `rel` names, relative to `root`; ValueError if it leaves the root."""
  fix = "keep images under --image_root, or set --allow_outside_root"
  if os.path.isabs(rel) or "://" in rel:
    if not allow_outside:
      raise ValueError(f"image {rel!r} is an absolute path; give it relative to --image_root {root}, "
                       "or set --allow_outside_root")
    return epath.Path(rel)
  norm = posixpath.normpath(rel)
  if not allow_outside and (norm == ".." or norm.startswith("../")):
    raise ValueError(f"image {rel!r} leaves --image_root {root}; {fix}")
  path = epath.Path(root) / rel
  if not allow_outside and "://" not in root:
    real, real_root = os.path.realpath(path), _realpath(root)
    if real != real_root and not real.startswith(real_root.rstrip(os.sep) + os.sep):
      raise ValueError(f"image {rel!r} is a symlink to {real}, outside --image_root {root}; {fix}")
  return path


_real_roots: dict = {}


def _realpath(root: str) -> str:
  if root not in _real_roots:
    _real_roots[root] = os.path.realpath(root)
  return _real_roots[root]


def load_image(root: str, rel: str, settings: Settings) -> bytes:
  """The checked encoded bytes of image `rel` (see the module docstring); ValueError: the reason."""
  path = resolve(root, rel, settings.allow_outside_root)
  try:
    data = path.read_bytes()
  except FileNotFoundError:
    raise ValueError(f"image {rel!r} does not exist under --image_root {root}; fix the path or "
                     "--image_root") from None
  except OSError as e:
    raise ValueError(f"image {rel!r} cannot be read ({e.strerror or e}); fix the file") from None
  if video.is_video(data):
    return _checked_video(rel, data, settings)
  limit = Image.MAX_IMAGE_PIXELS
  Image.MAX_IMAGE_PIXELS = None  # PIL's own bomb check would refuse first, at its own limit
  try:
    with Image.open(io.BytesIO(data)) as im:
      (w, h), kind = im.size, im.format
      if w * h <= settings.max_image_pixels:
        im.verify()  # the structure (e.g. PNG chunk CRCs), without decoding pixels
  except Exception as e:  # PIL raises many types for a broken file
    reason = "its format is not one PIL reads" if isinstance(e, Image.UnidentifiedImageError) else (
        " ".join(f"{type(e).__name__}: {e}".split())[:120])
    raise ValueError(f"image {rel!r} is not a readable image ({reason}); replace the file") from None
  finally:
    Image.MAX_IMAGE_PIXELS = limit
  if w * h > settings.max_image_pixels:
    raise ValueError(f"image {rel!r} is a {kind} whose header says {w}x{h} = {w * h} pixels, more "
                     f"than --max_image_pixels={settings.max_image_pixels} (a decompression bomb?); "
                     "replace the file, or raise --max_image_pixels if it is real")
  return data


def _checked_video(rel: str, data: bytes, settings: Settings) -> bytes:
  try:
    w, h = video.probe(data)
  except ValueError as e:
    raise ValueError(f"video {rel!r} is not a readable video ({e}); replace the file, or re-encode it "
                     "(e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)") from None
  if w * h > settings.max_image_pixels:
    raise ValueError(f"video {rel!r} has frames of {w}x{h} = {w * h} pixels, more than "
                     f"--max_image_pixels={settings.max_image_pixels}; scale it down, or raise "
                     "--max_image_pixels")
  return data


_tokenizers: dict = {}


def load_tokenizer(path: str):
  """The tokenizer at `path` (tokenizer.load where it exists, else Tokenizer.load), once a process."""
  if path not in _tokenizers:
    load = getattr(tokenizer_lib, "load", None) or tokenizer_lib.Tokenizer.load
    _tokenizers[path] = load(path)
  return _tokenizers[path]


def example(settings: Settings, raw, root: str, fmt: str, default_id: str):
  """(the stored example, its Conversation of image paths) of one raw record in format `fmt`;
  ValueError: why not."""
  conv = formats.get(fmt).parse(formats.parse_json(raw))
  images = [load_image(root, p, settings) for p in conv.images]
  conv = dataclasses.replace(conv, id=conv.id or default_id)
  return {"id": conv.id, "conversation": conv.to_json(), "images": images}, conv


def write_shard(task: Task) -> dict:
  """Writes the shard (see the module docstring) and returns its statistics; under bad_records=fail
  the first bad record raises BadInput and nothing of the shard is left."""
  s, out = task.settings, epath.Path(task.settings.out)
  name = shard_name(task.split, task.shard, task.num_shards)
  for stale in (out / WORK).glob(f"{name}.tmp-*"):  # of an interrupted run: one writer per shard
    stale.unlink(missing_ok=True)
  tmp = out / WORK / f"{name}.tmp-{socket.gethostname()}-{os.getpid()}"
  tokenizer = load_tokenizer(s.tokenizer) if s.tokenizer else None
  stats = {"shard": task.shard, "records": len(task.records), "examples": 0, "images": 0,
           "max_images": 0, "turns": 0, "skipped": 0, "skipped_first": [],
           "tokens": [] if tokenizer else None}
  writer, done = array_record_module.ArrayRecordWriter(os.fspath(tmp), "group_size:1"), False
  try:
    for k, (path, root, fmt, line, raw) in enumerate(task.records):
      index = task.first + k
      try:
        ex, conv = example(s, raw, root, fmt, f"{task.split}/{index}")
        serialized = serialize(ex)
      except ValueError as e:
        bad = BadInput(path, line, task.split, index, str(e))
        if s.bad_records != "skip":
          raise bad from None
        stats["skipped"] += 1
        if len(stats["skipped_first"]) < SKIPPED_LISTED:
          stats["skipped_first"].append(f"{bad.where} {bad.reason}")
        continue
      writer.write(serialized)
      stats["examples"] += 1
      stats["images"] += conv.num_images
      stats["max_images"] = max(stats["max_images"], conv.num_images)
      stats["turns"] += len(conv.turns)
      if tokenizer:
        stats["tokens"].append(sum(len(tokenizer.encode(p)) for t in conv.turns for p in t.parts
                                   if isinstance(p, str)))
    writer.close()
    stats["bytes"] = tmp.stat().length
    _write_json(stats_path(s.out, task.split, task.shard, task.num_shards), stats)
    tmp.replace(out / name)
    done = True
  finally:
    if not done:
      writer.close()
      tmp.unlink(missing_ok=True)
  return stats


def _write_json(path: epath.Path, value) -> None:
  tmp = path.parent / f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}"
  tmp.write_text(json.dumps(value))
  tmp.replace(path)  # readers never see half a file


def split_statistics(shards: list[dict]) -> dict:
  """The statistics of a split from its shards' (in shard order)."""
  tokens = [n for s in shards for n in (s["tokens"] or [])]
  out = {"records": sum(s["records"] for s in shards), "examples": sum(s["examples"] for s in shards),
         "images": sum(s["images"] for s in shards),
         "max_images": max((s["max_images"] for s in shards), default=0),
         "turns": sum(s["turns"] for s in shards), "skipped": sum(s["skipped"] for s in shards),
         "skipped_first": [w for s in shards for w in s["skipped_first"]][:SKIPPED_LISTED],
         "shards": len(shards), "bytes": sum(s["bytes"] for s in shards)}
  if all(s["tokens"] is not None for s in shards) and tokens:
    p50, p90, p99 = (int(v) for v in np.percentile(tokens, [50, 90, 99], method="inverted_cdf"))
    out["tokens"] = {"p50": p50, "p90": p90, "p99": p99, "max": max(tokens)}
  return out


def write_metadata(out: str, shards: dict[str, list[dict]], description: str = "") -> dict:
  """DIR/statistics.json, then TFDS's dataset_info.json and features.json (last: they make the
  dataset readable). shards: {split: the statistics of its shards, in order}. Returns the
  statistics, {split: split_statistics}."""
  stats = {split: split_statistics(s) for split, s in shards.items()}
  for split, st in stats.items():
    if not st["examples"]:
      first = f"; the first: {st['skipped_first'][0]}" if st["skipped_first"] else ""
      raise UserError(f"split {split} has no usable records ({st['skipped']} of {st['records']} "
                      f"skipped{first}); fix the records")
  _write_json(epath.Path(out) / "statistics.json", stats)
  template = tfds.core.ShardedFileTemplate(
      data_dir=epath.Path(out), template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
      dataset_name=NAME, filetype_suffix="array_record")
  split_infos = [tfds.core.SplitInfo(name=split, shard_lengths=[s["examples"] for s in ss],
                                     num_bytes=sum(s["bytes"] for s in ss),
                                     filename_template=template.replace(split=split))
                 for split, ss in shards.items()]
  # check_data reads an example through tf.data: TensorFlow is not needed here, the tests read it.
  tfds.folder_dataset.write_metadata(data_dir=out, features=FEATURES, split_infos=split_infos,
                                     check_data=False, description=description, disable_shuffling=True)
  return stats

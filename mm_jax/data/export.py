r"""Writes the shapes data, or a task generated over it, as LLaVA JSON or messages JSONL beside PNG (or
mp4) files.

  python -m mm_jax.data.export --out=DIR --format=llava|messages [--task=qa|multi_turn|multi_image]
      [--dataset=shapes|shapes_sizes|shapes_video] [--messages_parts] [--num_train=8000 --num_validation=200
      --num_test=500 --dataset_seed=0 --caption_ratio=1.0]  # configs/base.py's defaults; qa: the
                                                            # native elements
--dataset=shapes_sizes: the varied-size images (each PNG at its own size), the qa task.
--dataset=shapes_video: the clips as DIR/videos/<split>/<i>.mp4, the qa task (motion, appear, caption);
LLaVA-Video's "video" key in llava records, {"type": "video", "video": path} parts in messages records.

DIR/images/<split>/<i>.png: scene i of the split (shapes.png_bytes), each once. DIR/<split>.json (llava: a
JSON list) or DIR/<split>.jsonl (messages): shapes_tasks.conversations, ids "<split>/<index>/<kind>":
  llava     {"id", "kind", "image": "images/train/17.png", "conversations": [
               {"from": "human", "value": "<image>\n<question>"}, {"from": "gpt", "value": "<answer>"}]}
  messages  {"id", "kind", "messages": [{"role": "user", "content": "<image><question>"},
               {"role": "assistant", "content": "<answer>"}], "images": ["images/train/17.png"]}
            --messages_parts: each content a list, [{"type": "image"}, {"type": "text", "text": ...}]
multi_image: llava's "image" is a list, "<question> first: <image>\n second: <image>\n". Nothing is
written before the flags are checked and every conversation is made.
"""
import json
import os
import re
import types

from mm_jax.data import shapes, shapes_sizes, shapes_tasks, shapes_video
from mm_jax.data.conversation import Conversation, Image
from mm_jax.errors import UserError

FORMATS = ("llava", "messages")
DATASETS = ("shapes", "shapes_sizes", "shapes_video")
PLACEHOLDER = "<image>"
_LLAVA_ROLES = {"system": "system", "user": "human", "assistant": "gpt"}
_SIZES = ("num_train", "num_validation", "num_test")


def image_path(split: str, index: int) -> str:
  """The PNG of scene `index` of `split`, relative to the export's directory."""
  return f"images/{split}/{index}.png"


def video_path(split: str, index: int) -> str:
  """The mp4 of clip `index` of `split`, relative to the export's directory."""
  return f"videos/{split}/{index}.mp4"


def llava_record(conv: Conversation, key: str = "image") -> dict:
  """LLaVA's layout; conv.images are the image paths (key "video": LLaVA-Video's, the video paths)."""
  turns = []
  for t in conv.turns:  # each placeholder where its image is, with the newline the import drops after it
    value = "".join(PLACEHOLDER + "\n" if isinstance(p, Image) else p for p in t.parts)
    turns.append({"from": _LLAVA_ROLES[t.role], "value": value})
  image = [conv.images[i] for i in conv.image_order()]
  return {"id": conv.id, "kind": shapes_tasks.kind(conv),
          key: image[0] if len(image) == 1 else image, "conversations": turns}


def messages_record(conv: Conversation, parts: bool = False, video: bool = False) -> dict:
  """The messages layout: placeholders in the content (LLaMA-Factory) or, parts, content lists (TRL);
  video: conv.images are videos, each a {"type": "video", "video": path} part."""
  messages = []
  for t in conv.turns:
    if video:
      content = [{"type": "video", "video": conv.images[p.index]} if isinstance(p, Image)
                 else {"type": "text", "text": p} for p in t.parts]
    elif parts:
      content = [{"type": "image"} if isinstance(p, Image) else {"type": "text", "text": p}
                 for p in t.parts]
    else:
      content = "".join(PLACEHOLDER if isinstance(p, Image) else p for p in t.parts)
    messages.append({"role": t.role, "content": content})
  listed = {} if video else {"images": [conv.images[i] for i in conv.image_order()]}
  return {"id": conv.id, "kind": shapes_tasks.kind(conv), "messages": messages, **listed}


def check_args(out: str, fmt: str, task: str, sizes: dict, dataset_seed, caption_ratio,
               dataset: str = "shapes") -> None:
  """UserError naming the flag and the fix."""
  if not out:
    raise UserError("--out is required: the directory to write (created if missing)")
  if os.path.exists(out) and not os.path.isdir(out):
    raise UserError(f"--out={out} is a file; give a directory (created if missing)")
  if not fmt:
    raise UserError(f"--format is required: one of {', '.join(FORMATS)}")
  if fmt not in FORMATS:
    raise UserError(f"--format={fmt} is unknown; use one of {', '.join(FORMATS)}")
  if task not in shapes_tasks.TASKS:
    raise UserError(f"--task={task} is unknown; use one of {', '.join(shapes_tasks.TASKS)}")
  if dataset not in DATASETS:
    raise UserError(f"--dataset={dataset} is unknown; use one of {', '.join(DATASETS)}")
  if dataset != "shapes" and task != "qa":
    raise UserError(f"--task={task} is for --dataset=shapes only; {dataset} exports --task=qa")
  for name, n in sizes.items():
    if not isinstance(n, int) or n < 1:
      raise UserError(f"--{name}={n} must be a positive integer (every split needs an image)")
  if not isinstance(dataset_seed, int) or dataset_seed < 0:
    raise UserError(f"--dataset_seed={dataset_seed} must be an integer >= 0")
  if not caption_ratio >= 0:  # also NaN
    raise UserError(f"--caption_ratio={caption_ratio} must be a number >= 0 (0: no captions)")


def export(out: str, fmt: str, task: str = "qa", *, num_train: int, num_validation: int,
           num_test: int, dataset_seed: int, caption_ratio: float,
           messages_parts: bool = False, dataset: str = "shapes") -> dict[str, int]:
  """Writes the export into `out` (see the module docstring); returns {split: records}."""
  sizes = dict(num_train=num_train, num_validation=num_validation, num_test=num_test)
  check_args(out, fmt, task, sizes, dataset_seed, caption_ratio, dataset)
  data_cfg = types.SimpleNamespace(**sizes, dataset_seed=dataset_seed, caption_ratio=caption_ratio)
  # Every conversation is made before anything is written: a split too small for the task is an error
  # with DIR as it was.
  split_sizes = dict(train=num_train, validation=num_validation, test=num_test)
  video = dataset == "shapes_video"
  if video:
    made = shapes_video.generate(dataset_seed, split_sizes)
    files = {split: [mp4 for mp4, _, _ in items] for split, items in made.items()}
    convs = {split: list(shapes_tasks.qa(split, [(c, q) for _, c, q in items], data_cfg, video_path,
                                          shapes_video.SOURCE, caption=str))
             for split, items in made.items()}
  elif dataset == "shapes_sizes":
    made = shapes_sizes.generate(dataset_seed, split_sizes)
    files = {split: [(scene, size) for scene, size, _ in items] for split, items in made.items()}
    convs = {split: list(shapes_tasks.qa(split, [(scene, q) for scene, _, q in items], data_cfg,
                                          image_path, shapes_sizes.SOURCE))
             for split, items in made.items()}
  else:
    files = {split: [(scene, (shapes.IMAGE_SIZE,) * 2) for scene, _ in items]
             for split, items in shapes_tasks.generate(data_cfg).items()}
    convs = {split: list(shapes_tasks.conversations(split, task, data_cfg, image=image_path))
             for split in shapes.SPLITS}
  try:
    for split in shapes.SPLITS:
      if video:
        _write_files(out, split, video_path, files[split], bytes)
      else:
        _write_files(out, split, image_path, files[split], lambda x: shapes.png_bytes(*x))
      if fmt == "llava":
        records = [json.dumps(llava_record(c, "video" if video else "image"), ensure_ascii=False)
                   for c in convs[split]]
        _write_text(os.path.join(out, f"{split}.json"), "[\n" + ",\n".join(records) + "\n]\n")
      else:
        records = [json.dumps(messages_record(c, messages_parts, video), ensure_ascii=False)
                   for c in convs[split]]
        _write_text(os.path.join(out, f"{split}.jsonl"), "".join(r + "\n" for r in records))
  except OSError as e:
    reason = " ".join((e.strerror or str(e)).split())
    raise UserError(f"cannot write into --out={out} ({reason}); give a writable directory") from None
  return {split: len(c) for split, c in convs.items()}


def _write_files(out: str, split: str, path, items: list, to_bytes) -> None:
  """to_bytes(items[i]) into out/path(split, i), for each i."""
  folder, ext = os.path.split(os.path.join(out, path(split, 0)))
  os.makedirs(folder, exist_ok=True)
  ext = os.path.splitext(ext)[1]
  for name in os.listdir(folder):  # a bigger earlier export's files past this one's: not this data
    if (m := re.fullmatch(r"(\d+)" + re.escape(ext), name)) and int(m[1]) >= len(items):
      os.remove(os.path.join(folder, name))
  for i, item in enumerate(items):
    with open(os.path.join(out, path(split, i)), "wb") as f:
      f.write(to_bytes(item))


def _write_text(path: str, text: str) -> None:
  tmp = f"{path}.tmp{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(text)
  os.replace(tmp, path)  # readers never see half a file


def main() -> None:
  counts = export(_OUT.value, _FORMAT.value, _TASK.value, num_train=_NUM_TRAIN.value,
                  num_validation=_NUM_VALIDATION.value, num_test=_NUM_TEST.value,
                  dataset_seed=_DATASET_SEED.value, caption_ratio=_CAPTION_RATIO.value,
                  messages_parts=_MESSAGES_PARTS.value, dataset=_DATASET.value)
  ext = "json" if _FORMAT.value == "llava" else "jsonl"
  for split, n in counts.items():
    print(f"Wrote {n} {_TASK.value} records to {os.path.join(_OUT.value, f'{split}.{ext}')}", flush=True)


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top
  from mm_jax import cli  # pylint: disable=g-import-not-at-top
  from mm_jax.config import files  # pylint: disable=g-import-not-at-top
  _BASE = files.get_config("base").data  # the defaults: what training reads
  _OUT = flags.DEFINE_string("out", None, "The directory to write (created if missing).")
  _FORMAT = flags.DEFINE_enum("format", None, FORMATS, "llava: DIR/<split>.json; messages: .jsonl.")
  _TASK = flags.DEFINE_enum("task", "qa", shapes_tasks.TASKS, "The task (shapes_tasks.py).")
  _DATASET = flags.DEFINE_string("dataset", "shapes", f"One of {', '.join(DATASETS)}.")
  _MESSAGES_PARTS = flags.DEFINE_bool("messages_parts", False,
                                      "messages: content lists of typed parts (TRL) for placeholders.")
  _NUM_TRAIN = flags.DEFINE_integer("num_train", _BASE.num_train, "Images of the train split.")
  _NUM_VALIDATION = flags.DEFINE_integer("num_validation", _BASE.num_validation,
                                         "Images of the validation split.")
  _NUM_TEST = flags.DEFINE_integer("num_test", _BASE.num_test, "Images of the test split.")
  _DATASET_SEED = flags.DEFINE_integer("dataset_seed", _BASE.dataset_seed, "The generator's seed.")
  _CAPTION_RATIO = flags.DEFINE_float("caption_ratio", _BASE.caption_ratio,
                                      "qa: caption elements per train image (0: none).")
  cli.run("mm_jax.data.export", main)

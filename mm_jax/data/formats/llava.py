r"""LLaVA's format: a .json list (or JSONL) of records

  {"id": "000000033471", "image": "coco/train2017/000000033471.jpg",    # a path, a list, or none
   "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus?"},
                     {"from": "gpt", "value": "The bus is white and red."}]}

  conv = llava.parse(record)   # Turn("user", (Image(0), "What are the colors of the bus?")), ...

from: human -> user, gpt -> assistant, system -> system. Each "<image>" is the next image where it
stands and one "\n" right after it is dropped; LLaVA's preprocess_multimodal instead moves every
"<image>" to the start of its turn followed by "\n" (its data has them there anyway), and keeping the
place lets several images interleave with the text. A record with images and no "<image>" gets them
at the start of its first human turn, where LLaVA's data places them. "images" (LLaMA-Factory's
sharegpt records) is read as "image", and so is "video" (LLaVA-Video's records: a video file, its
"<image>" placeholder the same; a file's bytes tell a video from an image).
"""
from mm_jax.data.conversation import Conversation, Image, Turn
from mm_jax.data import formats

ROLES = {"human": "user", "gpt": "assistant", "system": "system"}


def detect(record: dict) -> bool:
  return "conversations" in record


def parse(record: dict) -> Conversation:
  key, images = _images(record)
  if "conversations" not in record:
    raise ValueError("the record has no 'conversations'; give a list of {\"from\", \"value\"} turns")
  turns = record["conversations"]
  formats.field_type(turns, "conversations", list)
  texts = []
  for i, t in enumerate(turns):
    formats.field_type(t, f"conversations[{i}]", dict)
    role = t.get("from")
    if role not in ROLES:
      raise ValueError(f"conversations[{i}].from is {role!r}, an unknown role; use one of "
                       f"{', '.join(ROLES)}")
    value = t.get("value")
    formats.field_type(value, f"conversations[{i}].value", str)
    texts.append((ROLES[role], value))
  placeholders = sum(v.count(formats.PLACEHOLDER) for _, v in texts)
  out, n = [], 0
  if images and not placeholders:
    first = next((k for k, (role, _) in enumerate(texts) if role == "user"), None)
    if first is None:
      raise ValueError(f"the record has {len(images)} images but no human turn to put them in; add one")
    lead = {first: [Image(k) for k in range(len(images))]}
    placeholders = n = len(images)
  else:
    lead = {}
  formats.check_count(placeholders, len(images), repr(key))
  for k, (role, value) in enumerate(texts):
    parts = formats.text_parts(value, n)
    n += value.count(formats.PLACEHOLDER)
    out.append(Turn(role, tuple(lead.get(k, []) + parts)))
  conv = Conversation(turns=tuple(out), images=tuple(images), id=str(record.get("id", "")))
  conv.check()
  return conv


MEDIA_KEYS = ("image", "images", "video")


def _images(record: dict) -> tuple[str, list[str]]:
  if len(given := [k for k in MEDIA_KEYS if k in record]) > 1:
    raise ValueError(f"the record has both {given[0]!r} and {given[1]!r}; give one of them")
  key = given[0] if given else "image"
  value = record.get(key)
  if value is None:
    return key, []
  paths = [value] if isinstance(value, str) else value
  formats.field_type(paths, key, list)
  for k, p in enumerate(paths):
    if not isinstance(p, str) or not p:
      raise ValueError(f"{key}[{k}] is {p!r}, not a file path; fix the record")
  return key, list(paths)

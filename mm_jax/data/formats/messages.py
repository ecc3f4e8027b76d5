r"""The "messages" format: JSONL of chat records, their images listed beside the messages

  {"messages": [{"role": "user", "content": "<image>What color is the circle?"},
                {"role": "assistant", "content": "red"}], "images": ["images/17.png"]}
  {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which?"}]},
                {"role": "assistant", "content": [{"type": "text", "text": "the left one"}]}],
   "images": ["a.png"]}

  conv = messages.parse(record)   # Turn("user", (Image(0), "What color is the circle?")), ...

role: user, assistant or system. A string content may hold "<image>" placeholders (LLaMA-Factory); in a
list content (TRL, HF chat templates) an image is a {"type": "image"} part. Both take the next path of
"images" in order; {"type": "image", "image": path} ("path" also) carries its own. A video is a
{"type": "video", "video": path} part (HF chat templates' and Qwen2-VL's), its path its own. The
conversation's images and videos are in the order the text places them.
"""
from mm_jax.data import formats
from mm_jax.data.conversation import ROLES, Conversation, Image, Turn


def detect(record: dict) -> bool:
  return "messages" in record


def parse(record: dict) -> Conversation:
  listed = record.get("images") or []
  formats.field_type(listed, "images", list)
  for k, p in enumerate(listed):
    if not isinstance(p, str) or not p:
      raise ValueError(f"images[{k}] is {p!r}, not an image path; fix the record")
  if "messages" not in record:
    raise ValueError("the record has no 'messages'; give a list of {\"role\", \"content\"} messages")
  msgs = record["messages"]
  formats.field_type(msgs, "messages", list)
  images, bare, turns = [], 0, []  # bare: placeholders that take the next of `listed`
  for i, m in enumerate(msgs):
    formats.field_type(m, f"messages[{i}]", dict)
    role = m.get("role")
    if role not in ROLES:
      raise ValueError(f"messages[{i}].role is {role!r}, an unknown role; use one of {', '.join(ROLES)}")
    content = m.get("content")
    if isinstance(content, str):
      n = content.count(formats.PLACEHOLDER)
      parts = formats.text_parts(content, len(images))
      images += listed[bare:bare + n] + [None] * max(0, bare + n - len(listed))
      bare += n
    elif isinstance(content, list):
      parts = []
      for j, p in enumerate(content):
        where = f"messages[{i}].content[{j}]"
        formats.field_type(p, where, dict)
        kind = p.get("type")
        if kind == "text":
          text = p.get("text")
          formats.field_type(text, f"{where}.text", str)
          if formats.PLACEHOLDER in text:
            raise ValueError(f"{where}.text holds {formats.PLACEHOLDER}; in a list content give each "
                             "image as its own {\"type\": \"image\"} part")
          parts.append(text)
        elif kind == "image":
          path = p.get("image", p.get("path"))
          if path is None:
            images.append(listed[bare] if bare < len(listed) else None)
            bare += 1
          elif isinstance(path, str) and path:
            images.append(path)
          else:
            raise ValueError(f"{where}.image is {path!r}, not an image path; fix the record")
          parts.append(Image(len(images) - 1))
        elif kind == "video":
          path = p.get("video", p.get("path"))
          if not isinstance(path, str) or not path:
            raise ValueError(f"{where}.video is {path!r}, not a video path; give the file as "
                             "{\"type\": \"video\", \"video\": PATH}")
          images.append(path)
          parts.append(Image(len(images) - 1))
        else:
          raise ValueError(f"{where}.type is {kind!r}; use 'text', 'image' or 'video'")
    else:
      formats.field_type(content, f"messages[{i}].content", str)  # raises: names the type
    turns.append(Turn(role, tuple(parts)))
  formats.check_count(bare, len(listed), "'images'")
  conv = Conversation(turns=tuple(turns), images=tuple(images), id=str(record.get("id", "")))
  conv.check()
  return conv

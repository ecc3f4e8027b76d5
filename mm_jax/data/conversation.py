r"""The one example schema: a conversation, an ordered list of turns, each a list of parts.

  conv = Conversation(turns=(Turn("user", (Image(0), "what color is the circle?")),
                             Turn("assistant", ("red",))), images=(png_bytes,), id="train/17")
  conv.check()                  # ValueError naming the problem: unknown role, no assistant turn, ...
  stored = conv.to_json()       # the text stored beside the image bytes (images by index)
  conv = Conversation.from_json(stored, images)

A part is a text (str) or an Image: a reference, by index, into the conversation's `images`, which hold
the encoded bytes (PNG, JPEG, ...) or, before import, the image files' paths. Every image is placed
exactly once, anywhere in any turn, so several images may sit in one turn or across turns. Every task
(vqa, captioning, multi-image comparison, multi-turn chat), every family and the evaluator read this.
"""
import dataclasses
import json
from typing import Union

ROLES = ("system", "user", "assistant")


@dataclasses.dataclass(frozen=True)
class Image:
  """An image part: images[index] of its conversation."""
  index: int


Part = Union[str, Image]


@dataclasses.dataclass(frozen=True)
class Turn:
  role: str                  # one of ROLES
  parts: tuple[Part, ...]

  @property
  def text(self) -> str:
    """The turn's text parts, joined (its images left out)."""
    return "".join(p for p in self.parts if isinstance(p, str))


@dataclasses.dataclass(frozen=True)
class Conversation:
  turns: tuple[Turn, ...]
  images: tuple = ()         # encoded image bytes (or, before import, file paths), by Image.index
  id: str = ""

  @property
  def num_images(self) -> int:
    return len(self.images)

  def image_order(self) -> list[int]:
    """The image indices in the order the parts place them."""
    return [p.index for t in self.turns for p in t.parts if isinstance(p, Image)]

  def check(self) -> None:
    """Raises ValueError (one line: the problem and the fix) if the conversation cannot be used."""
    if not self.turns:
      raise ValueError("the conversation has no turns; give at least a user and an assistant turn")
    for i, t in enumerate(self.turns):
      if t.role not in ROLES:
        raise ValueError(f"turn {i} has the unknown role {t.role!r}; use one of {', '.join(ROLES)}")
      for p in t.parts:
        if not isinstance(p, (str, Image)):
          raise ValueError(f"turn {i} has a part of type {type(p).__name__}; parts are text or images")
    if not any(t.role == "assistant" for t in self.turns):
      raise ValueError("the conversation has no assistant turn, so nothing to learn; add one")
    order = self.image_order()
    if sorted(order) != list(range(len(self.images))):
      raise ValueError(f"the conversation places images {order} but has {len(self.images)} "
                       "(each image must be placed exactly once); make the placeholders match the images")

  def to_json(self) -> str:
    """The turns as JSON, images by index (the bytes are stored beside it)."""
    turns = [{"role": t.role, "parts": [{"image": p.index} if isinstance(p, Image) else {"text": p}
                                        for p in t.parts]} for t in self.turns]
    return json.dumps({"id": self.id, "turns": turns}, ensure_ascii=False)

  @classmethod
  def from_json(cls, text: str, images=()) -> "Conversation":
    d = json.loads(text)
    turns = tuple(Turn(t["role"], tuple(Image(p["image"]) if "image" in p else p["text"]
                                        for p in t["parts"])) for t in d["turns"])
    return cls(turns=turns, images=tuple(images), id=d.get("id", ""))

  def until_last_answer(self) -> tuple["Conversation", str]:
    """(the conversation before its last assistant turn, that turn's text): the prompt and reference of
    an evaluation."""
    last = max(i for i, t in enumerate(self.turns) if t.role == "assistant")
    return dataclasses.replace(self, turns=self.turns[:last]), self.turns[last].text

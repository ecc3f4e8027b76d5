r"""Conversation tasks over the `shapes` scenes (data/shapes.py), as conversation.Conversation.

  for conv in shapes_tasks.conversations("test", "multi_image", config.data):  # images: PNG bytes
    prompt, reference = conv.until_last_answer()
    shapes_tasks.kind(conv)         # the per-kind score's key; conv.id is "<split>/<index>/<kind>"

TASKS:
  qa           exactly the native shapes elements, in Source.element's order: each record's 4 questions
               (kind QUESTION_KINDS[k]), then in train the caption elements (kind "caption").
  multi_turn   two of a record's questions, the image in the first user turn. Scored: the last assistant
               turn only (the first question and its reference answer are history); kind: its question's.
  multi_image  two scenes of one split, "which of the two images has more <color> shapes? first: <image>
               second: <image>" -> "first" |
               "second", never a tie; colours and answers balanced (multi_image_plan): the text alone
               gives 1/2.
A pure function of dataset_seed and the split sizes (and, for qa, caption_ratio).
"""
import collections
import functools
import itertools
from typing import Any, Callable, Iterator, Optional

import numpy as np

from mm_jax.data import shapes
from mm_jax.data.conversation import Conversation, Image, Turn
from mm_jax.errors import UserError

TASKS = ("qa", "multi_turn", "multi_image")
ANSWERS = ("first", "second")  # multi_image: the image with more shapes of the colour
CAPTION_KIND = "caption"
MULTI_IMAGE_KIND = "multi_image"
# Ordered pairs of distinct question kinds (12): record r of multi_turn asks pair r % 12.
_MULTI_TURN_KINDS = tuple(itertools.permutations(range(len(shapes.QUESTION_KINDS)), 2))
# spawn_key of the multi_image stream: apart from shapes' [seed, split, i, attempt] streams (a shorter
# entropy list alone would not be, numpy pads it with zeros).
_MULTI_IMAGE_STREAM = 1
_PLAN, _PARTNERS = 0, 1  # its two sub-streams: the (colour, answer) plan and the partners


def multi_image_question(color: str) -> str:
  return f"which of the two images has more {color} shapes?"


def kind(conv: Conversation) -> str:
  """The kind of a conversation of this module, from its id."""
  return conv.id.split("/")[2]


def generate(data_cfg) -> dict[str, list]:
  """shapes.generate for data_cfg's seed and all three split sizes (so scenes are those of the native
  dataset), after the same checks as the TFDS build. Cached: do not modify the lists."""
  config = shapes.builder_config(data_cfg)  # UserError on a non-positive size or a negative seed
  return _generate(config.seed, config.num_train, config.num_validation, config.num_test)


@functools.lru_cache(maxsize=1)
def _generate(seed: int, num_train: int, num_validation: int, num_test: int) -> dict[str, list]:
  return shapes.generate(seed, dict(train=num_train, validation=num_validation, test=num_test))


def conversations(split: str, task: str, data_cfg,
                  image: Optional[Callable[[str, int], Any]] = None) -> Iterator[Conversation]:
  """The conversations of `task` on `split`. data_cfg: num_train, num_validation, num_test,
  dataset_seed, caption_ratio (a config's data section or alike). image: (split, scene index) -> what
  Conversation.images holds (default: the PNG bytes, shapes.png_bytes; the export gives file paths)."""
  if split not in shapes.SPLITS:
    raise UserError(f"unknown split {split!r}; use one of {', '.join(shapes.SPLITS)}")
  if task not in TASKS:
    raise UserError(f"unknown task {task!r}; use one of {', '.join(TASKS)}")
  items = generate(data_cfg)[split]
  if image is None:
    image = functools.lru_cache(maxsize=None)(lambda s, i: shapes.png_bytes(items[i][0]))
  if task == "qa":
    return qa(split, items, data_cfg, image)
  if task == "multi_turn":
    return _multi_turn(split, items, image)
  return _multi_image(split, items, data_cfg.dataset_seed, image)


def qa(split, items, data_cfg, image, src=shapes.SOURCE, caption=shapes.caption) -> Iterator[Conversation]:
  """One question per conversation, the image before it: the elements of `src` (a dataset of the
  shapes records) over items [(scene, qa pairs)], caption(scene) the caption's answer. A record
  captioned again (caption_ratio > 1) adds "/<n>" to the id."""
  num = len(items)
  times_captioned = collections.Counter()
  for j in range(src.num_elements(data_cfg, num, train=split == "train")):
    r, k = src.element(data_cfg, num, j)  # the native enumeration itself, not a copy of it
    scene, qa = items[r]
    if k == src.caption_element:
      question, answer = shapes.CAPTION_PROMPT, caption(scene)
      repeat = times_captioned[r]
      times_captioned[r] += 1
      id_ = f"{split}/{r}/{CAPTION_KIND}" + (f"/{repeat}" if repeat else "")  # ids stay unique
    else:
      (question, answer), id_ = qa[k], f"{split}/{r}/{src.kinds[k]}"
    yield Conversation(turns=(Turn("user", (Image(0), question)), Turn("assistant", (answer,))),
                       images=(image(split, r),), id=id_)


def _multi_turn(split, items, image) -> Iterator[Conversation]:
  """One conversation per record, user/assistant twice: record r asks the kinds of ordered pair r % 12,
  so each kind is scored equally often."""
  for r, (_, qa) in enumerate(items):
    first, second = _MULTI_TURN_KINDS[r % len(_MULTI_TURN_KINDS)]
    (q1, a1), (q2, a2) = qa[first], qa[second]
    turns = (Turn("user", (Image(0), q1)), Turn("assistant", (a1,)),
             Turn("user", (q2,)), Turn("assistant", (a2,)))
    yield Conversation(turns=turns, images=(image(split, r),),
                       id=f"{split}/{r}/{shapes.QUESTION_KINDS[second]}")


def color_counts(scene: shapes.Scene) -> dict[str, int]:
  """{colour: shapes of that colour}, every colour of shapes.COLORS."""
  counts = collections.Counter(o.color for o in scene.objects)
  return {c: counts[c] for c in shapes.COLORS}


def multi_image_answer(first: shapes.Scene, second: shapes.Scene, color: str) -> Optional[str]:
  """"first" | "second": the scene with more shapes of `color`; None on a tie."""
  a, b = color_counts(first)[color], color_counts(second)[color]
  return None if a == b else ANSWERS[int(b > a)]


def multi_image_plan(seed: int, split: str, num: int) -> list[tuple[str, str]]:
  """The (colour, answer) wanted of each conversation, in blocks of the 12 pairs: two rounds of the 6
  colours, each in a random order with answers alternating, the second giving every colour its other
  answer. Any prefix then has colours and answers balanced within 1."""
  rng = _multi_image_rng(seed, split, _PLAN)
  colors, plan = list(shapes.COLORS), []
  while len(plan) < num:
    start = int(rng.integers(2))
    first = [(colors[c], ANSWERS[(start + k) % 2]) for k, c in enumerate(rng.permutation(len(colors)))]
    needing = {a: [c for c, b in first if b != a] for a in ANSWERS}  # the colours that still need a
    for a in ANSWERS:
      rng.shuffle(needing[a])
    start = int(rng.integers(2))
    second = [(needing[a].pop(), a) for a in (ANSWERS[(start + k) % 2] for k in range(len(colors)))]
    plan.extend(first + second)
  return plan[:num]


def _multi_image_rng(seed: int, split: str, stream: int) -> np.random.Generator:
  sequence = np.random.SeedSequence([seed, shapes.SPLITS.index(split)],
                                    spawn_key=(_MULTI_IMAGE_STREAM, stream))
  return np.random.default_rng(sequence)


def _multi_image(split, items, seed, image) -> Iterator[Conversation]:
  """Conversation i: scene i and a partner from the same split (so splits stay disjoint, as
  shapes.generate makes them) drawn among the scenes whose count of the planned colour differs, ordered
  to give the planned answer; both images before the question."""
  num = len(items)
  colors = list(shapes.COLORS)
  counts = np.array([[color_counts(scene)[c] for c in colors] for scene, _ in items])
  rng = _multi_image_rng(seed, split, _PARTNERS)
  for i, (color, answer) in enumerate(multi_image_plan(seed, split, num)):
    # The wanted colour, else (in a tiny split where no scene differs from scene i in it) the next one.
    start = colors.index(color)
    for c in ((start + d) % len(colors) for d in range(len(colors))):
      partners = np.flatnonzero(counts[:, c] != counts[i, c])  # never i itself
      if partners.size:
        break
    else:
      raise UserError(f"the {split} split's {num} image(s) cannot make a multi_image pair (no other "
                      f"image differs from image {i} in a colour's count); give that split more images")
    j = int(partners[rng.integers(partners.size)])
    more, less = (i, j) if counts[i, c] > counts[j, c] else (j, i)
    pair = (more, less) if answer == ANSWERS[0] else (less, more)
    # The question first, each image after its label: a cross-attention model tells the images apart
    # only by the tokens between them (its image keys carry no image index), which then know the colour.
    turns = (Turn("user", (multi_image_question(colors[c]) + " first: ", Image(0), " second: ", Image(1))),
             Turn("assistant", (answer,)))
    yield Conversation(turns=turns, images=tuple(image(split, s) for s in pair),
                       id=f"{split}/{i}/{MULTI_IMAGE_KIND}")

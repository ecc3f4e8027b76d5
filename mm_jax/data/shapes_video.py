r"""The `shapes_video` dataset: short videos of moving shapes, with questions that need more than one
frame.

Each record is an mp4 (PyAV, mpeg4) of FRAMES frames of SIZE x SIZE: 2-3 shapes on a plain background;
one of them moves MOVE px per frame left, right, up or down (a tubelet of 2 frames sees it
move 8 px, a quarter of its 32 px merge window); one other appears only from a frame in the
second half on. Two questions (kinds):
  motion  "which way did the red square move?" -> left | right | up | down   (one frame cannot tell)
  appear  "which shape appeared last?" -> circle | square | triangle         (the shape, not its colour)
and a caption, "red square moves left, blue circle appears, green triangle" (data.caption_ratio).
A TFDS builder (array_record; the video stored encoded), with its own SentencePiece tokenizer, a pure
function of dataset_seed. The native family reads the videos (data/native_rows.py, data/video.py).
"""
import io
import itertools

import av
import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

from mm_jax.data import shapes
from mm_jax.data.conversation import Conversation, Image as ImagePart, Turn
from mm_jax.data.source import Source

FRAMES, SIZE, FPS, MOVE = 4, 64, 4, 8
DIRECTIONS = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}
KINDS = ("motion", "appear")
_SHAPE_SIZE = 20  # as shapes' 16-24 px: smaller ones kept the tiny model at the text-only answers


def random_clip(rng: np.random.Generator):
  """(background, [(shape, colour, x0, y0, (dx, dy), first frame)], question texts and answers)."""
  shade = int(rng.integers(205, 241))
  background = (shade, shade - int(rng.integers(0, 8)), shade - int(rng.integers(0, 21)))
  kinds = rng.choice(3, size=3, replace=True)
  colors = rng.choice(len(shapes.COLORS), size=3, replace=False)
  direction = list(DIRECTIONS)[rng.integers(4)]
  dx, dy = DIRECTIONS[direction]
  objs = []
  # The mover: its place in the middle frame (all the baseline sees) does not depend on its direction:
  # on both axes in [mid, SIZE - size - mid], where every path fits (a wider range across the path
  # would tell the axis).
  mid = MOVE * (FRAMES // 2)
  xm, ym = (int(v) for v in rng.integers(mid, SIZE - _SHAPE_SIZE - mid + 1, size=2))
  objs.append((shapes.SHAPES[kinds[0]], list(shapes.COLORS)[colors[0]],
               xm - dx * mid, ym - dy * mid, (dx, dy), 0))
  # The late one, then (maybe) a still one; placed where they do not cover the mover's path much.
  n = 3 if rng.random() < 0.5 else 2
  for i in range(1, n):
    first = int(rng.integers(FRAMES // 2, FRAMES - 1)) if i == 1 else 0
    objs.append((shapes.SHAPES[kinds[i]], list(shapes.COLORS)[colors[i]],
                 int(rng.integers(0, SIZE - _SHAPE_SIZE + 1)), int(rng.integers(0, SIZE - _SHAPE_SIZE + 1)),
                 (0, 0), first))
  mover, late = objs[0], objs[1]
  qa = [(f"which way did the {mover[1]} {mover[0]} move?", direction),
        ("which shape appeared last?", late[0])]
  return background, objs, qa


def frames(background, objs) -> np.ndarray:
  """uint8 [FRAMES, SIZE, SIZE, 3] of the clip."""
  out = []
  for t in range(FRAMES):
    img = Image.new("RGB", (SIZE, SIZE), background)
    draw = ImageDraw.Draw(img)
    for shape, color, x0, y0, (dx, dy), first in objs:
      if t >= first:
        shapes.draw_shape(draw, shape, color, x0 + dx * MOVE * t, y0 + dy * MOVE * t, _SHAPE_SIZE)
    out.append(np.asarray(img))
  return np.stack(out)


def _caption(objs, direction: str) -> str:
  """What happens, object by object: "red square moves left, blue circle appears, green triangle"
  (the captioning task's target: dense supervision, as in shapes, that names both questions' facts)."""
  (ms, mc, *_), (ls, lc, *_), *still = objs
  still = [f"{c} {s}" for s, c, *_ in still]
  return ", ".join([f"{mc} {ms} moves {direction}", f"{lc} {ls} appears", *still])


def mp4(frames_TxHxWx3: np.ndarray) -> bytes:
  """The frames encoded as an mp4 (mpeg4 at a high bit rate: colours and edges survive)."""
  buf = io.BytesIO()
  with av.open(buf, "w", format="mp4") as c:
    s = c.add_stream("mpeg4", rate=FPS)
    s.width, s.height, s.pix_fmt, s.bit_rate = SIZE, SIZE, "yuv420p", 4_000_000
    for f in frames_TxHxWx3:
      for pkt in s.encode(av.VideoFrame.from_ndarray(f, "rgb24")):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)
  return buf.getvalue()


def generate(seed: int, sizes: dict[str, int]):
  """{split: [(frames' mp4, caption, qa pairs)]}: clip i of a split from rng [seed, 11, split, i,
  attempt], redrawn while it repeats an earlier clip (the splits are disjoint)."""
  seen, out = set(), {}
  for split_id, split in enumerate(shapes.SPLITS):
    if split not in sizes:
      continue
    items = []
    for i in range(sizes[split]):
      for attempt in itertools.count():
        rng = np.random.default_rng([seed, 11, split_id, i, attempt])
        background, objs, qa = random_clip(rng)
        if tuple(objs) not in seen:
          break
      seen.add(tuple(objs))
      caption = _caption(objs, qa[0][1])
      items.append((mp4(frames(background, objs)), caption, qa))
    out[split] = items
  return out


class ShapesVideo(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of shapes_video; built with a shapes.ShapesConfig (shapes.builder_config)."""
  VERSION = tfds.core.Version("1.4.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.",
                   "1.1.0": "Captions say which shape moves where and which appears.",
                   "1.2.0": "20 px shapes (were 14).",
                   "1.3.0": "4 frames, 8 px per frame (were 8 frames, 4 px); the mover's place in the middle "
                   "frame independent of its direction.",
                   "1.4.0": "The mover's place in the middle frame in the same range on both axes (the "
                   "range across its path told the axis)."}

  def _info(self) -> tfds.core.DatasetInfo:
    text2 = tfds.features.Sequence(tfds.features.Text(), length=len(KINDS))
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "video": tfds.features.Tensor(shape=(), dtype=np.object_), "caption": tfds.features.Text(),
            "questions": text2, "answers": text2}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    data = generate(cfg.seed, dict(train=cfg.num_train, validation=cfg.num_validation, test=cfg.num_test))
    return {split: self._generate_examples(items) for split, items in data.items()}

  def _generate_examples(self, items):
    for i, (video, caption, qa) in enumerate(items):
      yield i, {"video": video, "caption": caption, "questions": [q for q, _ in qa],
                "answers": [a for _, a in qa]}


def _texts(record, k: int) -> tuple[str, str]:
  if k == len(KINDS):
    return shapes.CAPTION_PROMPT, record["caption"].decode()
  return record["questions"][k].decode(), record["answers"][k].decode()


def _conversation(record, k: int) -> Conversation:
  question, answer = _texts(record, k)
  return Conversation(turns=(Turn("user", (ImagePart(0), question)), Turn("assistant", (answer,))),
                      images=(bytes(record["video"]),))


def _open(data_cfg, split: str, text_only: bool = False):
  return shapes._open(data_cfg, split, text_only, cls=ShapesVideo)  # pylint: disable=protected-access


SOURCE = Source(
    splits=shapes.SPLITS, open=_open,
    tokenizer=lambda data_cfg: shapes.tokenizer_path(shapes.build(data_cfg, ShapesVideo)),
    kinds=KINDS, texts=_texts, field=lambda k: "caption" if k == len(KINDS) else f"questions[{k}]",
    caption=lambda record: record["caption"].decode(), to_conversation=_conversation)

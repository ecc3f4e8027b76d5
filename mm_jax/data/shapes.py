r"""The `shapes` dataset: coloured shapes on a plain background, with a caption and 4 questions each.

Every image is 64x64 RGB with 1-4 shapes (circle, square, triangle; 6 colours), at most one per quadrant.
Each carries one (question, answer) per kind of QUESTION_KINDS, single-word answers balanced so that
the text alone gives little (about 1/3, test_shapes):

  color     "what color is the circle?" -> "red"          (or "... the shape in the top left?")
  shape     "what shape is in the top left?" -> "square"  3 shapes; an occupied quadrant
  count     "how many shapes|red shapes|squares are there?" -> "0".."4" (digits)
  presence  "is there a green triangle?" -> "yes" | "no"  50/50

build(data_cfg) builds the TFDS dataset (array_record) under data_cfg.data_dir on first use and trains
the SentencePiece tokenizer on its text; all of it is a pure function of dataset_seed. SOURCE: its record.
"""
import collections
import dataclasses
import io
import itertools
import logging as std_logging
import os
from typing import NamedTuple

from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np
from PIL import Image, ImageDraw
import tensorflow_datasets as tfds

from mm_jax.data import records
from mm_jax.data import tokenizer as tokenizer_lib
from mm_jax.data.source import Source
from mm_jax.errors import UserError

IMAGE_SIZE = 64
SHAPES = ("circle", "square", "triangle")
COLORS = {  # Well apart in hue, all far from the light background.
    "red": (215, 30, 30), "green": (30, 160, 50), "blue": (30, 70, 220),
    "yellow": (235, 200, 0), "purple": (130, 40, 180), "orange": (245, 125, 10)}
REGIONS = ("top left", "top right", "bottom left", "bottom right")  # Quadrants, row-major.
QUESTION_KINDS = ("color", "shape", "count", "presence")
SPLITS = ("train", "validation", "test")
CAPTION_PROMPT = "what is there?"  # the question of a record's caption element
TOKENIZER_FILE = "tokenizer.model"
_QUADRANT = IMAGE_SIZE // 2
_MIN_SIZE, _MAX_SIZE = 16, 24
_JITTER = 3
# Relative weight of each count answer when choosing what to count: high counts are rarely possible,
# so they are favoured whenever they are; this keeps the most common answer of each count template
# near 1/3 (measured on 4000 scenes; uniform weights give 0.46).
_COUNT_WEIGHTS = (1.0, 1.0, 4.0, 12.0, 40.0)


class _TfdsNoise(std_logging.Filter):
  """Drops two tfds warnings every run would print: the builder configs are custom by design, and PIL
  decodes the small PNGs well without OpenCV. (tfds logs through absl's logger.)"""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith(("Using custom data configuration",
                                           "OpenCV is not installed"))


std_logging.getLogger("absl").addFilter(_TfdsNoise())


class Obj(NamedTuple):
  region: int  # Index into REGIONS.
  shape: str
  color: str
  x: int  # Top-left corner of the bounding box, pixels.
  y: int
  size: int


class Scene(NamedTuple):
  background: tuple[int, int, int]
  objects: tuple[Obj, ...]  # Sorted by region.


def random_scene(rng: np.random.Generator) -> Scene:
  shade = int(rng.integers(205, 241))
  tint = int(rng.integers(0, 21))  # 0: neutral grey; larger: beige.
  background = (shade, shade - tint // 3, shade - tint)
  num = int(rng.integers(1, 5))
  objects = []
  for region in sorted(rng.choice(4, size=num, replace=False).tolist()):
    size = int(rng.integers(_MIN_SIZE, _MAX_SIZE + 1))
    # Near the quadrant's centre (jitter +-_JITTER px, at least 1 px from its edges): every shape then
    # spans the same 2x2 block of 16 px patches, which a tiny ViT learns in minutes.
    x, y = (_QUADRANT * off + (_QUADRANT - size) // 2 + int(rng.integers(-_JITTER, _JITTER + 1))
            for off in (region % 2, region // 2))
    objects.append(Obj(region, SHAPES[rng.integers(3)], list(COLORS)[rng.integers(6)], x, y, size))
  return Scene(background, tuple(objects))


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, x: int, y: int, size: int) -> None:
  """One shape of SHAPES in a size x size box at (x, y): the drawing every shapes dataset shares."""
  box, fill = (x, y, x + size - 1, y + size - 1), COLORS[color]
  if shape == "circle":
    draw.ellipse(box, fill=fill)
  elif shape == "square":
    draw.rectangle(box, fill=fill)
  else:
    draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)


def render(scene: Scene, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> np.ndarray:
  """Returns the scene as uint8 [H, W, 3] on a canvas of size (W, H) (default 64 x 64)."""
  img = Image.new("RGB", size, scene.background)
  draw = ImageDraw.Draw(img)
  for o in scene.objects:
    draw_shape(draw, o.shape, o.color, o.x, o.y, o.size)
  return np.asarray(img)


def png_bytes(scene: Scene, size: tuple[int, int] = (IMAGE_SIZE, IMAGE_SIZE)) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(render(scene, size)).save(buf, format="PNG")
  return buf.getvalue()


def caption(scene: Scene) -> str:
  """Every shape by quadrant, in few tokens (it is also a training target): 'top left red circle, ...'.

  Region first: the caption then exercises the region -> object lookup that the questions need.
  """
  return ", ".join(f"{REGIONS[o.region]} {o.color} {o.shape}" for o in scene.objects)


def _a(word: str) -> str:
  return "an" if word[0] in "aeiou" else "a"


def questions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, str]]:
  """Returns one (question, answer) per kind of QUESTION_KINDS, in that order."""
  objs = scene.objects
  shape_counts = collections.Counter(o.shape for o in objs)
  # 1. Colour: of a shape type that occurs once; if none does (4 shapes), of the shape in a region.
  unique = [o for o in objs if shape_counts[o.shape] == 1]
  if unique:
    o = unique[rng.integers(len(unique))]
    color_qa = (f"what color is the {o.shape}?", o.color)
  else:
    o = objs[rng.integers(len(objs))]
    color_qa = (f"what color is the shape in the {REGIONS[o.region]}?", o.color)
  # 2. Shape in an occupied region.
  o = objs[rng.integers(len(objs))]
  shape_qa = (f"what shape is in the {REGIONS[o.region]}?", o.shape)
  # 3. Count: pick the template (total, per colour, per shape), then the answer (weighted, among those
  # possible), then a question of that template with that answer.
  color_counts = collections.Counter(o.color for o in objs)
  candidates = (
      {len(objs): ["how many shapes are there?"]},
      _group_by_count({f"how many {c} shapes are there?": color_counts[c] for c in COLORS}),
      _group_by_count({f"how many {s}s are there?": shape_counts[s] for s in SHAPES}))
  by_answer = candidates[rng.integers(3)]
  answers = sorted(by_answer)
  p = np.array([_COUNT_WEIGHTS[a] for a in answers])
  count = answers[rng.choice(len(answers), p=p / p.sum())]
  count_qa = (by_answer[count][rng.integers(len(by_answer[count]))], str(count))
  # 4. Presence, 50/50: a (colour, shape) pair from the image, or one absent from it.
  present = sorted({(o.color, o.shape) for o in objs})
  if rng.random() < 0.5:
    (c, s), answer = present[rng.integers(len(present))], "yes"
  else:
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    (c, s), answer = absent[rng.integers(len(absent))], "no"
  presence_qa = (f"is there {_a(c)} {c} {s}?", answer)
  return [color_qa, shape_qa, count_qa, presence_qa]


def _group_by_count(counts: dict[str, int]) -> dict[int, list[str]]:
  out = collections.defaultdict(list)
  for question, count in counts.items():
    out[count].append(question)
  return out


def generate(seed: int, sizes: dict[str, int]) -> dict[str, list[tuple[Scene, list[tuple[str, str]]]]]:
  """Returns {split: [(scene, qa pairs)]} for the splits in `sizes`, no scene repeated across all of them.

  Scene i of a split comes from np.random.default_rng([seed, split_id, i, attempt]), and a scene whose
  objects (with positions) already occur in an earlier scene or split is redrawn with the next attempt,
  so splits are disjoint.
  """
  seen, out = set(), {}
  for split_id, split in enumerate(SPLITS):
    if split not in sizes:
      continue
    items = []
    for i in range(sizes[split]):
      for attempt in itertools.count():
        rng = np.random.default_rng([seed, split_id, i, attempt])
        scene = random_scene(rng)
        if scene.objects not in seen:
          break
      seen.add(scene.objects)
      items.append((scene, questions(scene, rng)))
    out[split] = items
  return out


@dataclasses.dataclass(eq=False)
class ShapesConfig(tfds.core.BuilderConfig):
  """Split sizes and seed: part of the builder's identity, so two configs never share a directory."""
  num_train: int = 0
  num_validation: int = 0
  num_test: int = 0
  seed: int = 0


def builder_config(data_cfg) -> ShapesConfig:
  sizes = dict(num_train=data_cfg.num_train, num_validation=data_cfg.num_validation,
               num_test=data_cfg.num_test)
  for field, n in sizes.items():
    if not isinstance(n, int) or n < 1:
      raise UserError(f"data.{field} is {n!r} but every split needs at least 1 image; "
                      f"set --config.data.{field} to a positive integer")
  seed = data_cfg.dataset_seed
  if not isinstance(seed, int) or seed < 0:
    raise UserError(f"data.dataset_seed is {seed!r}; set --config.data.dataset_seed to an integer >= 0")
  name = f"tr{sizes['num_train']}-va{sizes['num_validation']}-te{sizes['num_test']}-s{seed}"
  return ShapesConfig(name=name, seed=seed, **sizes)


class Shapes(tfds.core.GeneratorBasedBuilder):
  """TFDS builder; always constructed with a `ShapesConfig` from `builder_config`."""
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}

  def _info(self) -> tfds.core.DatasetInfo:
    text4 = tfds.features.Sequence(tfds.features.Text(), length=4)
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3)),
            "caption": tfds.features.Text(),
            "questions": text4,  # One per QUESTION_KINDS, in that order.
            "answers": text4,
        }),
        disable_shuffling=True)  # Record i of a split is scene i of `generate`.

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    cfg = self.builder_config
    data = generate(cfg.seed, dict(train=cfg.num_train, validation=cfg.num_validation, test=cfg.num_test))
    return {split: self._generate_examples(items) for split, items in data.items()}

  def _generate_examples(self, items):
    for i, (scene, qa) in enumerate(items):
      # PNG bytes: tfds needs TensorFlow to encode numpy images.
      yield i, {"image": png_bytes(scene), "caption": caption(scene),
                "questions": [q for q, _ in qa], "answers": [a for _, a in qa]}


def build(data_cfg, cls: type = None) -> tfds.core.GeneratorBasedBuilder:
  """Returns the builder for `data_cfg`, building the data and its tokenizer first if needed. cls: the
  builder class (Shapes; shapes_sizes.ShapesSizes: the same records at varied sizes)."""
  cls = cls or Shapes
  config = builder_config(data_cfg)
  data_dir = data_cfg.data_dir
  if jax.process_index() == 0:
    version_dir = os.path.join(data_dir, cls.name, config.name, str(cls.VERSION))
    if not os.path.exists(os.path.join(version_dir, TOKENIZER_FILE)):
      _check_writable(data_dir)  # only when something must be written: a built copy may be read-only
    builder = cls(config=config, data_dir=data_dir)
    if not builder.is_prepared():
      logging.info("Building %s/%s in %s", cls.name, config.name, data_dir)
      builder.download_and_prepare(file_format="array_record")
    path = tokenizer_path(builder)
    if not os.path.exists(path):
      train = records.Records(builder.as_data_source()["train"], records.policy(data_cfg))
      tokenizer_lib.train(_texts(train), data_cfg.vocab_size, path)
    elif (size := tokenizer_lib.Tokenizer.load(path).vocab_size) > data_cfg.vocab_size:
      # vocab_size is not part of the data's identity: never silently use a bigger tokenizer.
      raise UserError(f"{path} has {size} pieces but data.vocab_size is {data_cfg.vocab_size}; set "
                      f"--config.data.vocab_size to {size} or --config.data.data_dir to a new directory")
  if jax.process_count() > 1:  # The others wait for process 0 to finish writing.
    multihost_utils.sync_global_devices("shapes_build")
  if jax.process_index() != 0:
    builder = cls(config=config, data_dir=data_dir)
  return builder


def tokenizer_path(builder: Shapes) -> str:
  return os.path.join(builder.data_dir, TOKENIZER_FILE)


def _open(data_cfg, split: str, text_only: bool = False, cls: type = None):
  """The TFDS random-access source of `split`, built on first use; text_only: images left undecoded."""
  builder = build(data_cfg, cls)
  if text_only:
    return builder.as_data_source(decoders={"image": tfds.decode.SkipDecoding()})[split]
  return builder.as_data_source()[split]


def _element_texts(record, k: int) -> tuple[str, str]:
  """(question, answer) of element k of a record: question k, or the caption prompt and caption."""
  if k == len(QUESTION_KINDS):
    return CAPTION_PROMPT, record["caption"].decode()
  return record["questions"][k].decode(), record["answers"][k].decode()


def _texts(source: records.Records):
  for i in range(len(source)):
    record = source.get(i)  # None: a bad record under data.bad_records=skip
    if record is not None:
      yield from (t.decode() for t in (*record["questions"], *record["answers"], record["caption"]))


def _check_writable(data_dir: str) -> None:
  """Creates `data_dir` and a probe file in it: permission bits alone say nothing when running as root."""
  probe = os.path.join(data_dir, f".write_probe_{jax.process_index()}_{os.getpid()}")
  try:
    os.makedirs(data_dir, exist_ok=True)
    with open(probe, "w") as f:
      f.write("ok")
    os.remove(probe)
  except OSError as e:
    reason = " ".join((e.strerror or str(e)).split())  # One line.
    raise UserError(f"data_dir {data_dir!r} is not writable ({reason}); "
                    "set --config.data.data_dir to a writable directory") from None


SOURCE = Source(
    splits=SPLITS, open=_open, tokenizer=lambda data_cfg: tokenizer_path(build(data_cfg)),
    kinds=QUESTION_KINDS, texts=_element_texts,
    field=lambda k: "caption" if k == len(QUESTION_KINDS) else f"questions[{k}]",
    caption=lambda record: record["caption"].decode())

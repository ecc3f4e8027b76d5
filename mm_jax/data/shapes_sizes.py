r"""The `shapes_sizes` dataset: the shapes records (caption, colour / shape / count / presence questions)
with every image at its own size and aspect, and shapes small enough that a fixed 64 px resize loses
their form.

Each image is W x H, both drawn from [SIDE_MIN, SIDE_MAX] apart (aspect up to 5:4), with 1-4 shapes
of 16-24 px (as in shapes: 1-1.5 patches of 16 px), one per quadrant near its centre (+-3 px).
Resized to 64 x 64 a shape is 6-12 px (the tiny fixed-size model then learns only to count them);
the native family sees it at its own size (data/native_rows.py).
The questions are shapes.questions' (quadrants are the image's). Built as its own TFDS builder
(array_record) with its own SentencePiece tokenizer, a pure function of dataset_seed.
"""
import itertools

import numpy as np
import tensorflow_datasets as tfds

from mm_jax.data import shapes
from mm_jax.data.source import Source

SIDE_MIN, SIDE_MAX = 128, 160
_MIN_SIZE, _MAX_SIZE, _JITTER = 16, 24, 3


def random_scene(rng: np.random.Generator) -> tuple[shapes.Scene, tuple[int, int]]:
  w, h = (int(rng.integers(SIDE_MIN, SIDE_MAX + 1)) for _ in range(2))
  shade = int(rng.integers(205, 241))
  background = (shade, shade - int(rng.integers(0, 8)), shade - int(rng.integers(0, 21)))
  objects = []
  for region in sorted(rng.choice(4, size=int(rng.integers(1, 5)), replace=False).tolist()):
    size = int(rng.integers(_MIN_SIZE, _MAX_SIZE + 1))
    # Near its quadrant's centre (jitter +-_JITTER px), as in shapes: where a shape sits is learnable,
    # what it is needs the pixels.
    x, y = ((off * side // 2) + (side // 2 - size) // 2 + int(rng.integers(-_JITTER, _JITTER + 1))
            for off, side in ((region % 2, w), (region // 2, h)))
    objects.append(shapes.Obj(region, shapes.SHAPES[rng.integers(3)], list(shapes.COLORS)[rng.integers(6)],
                              x, y, size))
  return shapes.Scene(background, tuple(objects)), (w, h)


def generate(seed: int, sizes: dict[str, int]):
  """{split: [(scene, (w, h), qa pairs)]}: scene i of a split from rng [seed, split, i, attempt],
  redrawn while its objects repeat an earlier scene's (the splits are disjoint)."""
  seen, out = set(), {}
  for split_id, split in enumerate(shapes.SPLITS):
    if split not in sizes:
      continue
    items = []
    for i in range(sizes[split]):
      for attempt in itertools.count():
        rng = np.random.default_rng([seed, 7, split_id, i, attempt])
        scene, size = random_scene(rng)
        if (scene.objects, size) not in seen:
          break
      seen.add((scene.objects, size))
      items.append((scene, size, shapes.questions(scene, rng)))
    out[split] = items
  return out


class ShapesSizes(tfds.core.GeneratorBasedBuilder):
  """TFDS builder of shapes_sizes; built with a shapes.ShapesConfig (shapes.builder_config)."""
  VERSION = tfds.core.Version("1.3.0")
  RELEASE_NOTES = {"1.0.0": "Initial release.", "1.1.0": "Shapes near their quadrant's centre.",
                   "1.2.0": "128-160 px canvases, 14-18 px shapes within +-3 px of the centre.",
                   "1.3.0": "16-24 px shapes, as in shapes."}

  def _info(self) -> tfds.core.DatasetInfo:
    text4 = tfds.features.Sequence(tfds.features.Text(), length=4)
    return self.dataset_info_from_configs(
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)), "caption": tfds.features.Text(),
            "questions": text4, "answers": text4}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    cfg = self.builder_config
    data = generate(cfg.seed, dict(train=cfg.num_train, validation=cfg.num_validation, test=cfg.num_test))
    return {split: self._generate_examples(items) for split, items in data.items()}

  def _generate_examples(self, items):
    for i, (scene, size, qa) in enumerate(items):
      yield i, {"image": shapes.png_bytes(scene, size), "caption": shapes.caption(scene),
                "questions": [q for q, _ in qa], "answers": [a for _, a in qa]}


def _open(data_cfg, split: str, text_only: bool = False):
  return shapes._open(data_cfg, split, text_only, cls=ShapesSizes)  # pylint: disable=protected-access


SOURCE = Source(
    splits=shapes.SPLITS, open=_open,
    tokenizer=lambda data_cfg: shapes.tokenizer_path(shapes.build(data_cfg, ShapesSizes)),
    kinds=shapes.QUESTION_KINDS, texts=shapes.SOURCE.texts, field=shapes.SOURCE.field,
    caption=shapes.SOURCE.caption)

"""The tfds source: a VQA dataset TFDS prepared (array_record), read by name with a field mapping."""
import copy
import importlib
import sys

import pytest

from mm_jax import data
from mm_jax.config import validate
from mm_jax.data import pipeline
from mm_jax.errors import UserError

ANSWERS = ["circle", "square", "circle"]


# TFDS finds a builder's files through its package, so the builder lives in a package the test writes.
BUILDER = '''
import io
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
ANSWERS = ["circle", "square", "circle"]


class MyVqa(tfds.core.GeneratorBasedBuilder):
  """Another name for every field, variable-size PNGs and three answers per question."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return self.dataset_info_from_configs(features=tfds.features.FeaturesDict({
        "img": tfds.features.Image(shape=(None, None, 3)), "q": tfds.features.Text(),
        "ans": tfds.features.Sequence(tfds.features.Text()), "qtype": tfds.features.Text()}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(8), "test": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      buf = io.BytesIO()
      Image.fromarray(np.full((40 + i, 50, 3), 10 * i, np.uint8)).save(buf, "PNG")
      yield i, {"img": buf.getvalue(), "q": "what shape is in the top left?", "ans": ANSWERS,
                "qtype": "shape"}
'''


@pytest.fixture(scope="module")
def config(test_config, tmp_path_factory):
  root, code = tmp_path_factory.mktemp("tfds"), tmp_path_factory.mktemp("code")
  (code / "vqa_pkg").mkdir()
  (code / "vqa_pkg" / "__init__.py").write_text("")
  (code / "vqa_pkg" / "my_vqa.py").write_text(BUILDER)
  sys.path.insert(0, str(code))
  importlib.import_module("vqa_pkg.my_vqa").MyVqa(data_dir=str(root)).download_and_prepare(
      file_format="array_record")
  sys.path.remove(str(code))
  root = str(root)
  c = copy.deepcopy(test_config)
  shapes_tokenizer = data.get("shapes").tokenizer(test_config.data)  # the model's tokenizer
  c.data.update(name="tfds", data_dir=root, tokenizer=shapes_tokenizer)
  c.data.tfds.update(name="my_vqa", image="img", question="q", answer="ans", kind="qtype")
  c.eval.batch_size = 8
  return c


def test_records_become_conversations_scored_against_every_answer(config):
  tok, source = data.open_split(config, "test")
  validate.check_config(config, "test", train=False)
  batch = next(pipeline.eval_batches(config, tok, source, process_index=0, process_count=1))
  assert batch["valid"].sum() == 3
  assert batch["answers"][0] == ANSWERS and batch["answer"][0] == "circle"
  assert batch["kind"][:3] == ["shape"] * 3
  s = config.data.image_size
  assert batch["image"].shape == (8, 1, s, s, 3) and batch["image"][1].std() == 0  # resized, plain


def test_train_batches_target_the_first_answer(config):
  tok, source = data.open_split(config, "train")
  batch = next(pipeline.train_iterator(config, tok, source, process_index=0, process_count=1))
  row = batch["text"][0][batch["mask_loss"][0] == 1]
  assert tok.decode(row) == "circle"


@pytest.mark.parametrize("field,value,match", [
    ("name", "nope", "is not a dataset prepared in data.data_dir"),
    ("question", "question", "has no field 'question'")])
def test_a_wrong_name_or_field_is_one_line(config, field, value, match):
  c = copy.deepcopy(config)
  c.data.tfds[field] = value
  with pytest.raises(UserError, match=match):
    data.open_split(c, "train")

"""Pixtral's image-token layout (family_options.native.row_break_ids) against transformers 5.23's
PixtralProcessor (its layout; the PIL image processor's sizes; 16 px patches, 2 x 2 merge as Mistral Small
3.1): the ids an image of each of several sizes and aspects stands as in the text, and their count."""
import ast
import functools
import pathlib
import types

import numpy as np
from PIL import Image
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
import transformers
from transformers import PreTrainedTokenizerFast
from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

from mm_jax.data import native_images

IMG, BREAK, END = 1, 2, 3
SIZES = [(64, 96), (96, 32), (128, 128), (32, 160), (160, 64), (224, 96)]  # (height, width), whole 32s


def _pixtral_method(name: str):
  """PixtralProcessor.<name>, compiled from transformers' own source file: the module imports
  torchvision (not installed here) at its top, the layout method uses none of it."""
  path = pathlib.Path(transformers.__file__).parent / "models" / "pixtral" / "processing_pixtral.py"
  cls = next(n for n in ast.parse(path.read_text()).body
             if isinstance(n, ast.ClassDef) and n.name == "PixtralProcessor")
  fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)
  scope = {}
  exec(compile(ast.Module(body=[fn], type_ignores=[]), str(path), "exec"), scope)  # pylint: disable=exec-used
  return scope[name]


@pytest.fixture(scope="module")
def pixtral():
  """(HF's layout on the processor's fields, a tokenizer of its tokens, its PIL image processor)."""
  vocab = {"[UNK]": 0, "[IMG]": IMG, "[IMG_BREAK]": BREAK, "[IMG_END]": END}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]",
                                 additional_special_tokens=["[IMG]", "[IMG_BREAK]", "[IMG_END]"])
  fields = types.SimpleNamespace(patch_size=16, spatial_merge_size=2, image_token="[IMG]",
                                 image_break_token="[IMG_BREAK]", image_end_token="[IMG_END]")
  layout = functools.partial(_pixtral_method("replace_image_token"), fields)
  images = PixtralImageProcessorPil(patch_size={"height": 32, "width": 32}, size={"longest_edge": 1024})
  return layout, fast, images  # patch 32: the processor passes patch_size * spatial_merge_size


@pytest.mark.parametrize("hw", SIZES)
def test_row_breaks_and_image_end_equal_pixtral_s(pixtral, hw):
  layout, tok, images = pixtral
  inputs = images([Image.fromarray(np.zeros((*hw, 3), np.uint8))])
  assert tuple(int(x) for x in inputs["image_sizes"][0]) == hw  # whole 32s under 1024: kept
  ids = tok(layout(inputs, 0), add_special_tokens=False)["input_ids"]
  opts = native_images.NativeImages(patch_size=16, merge=2, min_pixels=32 * 32, max_pixels=1024 * 1024)
  grid = (1, *(x // 16 for x in native_images.smart_resize(*hw, opts)))
  assert grid[1:] == (hw[0] // 16, hw[1] // 16)  # our size rule keeps them too
  ours = native_images.image_tokens(grid, 2, IMG, (BREAK, END))
  assert ids == ours and native_images.num_tokens(grid, 2, breaks=True) == len(ours)

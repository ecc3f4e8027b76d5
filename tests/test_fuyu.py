"""Fuyu: no encoder, raw pixel patches projected by the connector into the decoder's sequence."""
import jax
import numpy as np
import pytest

from conftest import load_config, make_run, random_vqa_rows, train_losses
from mm_jax.models.vit import RawPatches

V = 40


def test_raw_patches_are_row_major_flattened_pixels():
  image = jax.random.normal(jax.random.key(0), (2, 16, 24, 3))
  patches = RawPatches(8).apply({}, image)
  assert patches.shape == (2, 2 * 3, 8 * 8 * 3)
  np.testing.assert_array_equal(patches[1, 4], image[1, 8:16, 8:16].reshape(-1))  # row 1, column 1
  np.testing.assert_array_equal(patches[0, 2], image[0, 0:8, 16:24].reshape(-1))


@pytest.mark.slow  # a train step on the mesh
def test_fuyu_family_params_tokens_and_a_train_step():
  config = load_config("test")
  config.model.family = "fuyu"
  config.mesh.update(dict(data=2, fsdp=2, tensor=2))
  mm, tx = make_run(config, jax.devices(), V)
  params = mm.abstract_params
  assert set(params) == {"connector", "decoder"}  # no encoder parameters at all
  assert params["connector"]["proj"]["kernel"].shape == (8 * 8 * 3, 32)
  s = config.data.image_size
  assert mm.model.num_image_tokens((1, s, s, 3)) == (s // 8) ** 2
  assert mm.model.num_image_tokens((1, 3, s, s, 3)) == (s // 8) ** 2  # per image of a multi-image row
  batch = random_vqa_rows(config, V)
  state, losses = train_losses(mm, tx, batch)
  assert losses[-1] < losses[0]
  # The image reaches the logits.
  p = jax.device_get(state["params"])
  rest = [batch[k] for k in ("text", "mask_ar", "mask_input", "image_pos", "segment", "positions")]
  run = lambda im: mm.model.apply({"params": p}, im, *rest)
  assert np.abs(np.asarray(run(batch["image"]) - run(-batch["image"]))).max() > 1e-6

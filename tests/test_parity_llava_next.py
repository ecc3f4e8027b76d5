"""LlavaNextForConditionalGeneration (SigLIP tower, Llama text) -> mm_jax "anyres": images whose aspect
picks a non-square grid, tiled by our own preprocessing (data/anyres.py) against HF's processor and
model: tiles, token counts, logits, 16 greedy tokens."""
import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.models.llava_next import image_processing_pil_llava_next as hf_proc

import hf_tiny
from mm_jax.convert import convert
from mm_jax.data import anyres
from mm_jax.eval.decode import decode

V, IMG, BOS, S = 256, 250, 1, hf_tiny.IMAGE
SIDE = S // 8
PINS = ((32, 64), (64, 32), (64, 64))
OPTS = anyres.AnyRes(size=S, pinpoints=PINS)


def build():
  config = transformers.LlavaNextConfig(
      vision_config=dict(hf_tiny.SIGLIP_VISION, vision_use_head=False),
      text_config=dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       tie_word_embeddings=False),
      image_token_index=IMG, vision_feature_layer=-2, vision_feature_select_strategy="full",
      image_grid_pinpoints=[list(p) for p in PINS])
  return hf_tiny.build(transformers.LlavaNextForConditionalGeneration, config)


def processor():
  return hf_proc.LlavaNextImageProcessorPil(size={"shortest_edge": S}, crop_size={"height": S, "width": S},
                                            image_grid_pinpoints=[list(p) for p in PINS])


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("llava_next")
  hf = build()
  cfg = convert(hf_tiny.save(hf, tmp / "hf"), str(tmp / "out"))
  assert cfg.model.family == "anyres" and tuple(map(tuple, cfg.model.family_options.anyres.pinpoints)) == PINS
  return hf, str(tmp / "out")


def _images(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _case(seed=0):
  """Row 0: one wide image (a 1 x 2 grid); row 1: a tall one (2 x 1) and a large one (2 x 2); the same
  length (right-padded text)."""
  rng = np.random.default_rng(seed)
  rows_images = [_images([(30, 70)], seed), _images([(60, 28), (90, 100)], seed + 1)]
  rows = []
  for imgs in rows_images:
    ids = [BOS] + rng.integers(3, IMG, 2).tolist()
    for im in imgs:
      ids += [IMG] * anyres.num_tokens(im.shape[:2], OPTS, SIDE) + rng.integers(3, IMG, 2).tolist()
    rows.append(ids)
  length = max(map(len, rows))
  mask = np.array([[1] * len(r) + [0] * (length - len(r)) for r in rows], np.int64)
  ids = np.array([r + [0] * (length - len(r)) for r in rows], np.int64)
  return ids, mask, rows_images


def _ours(rows_images, max_tiles=9, max_tokens=200):
  tiles = np.zeros((len(rows_images), max_tiles, S, S, 3), np.float32)
  src = np.zeros((len(rows_images), max_tokens), np.int32)
  for r, imgs in enumerate(rows_images):
    t = k = 0
    for im in imgs:
      x, grid = anyres.tiles(im, OPTS)
      s = anyres.token_sources(im.shape[:2], grid, SIDE)
      tiles[r, t:t + len(x)] = x
      src[r, k:k + len(s)] = np.where(s < 0, -1, s + t * SIDE * SIDE)
      t, k = t + len(x), k + len(s)
  return tiles, src


def _hf_inputs(ids, mask, rows_images):
  out = processor()([im for imgs in rows_images for im in imgs], return_tensors="pt")
  return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              pixel_values=out["pixel_values"], image_sizes=out["image_sizes"])


def test_tiles_and_token_counts_equal_hf():
  ims = _images([(30, 70), (60, 28), (90, 100), (32, 32), (10, 200)])
  out = processor()(ims, return_tensors="np")
  for j, im in enumerate(ims):
    x, grid = anyres.tiles(im, OPTS)
    want = out["pixel_values"][j][:len(x)].transpose(0, 2, 3, 1)
    np.testing.assert_allclose(x, want, atol=1e-6, rtol=0)
    assert (out["pixel_values"][j][len(x):] == 0).all()
  assert [anyres.best_resolution(h, w, PINS) for h, w in [(30, 70), (60, 28), (90, 100)]] == list(PINS)


def test_token_count_equals_the_model_for_many_sizes(converted):
  """HF's pack_image_features on features of the right tile count: its token count is ours."""
  hf, _ = converted
  sizes = [(30, 70), (60, 28), (90, 100), (32, 32), (10, 200), (200, 10), (33, 65), (64, 31), (500, 120),
           (47, 47), (1, 3), (64, 64)]
  for h, w in sizes:
    n_tiles = 1 + np.prod(np.array(anyres.best_resolution(h, w, PINS)) // S)
    feats = [torch.zeros(int(n_tiles), SIDE * SIDE, 64)]
    _, lens = hf.model.pack_image_features(feats, torch.tensor([[h, w]]), "full", hf.model.image_newline)
    assert anyres.num_tokens((h, w), OPTS, SIDE) == int(lens[0]), (h, w)


def test_logits_and_greedy(converted):
  hf, out = converted
  ids, mask, rows_images = _case()
  inputs = _hf_inputs(ids, mask, rows_images)
  with torch.no_grad():  # HF checks the placeholder count against its own token count
    want = hf(**inputs).logits.numpy()
  tiles, src = _ours(rows_images)
  model, params = hf_tiny.ours(out)
  ones = np.ones(ids.shape, np.int32)
  got = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(
      params, tiles, src, ids.astype(np.int32), ones, mask.astype(np.int32), ones)
  keep = mask > 0
  diff = hf_tiny.max_diff(np.asarray(got)[keep], want[keep])
  print(f"llava_next max|diff| {diff:.2e}")
  assert diff <= 1e-4

  # greedy: a batch without padding (row 0 alone, and row 1 alone: HF's generate pads on the left)
  for r in range(2):
    n = int(mask[r].sum())
    row_ids, row_mask = ids[r:r + 1, :n], mask[r:r + 1, :n]
    want_tokens = hf_tiny.hf_greedy(hf, 16, **_hf_inputs(row_ids, row_mask, rows_images[r:r + 1]))
    t, s = _ours(rows_images[r:r + 1])
    got_tokens = jax.jit(lambda *a: decode(model, params, *a[:4], max_new=16,
                                           prefill_kw={"token_src_BxK": a[4]}))(
        t, row_ids.astype(np.int32), np.ones((1, n), np.int32), np.full((1,), n, np.int32), s)
    assert np.asarray(got_tokens).tolist() == want_tokens.tolist()

"""Qwen2VLForConditionalGeneration -> mm_jax "native": two images of different sizes in one row (and
one in another), through our own preprocessing (data/native_images.py) against HF's processor and model:
pixels, grids, M-RoPE positions, logits, 16 greedy tokens; the image-token count for 20 sizes."""
import math

import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as hf_proc

import hf_tiny
from mm_jax.convert import convert, hf_config
from mm_jax.data import native_images as ni
from mm_jax.data import video
from mm_jax.errors import UserError
from mm_jax.eval.decode import decode
from mm_jax.models.native import mrope_offset

V, IMG, VID, VS, VE = 300, 290, 291, 292, 293
OPTS = ni.NativeImages(min_pixels=28 * 28 * 2, max_pixels=28 * 28 * 12)  # small grids for a fast test


def build():
  config = transformers.Qwen2VLConfig(
      text_config=dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                       rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3])),
      vision_config=dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2, patch_size=14,
                         spatial_merge_size=2, temporal_patch_size=2),
      image_token_id=IMG, video_token_id=VID, vision_start_token_id=VS, vision_end_token_id=VE)
  return hf_tiny.build(transformers.Qwen2VLForConditionalGeneration, config)


def processor():
  return hf_proc.Qwen2VLImageProcessorPil(min_pixels=OPTS.min_pixels, max_pixels=OPTS.max_pixels)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("qwen2_vl")
  hf = build()
  cfg = convert(hf_tiny.save(hf, tmp / "hf"), str(tmp / "out"))
  assert cfg.model.family == "native" and tuple(cfg.model.family_options.native.placeholder_ids) == (IMG, VID)
  return hf, str(tmp / "out")


def _images(sizes, seed=0):
  rng = np.random.default_rng(seed)
  return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in sizes]


def _row(pieces, rng):
  """Token ids of a row: an int n -> n random text tokens; a grid -> <|vision_start|>, its
  placeholders, <|vision_end|>."""
  out = []
  for piece in pieces:
    if isinstance(piece, int):
      out += rng.integers(1, 280, piece).tolist()
    else:
      out += [VS] + [IMG] * ni.num_tokens(piece, OPTS.merge) + [VE]
  return out


def _ours_batch(rows_images, length_p):
  """patches BxPxF and patch_ids BxPx3 of each row's images (blocks 1, 2, ...; padding block 0)."""
  f = 3 * OPTS.temporal_patch * OPTS.patch_size ** 2
  patches = np.zeros((len(rows_images), length_p, f), np.float32)
  ids = np.zeros((len(rows_images), length_p, 3), np.int32)
  for r, imgs in enumerate(rows_images):
    at, block = 0, 1
    for image in imgs:
      x, grid = ni.image_patches(image, OPTS)
      patches[r, at:at + len(x)], ids[r, at:at + len(x)] = x, ni.patch_ids(grid, OPTS.merge, block)
      at, block = at + len(x), block + grid[0]
  return patches, ids


def _case(seed=0):
  """Row 0: two images of different sizes between text; row 1: one image, the same length."""
  rng = np.random.default_rng(seed)
  imgs = _images([(70, 45), (30, 100), (56, 84)], seed)
  grids = [ni.image_patches(i, OPTS)[1] for i in imgs]
  r0 = _row([3, grids[0], 2, grids[1], 3], rng)
  r1 = _row([2, grids[2]], rng)
  r1 += rng.integers(1, 280, len(r0) - len(r1)).tolist()
  ids = np.array([r0, r1], np.int64)
  return ids, [imgs[:2], imgs[2:]], grids


def _hf_inputs(ids, rows_images, mask=None):
  out = processor()([i for row in rows_images for i in row], return_tensors="pt")
  mask = np.ones(ids.shape, np.int64) if mask is None else mask
  return dict(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
              pixel_values=out["pixel_values"], image_grid_thw=out["image_grid_thw"],
              mm_token_type_ids=torch.tensor((ids == IMG).astype(np.int64)))


def test_preprocessing_and_positions_equal_hf(converted):
  hf, _ = converted
  ids, rows_images, grids = _case()
  inputs = _hf_inputs(ids, rows_images)
  assert inputs["image_grid_thw"].tolist() == [list(g) for g in grids]
  ours = np.concatenate([ni.image_patches(i, OPTS)[0] for row in rows_images for i in row])
  np.testing.assert_allclose(ours, inputs["pixel_values"].numpy(), atol=1e-6, rtol=0)
  want, _ = hf.model.get_rope_index(inputs["input_ids"], inputs["mm_token_type_ids"],
                                    image_grid_thw=inputs["image_grid_thw"])
  for r, row in enumerate(rows_images):
    row_grids = grids[:2] if r == 0 else grids[2:]
    got = ni.mrope_positions(len(ids[r]), ni.spans(ids[r], (IMG, VID), row_grids, OPTS.merge), OPTS.merge)
    assert got.tolist() == want[:, r].T.tolist()


def _positions(ids, rows_images):
  grids = [[ni.image_patches(i, OPTS)[1] for i in row] for row in rows_images]
  return np.stack([ni.mrope_positions(len(r), ni.spans(r, (IMG, VID), g, OPTS.merge), OPTS.merge)
                   for r, g in zip(ids, grids)]).astype(
      np.int32)


def test_logits_and_bfloat16(converted):
  hf, out = converted
  ids, rows_images, _ = _case(1)
  mask = np.ones(ids.shape, np.int64)
  mask[1, -3:] = 0  # right padding in row 1
  with torch.no_grad():
    want = hf(**_hf_inputs(ids, rows_images, mask)).logits.numpy()
  keep = mask > 0
  patches, patch_ids = _ours_batch(rows_images, 4 * 40)
  positions = _positions(ids, rows_images)

  def logits(dtype=None):
    model, params = hf_tiny.ours(out, dtype=dtype)
    f = jax.jit(lambda p, *a: model.apply({"params": p}, *a))
    ones = np.ones(ids.shape, np.int32)
    return np.asarray(f(params, patches, patch_ids, ids.astype(np.int32), ones, mask.astype(np.int32),
                        ones, positions), np.float32)[keep]

  got, got_bf16 = logits(), logits("bfloat16")
  diff, rel = hf_tiny.max_diff(got, want[keep]), hf_tiny.max_diff(got_bf16, got) / np.abs(got).max()
  print(f"qwen2_vl max|diff| {diff:.2e} bf16 rel {rel:.2e}")
  assert diff <= 1e-4
  assert rel <= 2e-2


def test_greedy_16_tokens(converted):
  hf, out = converted
  ids, rows_images, _ = _case(2)
  want = hf_tiny.hf_greedy(hf, 16, **_hf_inputs(ids, rows_images))
  model, params = hf_tiny.ours(out)
  patches, patch_ids = _ours_batch(rows_images, 4 * 40)
  positions = _positions(ids, rows_images)
  b, p = ids.shape
  plen = np.full((b,), p, np.int32)
  got = jax.jit(lambda *a: decode(
      model, params, *a[:4], max_new=16, prefill_kw={"patch_ids_BxPx3": a[4], "positions_BxPx3": a[5]},
      position_offset_B=mrope_offset(a[5], a[3])))(
      patches, ids.astype(np.int32), np.ones((b, p), np.int32), plen, patch_ids, positions)
  assert np.asarray(got).tolist() == want.tolist()


def _video_case(seed=3):
  """One row: text, a 6-frame video (3 tubelets, padded from 5 frames), text, an image, text."""
  rng = np.random.default_rng(seed)
  frames = rng.integers(0, 256, (5, 40, 60, 3), dtype=np.uint8)
  image = _images([(50, 30)], seed)[0]
  vp, vgrid = video.video_patches(frames, OPTS)
  ip, igrid = ni.image_patches(image, OPTS)
  ids = _row([2], rng) + [VS] + [VID] * ni.num_tokens(vgrid, OPTS.merge) + [VE] + _row([2, igrid, 1], rng)
  ids = np.array([ids], np.int64)
  patches = np.zeros((1, 4 * 40, vp.shape[1]), np.float32)
  patch_ids = np.zeros((1, 4 * 40, 3), np.int32)
  patches[0, :len(vp)], patches[0, len(vp):len(vp) + len(ip)] = vp, ip
  patch_ids[0, :len(vp)] = ni.patch_ids(vgrid, OPTS.merge, 1)
  patch_ids[0, len(vp):len(vp) + len(ip)] = ni.patch_ids(igrid, OPTS.merge, 1 + vgrid[0])
  sp = ni.spans(ids[0], (IMG, VID), [vgrid, igrid], OPTS.merge)
  positions = ni.mrope_positions(ids.shape[1], sp, OPTS.merge)[None].astype(np.int32)
  kinds = np.where(ids == IMG, 1, np.where(ids == VID, 2, 0))
  hf_inputs = dict(input_ids=torch.tensor(ids), attention_mask=torch.ones(ids.shape, dtype=torch.long),
                   pixel_values=torch.tensor(ip), image_grid_thw=torch.tensor([igrid]),
                   pixel_values_videos=torch.tensor(vp), video_grid_thw=torch.tensor([vgrid]),
                   mm_token_type_ids=torch.tensor(kinds))
  return ids, patches, patch_ids, positions, hf_inputs, vgrid


def test_video_logits_positions_and_greedy(converted):
  """A video's tubelets: attention per time step, temporal M-RoPE positions, as HF's model."""
  hf, out = converted
  ids, patches, patch_ids, positions, hf_inputs, vgrid = _video_case()  # noqa
  assert vgrid[0] == 3
  want_pos, _ = hf.model.get_rope_index(hf_inputs["input_ids"], hf_inputs["mm_token_type_ids"],
                                        image_grid_thw=hf_inputs["image_grid_thw"],
                                        video_grid_thw=hf_inputs["video_grid_thw"])
  assert positions[0].tolist() == want_pos[:, 0].T.tolist()
  with torch.no_grad():
    want = hf(**hf_inputs).logits.numpy()
  model, params = hf_tiny.ours(out)
  ones = np.ones(ids.shape, np.int32)
  got = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(
      params, patches, patch_ids, ids.astype(np.int32), ones, ones, ones, positions)
  assert hf_tiny.max_diff(got, want) <= 1e-4
  want_tokens = hf_tiny.hf_greedy(hf, 16, **hf_inputs)
  plen = np.full((1,), ids.shape[1], np.int32)
  got_tokens = jax.jit(lambda *a: decode(
      model, params, *a[:4], max_new=16, prefill_kw={"patch_ids_BxPx3": a[4], "positions_BxPx3": a[5]},
      position_offset_B=mrope_offset(a[5], a[3])))(patches, ids.astype(np.int32), ones, plen, patch_ids,
                                                   positions)
  assert np.asarray(got_tokens).tolist() == want_tokens.tolist()


def test_video_file_frames_and_sampling(tmp_path):
  """PyAV reads the frames back; sampling is HF's sample_frames arithmetic; too few frames refused."""
  import av  # pylint: disable=g-import-not-at-top
  path = str(tmp_path / "v.mp4")
  with av.open(path, "w") as c:
    s = c.add_stream("mpeg4", rate=10)
    s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
    for i in range(12):
      for pkt in s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), 20 * i, np.uint8), "rgb24")):
        c.mux(pkt)
    for pkt in s.encode():
      c.mux(pkt)
  frames, fps = video.read(path)
  assert frames.shape == (12, 48, 64, 3) and fps == 10
  assert np.abs(frames.mean(axis=(1, 2, 3)) - 20 * np.arange(12)).max() < 3
  for sampling in (video.VideoSampling(fps=2.0), video.VideoSampling(num_frames=6),
                   video.VideoSampling(fps=5.0, min_frames=2)):
    got = video.sample_indices(12, fps, sampling, 2)
    n = (round(sampling.num_frames / 2) * 2 if sampling.num_frames else
         math.floor(min(max(12 / fps * sampling.fps, sampling.min_frames), 12, 12) / 2) * 2)
    assert got.tolist() == torch.arange(0, 12, 12 / n).int().tolist()
  with pytest.raises(UserError, match="the video has 12 frames but 14 were asked"):
    video.sample_indices(12, fps, video.VideoSampling(num_frames=14), 2)
  (tmp_path / "bad.mp4").write_bytes(b"not a video")
  with pytest.raises(UserError, match="cannot be decoded as a video"):
    video.read(str(tmp_path / "bad.mp4"))


SIZES = [(224, 224), (28, 28), (10, 10), (56, 1000), (1000, 56), (480, 640), (640, 480), (1080, 1920),
         (2000, 1500), (333, 777), (29, 57), (100, 3000), (3000, 100), (512, 512), (1, 150), (57, 29),
         (42, 42), (1023, 1025), (800, 20), (4000, 4000)]


def test_token_count_equals_the_processor_for_20_sizes():
  """Qwen2-VL's default bounds (min 56*56, max 28*28*1280 pixels): grid and token count as HF's."""
  proc, opts = hf_proc.Qwen2VLImageProcessorPil(), ni.NativeImages()
  assert len(SIZES) == 20
  for h, w in SIZES:
    grid = proc(np.zeros((h, w, 3), np.uint8), return_tensors="np",
                input_data_format="channels_last")["image_grid_thw"][0].tolist()
    hh, ww = ni.smart_resize(h, w, opts)
    assert [1, hh // 14, ww // 14] == grid, (h, w)
    assert ni.num_tokens(tuple(grid), 2) == grid[1] * grid[2] // 4


def test_refusals():
  with pytest.raises(UserError, match="200 times as long"):
    ni.smart_resize(10, 2100, ni.NativeImages())
  hf = dict(build().config.to_dict(), architectures=["Qwen2VLForConditionalGeneration"])
  hf["vision_config"]["hidden_act"] = "gelu"
  with pytest.raises(UserError, match="hidden_act"):
    hf_config.derive(hf)
  hf = dict(build().config.to_dict(), architectures=["Qwen2VLForConditionalGeneration"])
  hf["text_config"]["rope_parameters"]["mrope_section"] = [2, 2, 2]
  with pytest.raises(UserError, match="mrope_section"):
    hf_config.derive(hf)

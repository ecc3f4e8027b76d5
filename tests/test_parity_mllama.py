"""MllamaForConditionalGeneration (Llama 3.2 Vision: tiled tower, cross-attention layers at the config's
indices, one of them after the last self-attention layer) -> mm_jax "cross": logits, greedy tokens and
bfloat16 against transformers. The rows cover a token before any image (it attends to every key in
HF), a one-tile image among two tiles, two-tile images of both aspect ratios, two images apart, two on
consecutive tokens (one group), an empty image slot and right padding; the cross mask is the
processor's own (get_cross_attention_token_mask)."""
import jax
import numpy as np
import pytest
import torch
import transformers
from transformers.models.mllama import processing_mllama

import hf_tiny
from mm_jax.convert import convert, hf_config
from mm_jax.errors import UserError
from mm_jax.eval.decode import decode

V, IMG, BOS, T = 256, 256, 1, 2  # <|image|> is id vocab_size, an ordinary input token
ASPECTS = [[1, 1], [1, 2], [2, 1]]  # ids 1..3 (0: a padding image); tiles 1, 2, 2
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
              attention_heads=4, image_size=32, patch_size=8, max_num_tiles=T,
              supported_aspect_ratios=ASPECTS, intermediate_layers_indices=[0, 1], vision_output_dim=96)


def build():
  """The tiny random Mllama (also the export round trip's, tests/test_export_hf.py); its gates opened
  (HF starts them at 0, which would hide the cross blocks and the tile embeddings)."""
  config = transformers.MllamaConfig(
      vision_config=VISION,
      text_config=dict(vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=2, cross_attention_layers=[1, 3],
                       pad_token_id=0, bos_token_id=BOS, eos_token_id=2),
      image_token_index=IMG)
  hf = hf_tiny.build(transformers.MllamaForConditionalGeneration, config)
  g = torch.Generator().manual_seed(1)
  with torch.no_grad():
    for name, p in hf.named_parameters():
      if name.endswith("gate"):
        p.copy_(0.5 + torch.rand(p.shape, generator=g))
  return hf


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("mllama")
  hf = build()
  cfg = convert(hf_tiny.save(hf, tmp / "hf"), str(tmp / "out"))
  assert cfg.model.family == "cross" and tuple(cfg.model.family_options.cross.layers) == (1, 3)
  return hf, str(tmp / "out")


def _rows(length: int, images: list[list[tuple[int, int]]], seed: int = 4):
  """Token rows with <|image|> at the given positions: images[b] = [(position, aspect id), ...].
  Returns ids BxL, image_pos BxI (an empty slot: L), aspect ids BxI (empty: 0), HF's pixel_values
  BxIxTxCxHxW (unfilled tiles zero), aspect_ratio_mask BxIxT and the processor's cross mask BxLxIxT."""
  b, i = len(images), max(map(len, images))
  ids = np.random.default_rng(seed).integers(3, V, (b, length))
  ids[:, 0] = BOS
  pos, ar = np.full((b, i), length, np.int32), np.zeros((b, i), np.int32)
  px = np.random.default_rng(seed).uniform(-1, 1, (b, i, T, 3, 32, 32)).astype(np.float32)
  tiles = [1] + [h * w for h, w in ASPECTS]
  for r, row in enumerate(images):
    for m, (p, a) in enumerate(row):
      ids[r, p], pos[r, m], ar[r, m] = IMG, p, a
  n_tiles = [[tiles[a] for a in row] for row in ar.tolist()]
  for r in range(b):
    for m in range(i):
      px[r, m, n_tiles[r][m]:] = 0
  ar_mask = (np.arange(T)[None, None] < np.array(n_tiles)[..., None]).astype(np.int64)
  tokens = [processing_mllama.get_cross_attention_token_mask(row.tolist(), IMG) for row in ids]
  xmask = processing_mllama.convert_sparse_cross_attention_mask_to_dense(
      tokens, [t[:len(k)] for t, k in zip(n_tiles, tokens)], T, length)
  return ids, pos, ar, px, ar_mask, xmask


def _ours_image(px):
  return np.ascontiguousarray(px.transpose(0, 1, 2, 4, 5, 3))  # BxIxTxHxWxC


def _hf_inputs(ids, ar, px, ar_mask, xmask, mask):
  return dict(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px), aspect_ratio_ids=torch.tensor(ar),
              aspect_ratio_mask=torch.tensor(ar_mask), cross_attention_mask=torch.tensor(xmask),
              attention_mask=torch.tensor(mask))


def test_logits_and_bfloat16(converted):
  hf, out = converted
  length = 12
  ids, pos, ar, px, ar_mask, xmask = _rows(length, [[(2, 1)], [(1, 2), (6, 3)], [(3, 1), (4, 2)]])
  mask = np.ones(ids.shape, np.int64)
  mask[2, -3:] = 0
  ids = np.where(mask > 0, ids, 0)
  with torch.no_grad():
    want = hf(**_hf_inputs(ids, ar, px, ar_mask, xmask, mask)).logits.numpy()
  keep = mask > 0

  def logits(dtype=None):
    model, params = hf_tiny.ours(out, dtype=dtype)
    f = jax.jit(lambda p, *a, ar: model.apply({"params": p}, *a, aspect_ratio_ids_BxI=ar))
    ones = np.ones(ids.shape, np.int32)
    return np.asarray(f(params, _ours_image(px), ids.astype(np.int32), ones, mask.astype(np.int32), pos,
                        ar=ar), np.float32)[keep]

  got, got_bf16 = logits(), logits("bfloat16")
  diff, rel = hf_tiny.max_diff(got, want[keep]), hf_tiny.max_diff(got_bf16, got) / np.abs(got).max()
  print(f"mllama max|diff| {diff:.2e} bf16 rel {rel:.2e}")
  assert diff <= 1e-4
  assert rel <= 2e-2


def test_greedy_16_tokens(converted):
  hf, out = converted
  ids, pos, ar, px, ar_mask, xmask = _rows(7, [[(2, 2)], [(1, 1), (2, 3)]], seed=5)
  b, p = ids.shape
  want = hf_tiny.hf_greedy(hf, 16, **_hf_inputs(ids, ar, px, ar_mask, xmask, np.ones(ids.shape, np.int64)))
  model, params = hf_tiny.ours(out)
  got = jax.jit(lambda *a, ar: decode(model, params, *a, max_new=16, image_pos=pos,
                                      prefill_kw={"aspect_ratio_ids_BxI": ar}))(
      _ours_image(px), ids.astype(np.int32), np.ones((b, p), np.int32), np.full((b,), p, np.int32), ar=ar)
  assert np.asarray(got).tolist() == want.tolist()


def test_one_tile_images_need_no_aspect_ids(converted):
  """The data path's images (BxHxWxC, one tile each) are tile 0 of aspect ratio (1, 1), as HF pads."""
  hf, out = converted
  ids, pos, ar, px, ar_mask, xmask = _rows(8, [[(1, 1)], [(3, 1)]], seed=6)
  with torch.no_grad():
    want = hf(**_hf_inputs(ids, ar, px, ar_mask, xmask, np.ones(ids.shape, np.int64))).logits.numpy()
  model, params = hf_tiny.ours(out)
  ones = np.ones(ids.shape, np.int32)
  got = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(
      params, _ours_image(px)[:, 0, 0], ids.astype(np.int32), ones, ones, pos[:, :1])
  assert hf_tiny.max_diff(got, want) <= 1e-4


@pytest.mark.parametrize("change, field", [({"vision_output_dim": 64}, "vision_output_dim"),
                                           ({"hidden_act": "silu"}, "hidden_act")])
def test_converter_refuses_what_it_cannot_compute(change, field):
  hf = dict(build().config.to_dict(), architectures=["MllamaForConditionalGeneration"])
  hf["vision_config"].update(change)
  with pytest.raises(UserError, match=field):
    hf_config.derive(hf)


def test_the_tokenizer_may_hold_the_input_only_image_token():
  """The real tokenizer has <|image|> at vocab_size (128256 of 128257 pieces): the embedding's rows hold
  it, the head does not predict it."""
  from mm_jax.models import family  # pylint: disable=g-import-not-at-top
  assert family.vocab_size("decoder", V, V + 1, rows=V + 8) == V
  with pytest.raises(UserError, match="the tokenizer has 257 pieces"):
    family.vocab_size("decoder", V, V + 1)

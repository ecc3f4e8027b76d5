"""LlavaForConditionalGeneration (SigLIP tower, Llama text) -> mm_jax "unified" (image after BOS, causal):
logits, greedy tokens and bfloat16 against transformers."""
import jax
import numpy as np
import pytest
import torch
import transformers

import hf_tiny
from mm_jax.convert import convert
from mm_jax.eval.decode import greedy_decode

V, IMG, BOS = 256, 250, 1
N = hf_tiny.N_PATCHES


def build():
  """The tiny random LLaVA (also the export round trip's, tests/test_export_hf.py)."""
  # Features from layer -2 of 3 (before the post-LN): the converter keeps 2 layers and skips the rest.
  config = transformers.LlavaConfig(
      vision_config=dict(hf_tiny.SIGLIP_VISION, vision_use_head=False),
      text_config=dict(model_type="llama", vocab_size=V, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                       tie_word_embeddings=False),
      image_token_index=IMG, image_seq_length=N, vision_feature_layer=-2,
      vision_feature_select_strategy="full")
  return hf_tiny.build(transformers.LlavaForConditionalGeneration, config)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("llava")
  hf = build()
  cfg = convert(hf_tiny.save(hf, tmp / "hf"), str(tmp / "out"))
  assert cfg.model.encoder.depth == 2 and not cfg.model.encoder.final_norm
  return hf, str(tmp / "out")


def _hf_ids(text):
  """The LLaVA layout: BOS, the image tokens, then the rest of the text."""
  b = len(text)
  return np.concatenate([text[:, :1], np.full((b, N), IMG), text[:, 1:]], 1)


def _text(b=2, t=10):
  text = np.random.default_rng(4).integers(3, IMG, (b, t))
  text[:, 0] = BOS
  return text


def test_logits_and_bfloat16(converted):
  hf, out = converted
  px, text = hf_tiny.pixels(2), _text()
  mask = np.ones(text.shape, np.int64)
  mask[1, -3:] = 0
  text = np.where(mask > 0, text, 0)
  full_mask = _hf_ids(mask)
  full_mask[:, 1:1 + N] = 1
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(_hf_ids(text)), pixel_values=torch.tensor(px),
              attention_mask=torch.tensor(full_mask)).logits.numpy()
  keep = full_mask > 0

  def logits(dtype=None):
    model, params = hf_tiny.ours(out, dtype=dtype)
    f = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=model.sequence_logits))
    return np.asarray(f(params, hf_tiny.nhwc(px), text.astype(np.int32), np.ones_like(text, np.int32),
                        mask.astype(np.int32)), np.float32)[keep]

  got, got_bf16 = logits(), logits("bfloat16")
  diff, rel = hf_tiny.max_diff(got, want[keep]), hf_tiny.max_diff(got_bf16, got) / np.abs(got).max()
  print(f"llava max|diff| {diff:.2e} bf16 rel {rel:.2e}")
  assert diff <= 1e-4
  assert rel <= 2e-2


def test_greedy_16_tokens(converted):
  hf, out = converted
  px, prefix = hf_tiny.pixels(2), _text(t=6)
  b, p = prefix.shape
  ids = _hf_ids(prefix)
  want = hf_tiny.hf_greedy(hf, 16, input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                           attention_mask=torch.ones(ids.shape, dtype=torch.long))
  model, params = hf_tiny.ours(out)
  got = jax.jit(lambda *a: greedy_decode(model, params, *a, max_new=16))(
      hf_tiny.nhwc(px), prefix.astype(np.int32), np.ones((b, p), np.int32), np.full((b,), p, np.int32))
  assert np.asarray(got).tolist() == want.tolist()


def _two_images(text, gap: int = 3):
  """BOS, image 1's N slots, `gap` text tokens, image 2's N slots, the rest (ids IMG at the slots, as
  HF's placeholders); and image_pos Bx2."""
  b = len(text)
  img = np.full((b, N), IMG)
  ids = np.concatenate([text[:, :1], img, text[:, 1:1 + gap], img, text[:, 1 + gap:]], 1)
  return ids, np.tile(np.array([[1, 1 + N + gap]], np.int32), (b, 1))


def test_two_images_in_a_row(converted):
  """Two images per row: HF scatters each image's features over its placeholders in order; ours
  scatters them at image_pos. Logits (right padding in row 1) and 16 greedy tokens."""
  hf, out = converted
  px, text = hf_tiny.pixels(4, seed=1), _text(t=8)
  b = len(text)
  ids, image_pos = _two_images(text)
  mask = np.ones(ids.shape, np.int64)
  mask[1, -2:] = 0
  ids = np.where(mask > 0, ids, 0)
  with torch.no_grad():  # pixel_values: the images in row order, row 0's two first
    want = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
              attention_mask=torch.tensor(mask)).logits.numpy()
  model, params = hf_tiny.ours(out)
  image = hf_tiny.nhwc(px).reshape(b, 2, *hf_tiny.nhwc(px).shape[1:])
  ones = np.ones(ids.shape, np.int32)
  got = jax.jit(lambda p, *a: model.apply({"params": p}, *a))(
      params, image, ids.astype(np.int32), ones, mask.astype(np.int32), image_pos, mask.astype(np.int32))
  diff = hf_tiny.max_diff(np.asarray(got)[mask > 0], want[mask > 0])
  print(f"llava two images max|diff| {diff:.2e}")
  assert diff <= 1e-4
  prefix, _ = _two_images(_text(t=5), gap=2)
  want_tokens = hf_tiny.hf_greedy(hf, 16, input_ids=torch.tensor(prefix), pixel_values=torch.tensor(px),
                                  attention_mask=torch.ones(prefix.shape, dtype=torch.long))
  p = prefix.shape[1]
  got_tokens = jax.jit(lambda *a, **kw: greedy_decode(model, params, *a, max_new=16, **kw))(
      image, prefix.astype(np.int32), np.ones((b, p), np.int32), np.full((b,), p, np.int32),
      image_pos=np.tile(np.array([[1, 1 + N + 2]], np.int32), (b, 1)))
  assert np.asarray(got_tokens).tolist() == want_tokens.tolist()

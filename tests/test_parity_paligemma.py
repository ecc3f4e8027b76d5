"""PaliGemmaForConditionalGeneration -> mm_jax "unified" (image first, prefix-LM): logits, greedy tokens
and bfloat16 against transformers."""
import jax
import numpy as np
import pytest
import torch
import transformers

import hf_tiny
from mm_jax.convert import convert
from mm_jax.eval.decode import greedy_decode

V, IMG, BOS = 256, 255, 2
N = hf_tiny.N_PATCHES


def build():
  """The tiny random PaliGemma (also the export round trip's, tests/test_export_hf.py)."""
  config = transformers.PaliGemmaConfig(
      vision_config=dict(hf_tiny.SIGLIP_VISION, vision_use_head=False),
      text_config=dict(model_type="gemma", vocab_size=V, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=24),
      image_token_index=IMG, vocab_size=V, projection_dim=64, hidden_size=64)
  return hf_tiny.build(transformers.PaliGemmaForConditionalGeneration, config)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("paligemma")
  hf = build()
  convert(hf_tiny.save(hf, tmp / "hf"), str(tmp / "out"))
  return hf, str(tmp / "out")


def _batch():
  """Text BOS + prefix (5) + suffix (6) per row; row 1 has 2 padding tokens at the end."""
  b, t, prefix = 2, 12, 6
  text = np.random.default_rng(3).integers(3, IMG, (b, t))
  text[:, 0] = BOS
  mask = np.ones((b, t), np.int64)
  mask[1, -2:] = 0
  token_type = np.broadcast_to((np.arange(t) >= prefix).astype(np.int64), (b, t))
  return hf_tiny.pixels(b), np.where(mask > 0, text, 0), mask, token_type


def test_logits_and_bfloat16(converted):
  hf, out = converted
  px, text, mask, tt = _batch()
  b = len(text)
  ids = np.concatenate([np.full((b, N), IMG), text], 1)  # the processor's layout: image tokens first
  full = lambda m, fill: np.concatenate([np.full((b, N), fill), m], 1)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
              attention_mask=torch.tensor(full(mask, 1)), token_type_ids=torch.tensor(full(tt, 0))).logits
  keep = full(mask, 1) > 0

  def logits(dtype=None):
    model, params = hf_tiny.ours(out, dtype=dtype)
    f = jax.jit(lambda p, *a: model.apply({"params": p}, *a, method=model.sequence_logits))
    return np.asarray(f(params, hf_tiny.nhwc(px), text.astype(np.int32), tt.astype(np.int32),
                        mask.astype(np.int32)), np.float32)[keep]

  got, got_bf16 = logits(), logits("bfloat16")
  diff, rel = hf_tiny.max_diff(got, want.numpy()[keep]), hf_tiny.max_diff(got_bf16, got) / np.abs(got).max()
  print(f"paligemma max|diff| {diff:.2e} bf16 rel {rel:.2e}")
  assert diff <= 1e-4
  assert rel <= 2e-2


def test_greedy_16_tokens(converted):
  hf, out = converted
  px, text, _, _ = _batch()
  prefix = text[:, :6]
  b, p = prefix.shape
  ids = np.concatenate([np.full((b, N), IMG), prefix], 1)
  want = hf_tiny.hf_greedy(hf, 16, input_ids=torch.tensor(ids), pixel_values=torch.tensor(px),
                           attention_mask=torch.ones(ids.shape, dtype=torch.long),
                           token_type_ids=torch.zeros(ids.shape, dtype=torch.long))
  model, params = hf_tiny.ours(out)
  got = jax.jit(lambda *a: greedy_decode(model, params, *a, max_new=16))(
      hf_tiny.nhwc(px), prefix.astype(np.int32), np.ones((b, p), np.int32), np.full((b,), p, np.int32))
  assert np.asarray(got).tolist() == want.tolist()

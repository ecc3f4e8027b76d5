"""SiglipModel -> mm_jax "siglip" family (image and text embeddings, logits, bfloat16), and
SiglipVisionModel -> an encoder for the unified family plus the MAP head under the siglip names."""
import math

import flax.linen as nn
import jax
import numpy as np
import pytest
import torch
import transformers

import hf_tiny
from mm_jax.train import sharding
from mm_jax.checkpoint import Checkpoints
from mm_jax.checkpoint.parts import load_parts, map_parts
from mm_jax.convert import convert
from mm_jax.models.siglip import MAPHead
from mm_jax.train.state import ModelOnMesh

TEXT_VOCAB, TEXT_LEN = 128, 16


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  tmp = tmp_path_factory.mktemp("siglip")
  # The text tower is wider than the image one (48 vs 32) and projects to it.
  config = transformers.SiglipConfig(
      vision_config=hf_tiny.SIGLIP_VISION,
      text_config=dict(vocab_size=TEXT_VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=2, max_position_embeddings=TEXT_LEN, projection_size=32,
                       pad_token_id=1, bos_token_id=2, eos_token_id=3))
  hf = hf_tiny.build(transformers.SiglipModel, config)
  with torch.no_grad():  # the paper's init (HF's is 0, 0): logits of a realistic scale for the bf16 check
    hf.logit_scale.fill_(math.log(10.0))
    hf.logit_bias.fill_(-10.0)
  cfg = convert(hf_tiny.save(hf, tmp / "hf"), str(tmp / "out"))
  assert cfg.model.family == "siglip" and cfg.data.text_len == TEXT_LEN
  return hf, str(tmp / "out")


def test_embeddings_logits_and_bfloat16(converted):
  hf, out = converted
  b = 3
  px = hf_tiny.pixels(b)
  ids = np.random.default_rng(5).integers(4, TEXT_VOCAB, (b, TEXT_LEN)).astype(np.int32)
  with torch.no_grad():
    want = hf(input_ids=torch.tensor(ids, dtype=torch.long), pixel_values=torch.tensor(px))

  def run(dtype=None):
    model, params = hf_tiny.ours(out, dtype=dtype)
    f = jax.jit(lambda p, img, txt: (model.apply({"params": p}, img, method=model.embed_image),
                                     model.apply({"params": p}, txt, method=model.embed_text),
                                     model.apply({"params": p}, img, txt)))
    return [np.asarray(x, np.float32) for x in f(params, hf_tiny.nhwc(px), ids)]

  (img, txt, logits), (_, _, logits_bf16) = run(), run("bfloat16")
  diffs = {"image_embeds": hf_tiny.max_diff(img, want.image_embeds.numpy()),
           "text_embeds": hf_tiny.max_diff(txt, want.text_embeds.numpy()),
           "logits": hf_tiny.max_diff(logits, want.logits_per_text.numpy())}
  rel = hf_tiny.max_diff(logits_bf16, logits) / np.abs(logits).max()
  print(f"siglip max|diff| {diffs} bf16 rel {rel:.2e}")
  assert max(diffs.values()) <= 1e-4, diffs
  assert rel <= 2e-2


def test_vision_model_alone_gives_the_unified_encoder_and_the_map_head(tmp_path):
  hf = hf_tiny.build(transformers.SiglipVisionModel, transformers.SiglipVisionConfig(
      **{k: v for k, v in hf_tiny.SIGLIP_VISION.items() if k != "model_type"}))
  out = str(tmp_path / "out")
  convert(hf_tiny.save(hf, tmp_path / "hf"), out)
  config = hf_tiny.load_config(out)
  assert config.model.family == "unified" and [tuple(p) for p in config.init.parts] == [
      (out, "encoder/", "encoder/")]
  px = hf_tiny.pixels(2)
  with torch.no_grad():
    want = hf(pixel_values=torch.tensor(px))

  # The unified model loads the encoder by init.parts, as train does.
  mm = ModelOnMesh.create(config, config.data.vocab_size, sharding.make_mesh(config.mesh, jax.devices()[:1]))
  params = load_parts(map_parts(config.init.parts, mm.abstract_params), mm.init_params(0))
  feats = jax.jit(lambda p, x: mm.model.apply({"params": p}, x, method=lambda m, x: m.encoder(x)))(
      params, hf_tiny.nhwc(px))
  assert hf_tiny.max_diff(feats, want.last_hidden_state.numpy()) <= 1e-4

  # The MAP head is stored under the siglip family's names.
  enc = config.model.encoder
  head = MAPHead(enc.num_heads, enc.mlp_dim, enc.norm_eps)
  abstract = nn.meta.unbox(jax.eval_shape(head.init, jax.random.key(0), feats))["params"]
  ckpt = Checkpoints(out, read_only=True)
  restored = ckpt.restore_params(0, {"map_head": abstract})["map_head"]
  ckpt.close()
  pooled = head.apply({"params": restored}, want.last_hidden_state.numpy())
  assert hf_tiny.max_diff(pooled, want.pooler_output.numpy()) <= 1e-4

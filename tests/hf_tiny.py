"""Tiny Hugging Face reference models for the parity tests, built from configs (nothing downloaded), and
our side of a comparison: the converted workdir's config, model and params.

Every parameter HF initialises to a constant (norm weights and biases, linear biases, logit scale and
bias) is moved off it, so a mapping that dropped or swapped one would show in the logits.
"""
import os

import jax
import numpy as np
import torch

from mm_jax.config import files
from mm_jax.train import sharding
from mm_jax.convert import convert
from mm_jax.eval.decode import greedy_decode
from mm_jax.eval.evaluate import restore_params, stored_config
from mm_jax.train.state import ModelOnMesh

SIGLIP_VISION = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=64,
                     num_hidden_layers=3, num_attention_heads=2, image_size=32, patch_size=8)
IMAGE = 32
N_PATCHES = (IMAGE // 8) ** 2


def build(model_cls, config, seed: int = 0) -> torch.nn.Module:
  """model_cls(config) with seeded init, randomized (below), in eval mode."""
  torch.manual_seed(seed)
  return randomize(model_cls(config), seed)


def randomize(model: torch.nn.Module, seed: int = 0, scale: float = 0.1) -> torch.nn.Module:
  """Adds noise to every constant-initialised parameter (and the MAP probe); returns model.eval()."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if p.numel() == 1 or bool((p == p.flatten()[0]).all()) or name.endswith("probe"):
        p.add_(scale * torch.randn(p.shape, generator=g))
  return model.eval()


def save(model: torch.nn.Module, path) -> str:
  model.save_pretrained(str(path))
  return str(path)


def pixels(batch: int, seed: int = 0) -> np.ndarray:
  """Random images in [-1, 1], NCHW float32 (HF's layout); `nhwc` gives ours."""
  return np.random.default_rng(seed).uniform(-1, 1, (batch, 3, IMAGE, IMAGE)).astype(np.float32)


def nhwc(pixels_nchw: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(pixels_nchw.transpose(0, 2, 3, 1))


def hf_greedy(model, n: int, **inputs) -> np.ndarray:
  """n greedy tokens from HF generate, EOS disabled so neither side stops early."""
  model.generation_config.eos_token_id = None
  model.generation_config.pad_token_id = 0
  with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=n, min_new_tokens=0, do_sample=False)
  return out[:, inputs["input_ids"].shape[1]:].numpy()


def load_config(out: str):
  """get_config() of OUT/config.py, as the CLIs load it; for a trained workdir, its checkpoint's."""
  if not os.path.isfile(os.path.join(out, "config.py")):
    return stored_config(out, None)[0]
  return files.load(os.path.join(out, "config.py"))


def ours(out: str, config=None, dtype: str | None = None):
  """(model, params) restored from the workdir `out` onto one device; `dtype` overrides model.dtype."""
  config = load_config(out) if config is None else config
  if dtype is not None:
    config.model.dtype = dtype
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  tower = config.model.get("decoder") or config.model.get("text")
  mm = ModelOnMesh.create(config, tower.vocab_size or config.data.vocab_size, mesh)
  _, params = restore_params(out, mm, None)
  return mm.model, params


def max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def check_lm(hf_model, tmp_path, vocab: int) -> dict:
  """Converts a CausalLM and compares (compare_lm) the import with it."""
  config = convert(save(hf_model, tmp_path / "hf"), str(tmp_path / "out"))
  assert load_config(str(tmp_path / "out")) == config
  return compare_lm(hf_model, str(tmp_path / "out"), vocab)


def compare_lm(hf_model, out: str, vocab: int) -> dict:
  """A CausalLM against the workdir `out`: logits (a right-padded batch), 16 greedy tokens, bfloat16.

  Returns {"max_diff", "bf16_rel", "greedy": (ours, HF)} (the callers assert: failures name the family).
  """
  config = load_config(out)
  b, t, p = 2, 12, 8
  ids = np.random.default_rng(1).integers(3, vocab, (b, t))
  mask = np.ones((b, t), np.int64)
  mask[1, -3:] = 0  # row 1 is right-padded; its padded positions are not compared
  with torch.no_grad():
    want = hf_model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
  image = np.zeros((b, config.data.image_size, config.data.image_size, 3), np.float32)
  text = np.where(mask > 0, ids, 0).astype(np.int32)

  def logits(dtype=None):
    model, params = ours(out, dtype=dtype)
    y = jax.jit(model.apply)({"params": params}, image, text, np.ones_like(text), mask.astype(np.int32))
    return model, params, np.asarray(y, np.float32)[mask > 0]

  model, params, got = logits()
  _, _, got_bf16 = logits("bfloat16")
  prefix = ids[:, :p].astype(np.int32)
  tokens = jax.jit(lambda *a: greedy_decode(model, params, *a, max_new=16))(
      image, prefix, np.ones_like(prefix), np.full((b,), p, np.int32))
  hf_tokens = hf_greedy(hf_model, 16, input_ids=torch.tensor(prefix, dtype=torch.long),
                        attention_mask=torch.ones((b, p), dtype=torch.long))
  return {"max_diff": max_diff(got, want[mask > 0]),
          "bf16_rel": max_diff(got_bf16, got) / float(np.max(np.abs(got))),
          "greedy": (np.asarray(tokens).tolist(), hf_tokens.tolist())}

"""SigLIP two-tower model: param names and shapes (the converter's contract), the forward math, the MAP
head, and that its encoder is the unified model's."""
import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config
from mm_jax.models import build_model
from mm_jax.models.stack import path_str

B, S, T, V = 3, 32, 12, 40


def load_siglip_config(arg: str = ""):
  return load_config(arg, "siglip_shapes")


@pytest.fixture(scope="module")
def model_and_params():
  config = load_siglip_config("test")
  config.model.text.max_len = 16
  model = build_model(config.model, V)
  image = jax.random.normal(jax.random.key(1), (B, S, S, 3))
  text = jax.random.randint(jax.random.key(2), (B, T), 0, V)
  params = nn.meta.unbox(model.init(jax.random.key(0), image, text)["params"])
  return model, params, image, text


def test_param_names_and_shapes(model_and_params):
  _, params, _, _ = model_and_params
  shapes = {path_str(p): tuple(x.shape) for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  d, n, h, f = 32, 2, 16, 64  # the :test encoder (width 32, 2 heads, mlp 64), text width 32
  expected = {
      "map_head/probe": (1, 1, d),
      "map_head/attn/q/kernel": (d, n, h), "map_head/attn/q/bias": (n, h),
      "map_head/attn/k/kernel": (d, n, h), "map_head/attn/v/bias": (n, h),
      "map_head/attn/o/kernel": (n, h, d), "map_head/attn/o/bias": (d,),
      "map_head/ln_mlp/scale": (d,), "map_head/mlp_in/kernel": (d, f), "map_head/mlp_out/kernel": (f, d),
      "text/embedder/embedding": (V, 32), "text/pos_embedding": (16, 32),
      "text/block_0/attn/q/kernel": (32, 2, 16), "text/block_0/mlp_in/kernel": (32, 64),
      "text/ln_final/scale": (32,), "text/head/kernel": (32, d), "text/head/bias": (d,),
      "logit_scale": (), "logit_bias": (),
      "encoder/pos_embedding": (16, d), "encoder/ln_final/scale": (d,),
  }
  for name, shape in expected.items():
    assert shapes.get(name) == shape, (name, shapes.get(name))
  assert set(params) == {"encoder", "map_head", "text", "logit_scale", "logit_bias"}
  np.testing.assert_allclose([params["logit_scale"], params["logit_bias"]], [np.log(10.0), -10.0], rtol=1e-6)


def test_encoder_is_the_unified_models_encoder(model_and_params):
  _, params, _, _ = model_and_params
  unified = build_model(load_config("test").model, V)
  b = dict(image=jnp.zeros((1, S, S, 3)), text=jnp.zeros((1, 4), jnp.int32))
  u = jax.eval_shape(lambda: unified.init(jax.random.key(0), b["image"], b["text"], b["text"], b["text"]))
  sig = lambda tree: {path_str(p): x.shape for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  assert sig(nn.meta.unbox(u["params"]["encoder"])) == sig(params["encoder"])


def test_forward_matches_the_formula(model_and_params):
  model, params, image, text = model_and_params
  logits = model.apply({"params": params}, image, text)
  chex.assert_shape(logits, (B, B))
  img = model.apply({"params": params}, image, method="embed_image")
  txt = model.apply({"params": params}, text, method="embed_text")
  np.testing.assert_allclose(np.linalg.norm(img, axis=-1), 1.0, rtol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(txt, axis=-1), 1.0, rtol=1e-5)
  want = np.asarray(txt) @ np.asarray(img).T * 10.0 - 10.0
  np.testing.assert_allclose(logits, want, atol=1e-5)


def test_text_pools_the_last_position_and_sees_every_token(model_and_params):
  model, params, _, text = model_and_params
  embed = lambda t: np.asarray(model.apply({"params": params}, t, method="embed_text"))
  changed = text.at[:, 0].set((text[:, 0] + 1) % V)  # bidirectional: the last position sees token 0
  assert np.abs(embed(changed) - embed(text)).max() > 1e-4


def test_map_head_matches_numpy(model_and_params):
  model, params, image, _ = model_and_params
  feats = model.apply({"params": params}, image, method=lambda m, x: m.encoder(x))
  pooled = model.apply({"params": params}, feats, method=lambda m, x: m.map_head(x))
  p, x = jax.tree.map(np.asarray, params["map_head"]), np.asarray(feats)
  a = p["attn"]
  q = np.einsum("d,dnh->nh", p["probe"][0, 0], a["q"]["kernel"]) + a["q"]["bias"]
  k = np.einsum("bsd,dnh->bsnh", x, a["k"]["kernel"]) + a["k"]["bias"]
  v = np.einsum("bsd,dnh->bsnh", x, a["v"]["kernel"]) + a["v"]["bias"]
  w = np.einsum("nh,bsnh->bns", q, k) / np.sqrt(q.shape[-1])
  w = np.exp(w - w.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bns,bsnh,nhd->bd", w, v, a["o"]["kernel"]) + a["o"]["bias"]  # no residual
  ln = (o - o.mean(-1, keepdims=True)) / np.sqrt(o.var(-1, keepdims=True) + 1e-6)
  ln = ln * p["ln_mlp"]["scale"] + p["ln_mlp"]["bias"]
  hid = ln @ p["mlp_in"]["kernel"] + p["mlp_in"]["bias"]
  hid = 0.5 * hid * (1 + np.tanh(np.sqrt(2 / np.pi) * (hid + 0.044715 * hid ** 3)))
  want = o + hid @ p["mlp_out"]["kernel"] + p["mlp_out"]["bias"]
  chex.assert_shape(pooled, (B, 32))
  np.testing.assert_allclose(pooled, want, atol=2e-5)

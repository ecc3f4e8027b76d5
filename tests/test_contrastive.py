"""Contrastive losses against numpy, sharded == unsharded over the full BxB matrix, recall@1, and a tiny
train + eval run of configs/siglip_shapes.py:test through the command line."""
import copy
import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import REPO, command_env, make_run
from mm_jax.tasks import contrastive
from mm_jax.train import sharding
from test_siglip import load_siglip_config


def _np_sigmoid(z):
  m = 2 * np.eye(len(z)) - 1
  return np.mean(np.sum(np.logaddexp(0.0, -m * z), axis=1))  # -log sigmoid(x) = log(1 + e^-x)


def _np_softmax(z):
  lse = lambda a: np.log(np.sum(np.exp(a - a.max(1, keepdims=True)), 1)) + a.max(1)
  return np.mean((lse(z) - np.diag(z)) + (lse(z.T) - np.diag(z))) / 2


@pytest.mark.parametrize("name, ref", [("sigmoid", _np_sigmoid), ("softmax", _np_softmax)])
def test_losses_match_numpy(name, ref):
  z = np.array([[3.0, -2.0, 0.5], [-1.0, 2.5, -4.0], [0.2, 1.0, -0.3]], np.float32)
  np.testing.assert_allclose(contrastive.LOSSES[name](jnp.asarray(z)), ref(z.astype(np.float64)), rtol=1e-6)


def test_sigmoid_loss_hand_value():
  z = np.array([[0.0, 0.0], [0.0, 0.0]])  # every pair log(2): 2 per row
  np.testing.assert_allclose(contrastive.sigmoid_loss(jnp.asarray(z)), 2 * np.log(2.0), rtol=1e-6)


def _losses_and_grads(config, devices, params, batch):
  """Both losses and their grads in one jit (one compile per mesh)."""
  mm, _ = make_run(config, devices, vocab_size=64)
  params = jax.device_put(params, mm.param_shardings)
  batch = jax.device_put(batch, sharding.batch_sharding(mm.mesh))

  def fn(p):
    logits = mm.model.apply({"params": p}, batch["image"], batch["text"])
    return jnp.stack([contrastive.LOSSES[name](logits) for name in ("sigmoid", "softmax")])

  with mm.context():
    losses, grads = jax.jit(lambda p: (fn(p), jax.jacrev(fn)(p)))(params)
  return np.asarray(losses), jax.tree.map(np.asarray, grads), mm


@pytest.mark.slow  # 12-16 s: the full suite runs it, the fast tier leaves it out
def test_sharded_losses_and_grads_equal_one_device():
  config = load_siglip_config("test")
  config.model.family_options.siglip.logit_bias_init = 0.0  # negatives then weigh log 2 each: a per-shard loss would show
  b, s, t = 8, config.data.image_size, config.data.text_len
  batch = {"image": jax.random.uniform(jax.random.key(1), (b, s, s, 3), minval=-1, maxval=1),
           "text": jax.random.randint(jax.random.key(2), (b, t), 0, 64)}
  mm1, _ = make_run(config, jax.devices()[:1], vocab_size=64)
  params = jax.tree.map(np.asarray, mm1.init_params(seed=0))
  losses1, grads1, _ = _losses_and_grads(config, jax.devices()[:1], params, batch)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  losses8, grads8, mm8 = _losses_and_grads(config, jax.devices(), params, batch)
  assert mm8.param_shardings["text"]["block_0"]["attn"]["q"]["kernel"].spec == P("fsdp", "tensor", None)
  np.testing.assert_allclose(losses8, losses1, atol=1e-5, rtol=0)
  jax.tree.map(lambda a, c: np.testing.assert_allclose(a, c, atol=1e-5, rtol=0), grads8, grads1)
  # The same numbers from numpy on the full 8x8 logits; the 4 batch shards alone (2x2 blocks) differ.
  logits = np.asarray(mm1.model.apply({"params": params}, batch["image"], batch["text"]), np.float64)
  for i, ref in enumerate((_np_sigmoid, _np_softmax)):
    np.testing.assert_allclose(losses1[i], ref(logits), rtol=1e-5)
    per_shard = np.mean([ref(logits[j:j + 2, j:j + 2]) for j in range(0, b, 2)])
    assert abs(per_shard - losses1[i]) > 0.1


def test_recall_at_1_hand_made():
  img = np.array([[1.0, 0.0], [0.0, 1.0], [0.7, 0.7]])
  txt = np.array([[1.0, 0.1], [0.6, 0.8], [0.0, 1.0]])
  # sim[image, text]: image 0 -> text 0 (right), image 1 -> text 2 (wrong), image 2 -> text 1 (wrong)
  # text 0 -> image 0 (right), text 1 -> image 2 (wrong), text 2 -> image 1 (wrong)
  r = contrastive.recall_at_1(img, txt)
  assert r == {"i2t_recall@1": pytest.approx(1 / 3), "t2i_recall@1": pytest.approx(1 / 3)}
  img, txt = np.array([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]]), np.array([[1.0, 0.0], [0.0, 1.0], [0.9, 0.44]])
  # every image finds its text, but text 2 prefers image 0 (0.9 > 0.892): the two directions differ
  r = contrastive.recall_at_1(img, txt)
  assert r == {"i2t_recall@1": pytest.approx(1.0), "t2i_recall@1": pytest.approx(2 / 3)}


def test_unique_indices():
  assert contrastive.unique_indices(["a", "b", "a", "c", "b", "d"]) == [3, 5]


def _run(module, workdir, data_dir, *extra):
  env = command_env()
  cmd = [sys.executable, "-m", f"mm_jax.{module}", f"--config={REPO}/configs/siglip_shapes.py:test",
         f"--workdir={workdir}", f"--config.data.data_dir={data_dir}", *extra]
  r = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


@pytest.mark.slow  # trains end to end
def test_train_eval_and_load_the_encoder_into_the_unified_model(test_config, tmp_path):
  data_dir = test_config.data.data_dir
  _run("train", tmp_path, data_dir)
  r = _run("eval", tmp_path, data_dir)
  result = json.loads((tmp_path / "eval" / "test.json").read_text())
  assert {"step", "split", "num_examples", "i2t_recall@1", "t2i_recall@1"} <= set(result)
  assert result["step"] == 4 and result["split"] == "test"
  assert 0 < result["num_examples"] <= 16 and 0.0 <= result["i2t_recall@1"] <= 1.0
  assert "i2t_recall@1" in r.stdout
  # The unified model reads this encoder by name (init.parts), and nothing else.
  from mm_jax.checkpoint import Checkpoints  # pylint: disable=g-import-not-at-top
  from mm_jax.checkpoint.parts import load_parts, map_parts  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(test_config)
  mm, _ = make_run(config, jax.devices()[:1], vocab_size=64)
  plans = map_parts(((str(tmp_path), "encoder/", "encoder/"),), mm.abstract_params)
  fresh = mm.init_params(seed=0)
  loaded = load_parts(plans, fresh)
  saved = Checkpoints(str(tmp_path), read_only=True)
  sig_encoder = saved.restore_params(4, {"encoder": mm.abstract_params["encoder"]})["encoder"]
  jax.tree.map(lambda a, c: np.testing.assert_array_equal(a, c), loaded["encoder"], sig_encoder)
  np.testing.assert_array_equal(loaded["decoder"]["embedder"]["embedding"],
                                fresh["decoder"]["embedder"]["embedding"])
  assert not np.array_equal(loaded["encoder"]["pos_embedding"], fresh["encoder"]["pos_embedding"])

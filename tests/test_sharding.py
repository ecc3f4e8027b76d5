"""Mesh from config, shardings from logical names, and the train step on an 8-device mesh."""
import copy

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import make_run
from mm_jax import sharding
from mm_jax.data import pipeline
from mm_jax.errors import UserError


def test_mesh_fills_minus_one():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}


@pytest.mark.parametrize("cfg, msg", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices but 8 are present"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one -1"),
    ({"data": -1, "pipeline": 2}, "unknown mesh axes"),
])
def test_bad_mesh_is_an_error(cfg, msg):
  with pytest.raises(UserError, match=msg):
    sharding.make_mesh(cfg)


def test_batch_not_divisible_by_data_parallel_size():
  mesh = sharding.make_mesh({"data": 4, "fsdp": 2, "tensor": 1})
  with pytest.raises(UserError, match="global_batch_size=12 is not divisible by the data-parallel size 8"):
    sharding.check_batch(12, mesh)
  sharding.check_batch(16, mesh)


def test_params_born_sharded_by_logical_names(test_config):
  config = copy.deepcopy(test_config)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  mm, _ = make_run(config, jax.devices(), vocab_size=64)
  params = mm.init_params(seed=0)
  emb = params["decoder"]["embedder"]["embedding"]
  assert emb.sharding.spec == P("tensor", "fsdp")  # (vocab, embed)
  assert emb.addressable_shards[0].data.shape == (32, 16)
  q = params["decoder"]["block_0"]["attn"]["q"]["kernel"]  # (embed, heads, head_dim)
  assert q.sharding.spec == P("fsdp", "tensor", None)


def test_undividable_dims_are_replicated(test_config):
  config = copy.deepcopy(test_config)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.model.decoder.update(num_heads=3, num_kv_heads=1)  # 3 heads do not split over tensor=2
  mm, _ = make_run(config, jax.devices(), vocab_size=64)
  assert mm.param_shardings["decoder"]["block_0"]["attn"]["q"]["kernel"].spec == P("fsdp", None, None)


def _losses(config, devices, tokenizer, source, steps=3):
  mm, tx = make_run(config, devices, tokenizer.vocab_size)
  state = mm.init_train_state(tx, seed=0)
  step = mm.make_train_step(tx)
  it = pipeline.train_iterator(config, tokenizer, source, process_index=0, process_count=1)
  out = []
  for _ in range(steps):
    state, metrics = step(state, sharding.to_global(next(it), mm.mesh))
    out.append(float(metrics["loss"]))
  return np.array(out)


def test_train_step_on_2x2x2_mesh_matches_one_device(test_config, tokenizer, train_source):
  config = copy.deepcopy(test_config)
  one = _losses(config, jax.devices()[:1], tokenizer, train_source)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  eight = _losses(config, jax.devices(), tokenizer, train_source)
  assert one[-1] != one[0]  # it trains
  np.testing.assert_allclose(eight, one, atol=1e-5, rtol=0)


def test_optimizer_state_takes_the_params_shardings(test_config):
  config = copy.deepcopy(test_config)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.optim.rules = (("decoder/.*", "trainable"), (".*", "frozen"))
  mm, tx = make_run(config, jax.devices(), vocab_size=64)
  opt = mm.abstract_train_state(tx)["opt_state"]
  flat = jax.tree_util.tree_flatten_with_path(opt)[0]
  emb = [x for p, x in flat if "embedder" in jax.tree_util.keystr(p)]
  assert len(emb) == 2  # Adam's mu and nu
  assert all(x.sharding.spec == P("tensor", "fsdp") for x in emb)
  scalars = [x for _, x in flat if x.ndim == 0]
  assert scalars and all(x.sharding.spec == P() for x in scalars)

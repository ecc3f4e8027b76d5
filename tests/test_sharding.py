"""Mesh from config (one slice and several), the rules, and every sharding strategy on 8 devices: the
1-device loss, with params and optimizer state split as the strategy says."""
import copy
import types

import flax.linen as nn
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from conftest import load_config, make_run
from mm_jax.train import sharding
from mm_jax.data import pipeline
from mm_jax.errors import UserError

STEPS = 3


def test_mesh_fills_minus_one():
  mesh = sharding.make_mesh({"data": -1, "fsdp": 2, "tensor": 2})
  assert dict(mesh.shape) == {"dcn": 1, "data": 2, "fsdp": 2, "tensor": 2}
  mesh = sharding.make_mesh({"dcn": 2, "data": 1, "fsdp": -1})
  assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 4, "tensor": 1}
  assert mesh.axis_names == sharding.MESH_AXES


@pytest.mark.parametrize("cfg, msg", [
    ({"data": 3, "fsdp": 1, "tensor": 1}, "needs 3 devices but 8 are present"),
    ({"data": -1, "fsdp": 3, "tensor": 1}, "does not divide the 8 devices"),
    ({"data": -1, "fsdp": -1, "tensor": 1}, "at most one -1"),
    ({"dcn": 0, "data": -1}, "use positive sizes"),
    ({"data": -1, "pipeline": 2}, "unknown mesh axes"),
])
def test_bad_mesh_is_an_error(cfg, msg):
  with pytest.raises(UserError, match=msg):
    sharding.make_mesh(cfg)


def _fake_slices(slices, per_slice):
  """Devices as TPU slices report them (slice_index), for the shape logic alone."""
  return [types.SimpleNamespace(slice_index=s, id=s * per_slice + i)
          for s in range(slices) for i in range(per_slice)]


def test_several_slices_make_dcn_the_slices():
  devices = _fake_slices(2, 16)
  assert sharding.mesh_shape({"data": -1}, devices) == (
      {"dcn": 2, "data": 16, "fsdp": 1, "tensor": 1}, 2)  # dcn left at 1: the slice count
  assert sharding.mesh_shape({"dcn": -1, "fsdp": 8, "tensor": 2}, devices)[0]["dcn"] == 2
  with pytest.raises(UserError, match="mesh.dcn=4 but the devices span 2 slices"):
    sharding.mesh_shape({"dcn": 4, "data": -1}, devices)
  with pytest.raises(UserError, match="does not divide the 16 devices of each of the 2 slices"):
    sharding.mesh_shape({"data": 3, "fsdp": -1}, devices)
  assert sharding.mesh_shape({"dcn": 2, "data": -1}, jax.devices())[1] == 1  # CPU: no slices


def test_hybrid_mesh_on_tpu_slices():
  """Compile-only TPU devices of 2 slices (needs libtpu; mm_jax.plan builds such meshes)."""
  pytest.importorskip("libtpu")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  devices = topologies.get_topology_desc(
      platform="tpu", topology_name="v5e:4x4", chip_config_name="default",
      chips_per_host_bounds=(2, 2, 1), num_slices=2).devices
  mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 2}, devices)
  assert dict(mesh.shape) == {"dcn": 2, "data": 1, "fsdp": 8, "tensor": 2}
  slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
  np.testing.assert_array_equal(slice_of, np.arange(2).reshape(2, 1, 1, 1) + np.zeros((1, 1, 8, 2)))


def test_batch_not_divisible_by_data_parallel_size():
  mesh = sharding.make_mesh({"dcn": 2, "data": 2, "fsdp": 2, "tensor": 1})
  with pytest.raises(UserError, match=r"global_batch_size=12 is not divisible by the data-parallel "
                                      r"size 8 \(mesh dcn x data x fsdp = 2 x 2 x 2\)"):
    sharding.check_batch(12, mesh)
  sharding.check_batch(16, mesh)


def test_batch_rows_not_split_by_process_is_an_error(monkeypatch):
  mesh = sharding.make_mesh({"data": 8})
  monkeypatch.setattr(jax, "process_count", lambda: 2)  # 2 processes, but every device in process 0
  with pytest.raises(UserError, match="does not give each of the 2 processes its own 8 rows"):
    sharding.check_batch(16, mesh)


def test_rules_map_activations_and_unlisted_names():
  rules = load_config("test").axis_rules
  assert nn.logical_to_mesh_axes(("act_batch", "act_len", "act_heads", None), rules) == P(
      ("dcn", "data", "fsdp"), None, "tensor", None)
  assert nn.logical_to_mesh_axes(("act_batch", "act_len", "act_mlp"), rules)[2] == "tensor"
  assert nn.logical_to_mesh_axes(("act_batch", "act_len", "act_vocab"), rules)[2] == "tensor"
  assert nn.logical_to_mesh_axes(("act_batch", "act_len", "act_embed"), rules)[1:] == (None, None)
  assert nn.logical_to_mesh_axes(("layers", "embed", "mlp"), rules) == P(None, "fsdp", "tensor")
  assert nn.logical_to_mesh_axes(("unlisted", "heads"), rules) == P(None, "tensor")


def test_undividable_dims_are_replicated(test_config):
  config = copy.deepcopy(test_config)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.model.decoder.update(num_heads=3, num_kv_heads=1)  # 3 heads do not split over tensor=2
  mm, _ = make_run(config, jax.devices(), vocab_size=64)
  assert mm.param_shardings["decoder"]["block_0"]["attn"]["q"]["kernel"].spec == P("fsdp", None, None)


# Strategy -> (mesh, splits of the embedding (vocab, embed), of a q kernel (embed, heads, head_dim)).
STRATEGIES = {
    "dp8": (dict(data=8), (1, 1), (1, 1, 1)),
    "fsdp8": (dict(data=1, fsdp=8), (1, 8), (8, 1, 1)),
    "tp2_dp4": (dict(data=4, tensor=2), (2, 1), (1, 2, 1)),
    "fsdp4_tp2": (dict(data=1, fsdp=4, tensor=2), (2, 4), (4, 2, 1)),
    "dp2_fsdp2_tp2": (dict(data=2, fsdp=2, tensor=2), (2, 2), (2, 2, 1)),
    "dcn2_fsdp4": (dict(dcn=2, data=1, fsdp=4), (1, 4), (4, 1, 1)),
    "dcn2_dp2_tp2": (dict(dcn=2, data=2, tensor=2), (2, 1), (1, 2, 1)),
}


@pytest.fixture(scope="module")
def small_config(test_config):
  """The test config with one decoder block: each strategy compiles its own train step (the time)."""
  config = copy.deepcopy(test_config)
  config.model.decoder.depth = 1
  return config


@pytest.fixture(scope="module")
def batches(small_config, tokenizer, train_source):
  it = pipeline.train_iterator(small_config, tokenizer, train_source, process_index=0, process_count=1)
  return [next(it) for _ in range(STEPS)]


def _train(config, devices, vocab_size, batches, start=None):
  """(ModelOnMesh, step-0 state on host, final state, losses) of STEPS steps from `start` (a host
  state, put onto this mesh's shardings) or the init of seed 0."""
  mm, tx = make_run(config, devices, vocab_size)
  if start is None:
    state = mm.init_train_state(tx, seed=0)
    start = jax.tree.map(np.asarray, state)
  else:  # The init compiled once, not per strategy: the 1-device one, re-sharded.
    shardings = jax.tree.map(lambda x: x.sharding, mm.abstract_train_state(tx))
    state = jax.device_put(start, shardings)
  step, losses = mm.make_train_step(tx), []
  for batch in batches:
    state, out = step(state, sharding.to_global(batch, mm.mesh))
    losses.append(float(out["loss"]))
  return mm, start, state, np.array(losses)


@pytest.fixture(scope="module")
def one_device(small_config, tokenizer, batches):
  """(step-0 state on host, losses) on a 1-device mesh."""
  _, start, _, losses = _train(small_config, jax.devices()[:1], tokenizer.vocab_size, batches)
  assert losses[-1] < losses[0] - 0.01  # it trains
  return start, losses


def _splits(x) -> tuple[int, ...]:
  """How many ways each dim of a global array is split across devices."""
  return tuple(full // part for full, part in zip(x.shape, x.sharding.shard_shape(x.shape)))


def _bytes_per_device(tree) -> float:
  return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree) if x.ndim)


def _bytes(tree) -> float:
  return sum(x.nbytes for x in jax.tree.leaves(tree) if x.ndim)


@pytest.mark.parametrize("name", STRATEGIES)
def test_strategy_gives_the_one_device_loss(name, small_config, tokenizer, batches, one_device):
  mesh_cfg, emb_splits, q_splits = STRATEGIES[name]
  config = copy.deepcopy(small_config)
  config.mesh.update(dict(dict(dcn=1, data=1, fsdp=1, tensor=1), **mesh_cfg))
  start, expected = one_device
  mm, _, state, losses = _train(config, jax.devices(), tokenizer.vocab_size, batches, start)
  np.testing.assert_allclose(losses, expected, atol=1e-5, rtol=0)
  print(f"{name}: max |loss - 1-device loss| = {np.abs(losses - expected).max():.2e}")

  params, opt = state["params"], state["opt_state"]
  assert _splits(params["decoder"]["embedder"]["embedding"]) == emb_splits
  assert _splits(params["decoder"]["block_0"]["attn"]["q"]["kernel"]) == q_splits
  dp = sharding.data_parallel_size(mm.mesh)
  assert _splits(sharding.to_global(batches[0], mm.mesh)["text"]) == (dp, 1)
  # Every weight with an `embed` dim (nearly all bytes) is split fsdp ways; Adam's mu and nu follow.
  fsdp, tensor = mm.mesh.shape["fsdp"], mm.mesh.shape["tensor"]
  for tree in (params, opt):
    fraction = _bytes_per_device(tree) / _bytes(tree)
    assert 1 / (fsdp * tensor) - 1e-9 <= fraction <= 1.15 / fsdp, (name, fraction)
  mu = [x for p, x in jax.tree_util.tree_flatten_with_path(opt)[0]
        if "embedder" in jax.tree_util.keystr(p)]
  assert len(mu) == 2 and all(_splits(x) == emb_splits for x in mu)  # Adam's mu and nu


def test_frozen_params_have_no_optimizer_state_and_scalars_are_replicated(test_config):
  config = copy.deepcopy(test_config)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  config.optim.rules = (("decoder/.*", "trainable"), (".*", "frozen"))
  mm, tx = make_run(config, jax.devices(), vocab_size=64)
  flat = jax.tree_util.tree_flatten_with_path(mm.abstract_train_state(tx)["opt_state"])[0]
  emb = [x for p, x in flat if "embedder" in jax.tree_util.keystr(p)]
  assert len(emb) == 2 and all(x.sharding.spec == P("tensor", "fsdp") for x in emb)
  assert not [p for p, x in flat if "encoder" in jax.tree_util.keystr(p) and x.ndim]
  scalars = [x for _, x in flat if x.ndim == 0]
  assert scalars and all(x.sharding.spec == P() for x in scalars)


def test_scanned_stacks_keep_the_layers_axis_replicated(test_config):
  config = copy.deepcopy(test_config)
  config.model.decoder.scan = config.model.encoder.scan = True
  config.mesh.update(data=1, fsdp=4, tensor=2)
  mm, _ = make_run(config, jax.devices(), vocab_size=64)
  blocks = mm.param_shardings["decoder"]["blocks"]
  assert blocks["attn"]["q"]["kernel"].spec == P(None, "fsdp", "tensor", None)  # (layers, embed, heads, hd)
  assert mm.param_shardings["encoder"]["blocks"]["mlp_in"]["kernel"].spec == P(None, "fsdp", "tensor")

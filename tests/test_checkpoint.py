"""Checkpoints: exact save -> restore (params, optimizer state, data position, next loss), across meshes,
and the architecture check."""
import copy

import jax
import numpy as np
import pytest

from conftest import make_run
from mm_jax.train import sharding
from mm_jax.checkpoint import Checkpoints
from mm_jax.data import pipeline
from mm_jax.errors import UserError


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _iterator(config, tokenizer, source):
  return pipeline.train_iterator(config, tokenizer, source, process_index=0, process_count=1)


def _trained(config, devices, tokenizer, source, workdir, steps=2):
  """Trains `steps` steps, saves, and returns (mm, tx, host copy of the saved state, iterator)."""
  mm, tx = make_run(config, devices, tokenizer.vocab_size)
  state, step = mm.init_train_state(tx, seed=0), mm.make_train_step(tx)
  it = _iterator(config, tokenizer, source)
  for _ in range(steps):
    state, _ = step(state, sharding.to_global(next(it), mm.mesh))
  ckpt = Checkpoints(workdir)
  ckpt.save(steps, state, it, config)
  ckpt.wait()
  ckpt.close()
  return mm, tx, state, it


@pytest.mark.slow  # trains end to end
def test_save_restore_is_exact_and_resumes_the_data(test_config, tokenizer, train_source, tmp_path):
  config = copy.deepcopy(test_config)
  mm, tx, state, it = _trained(config, jax.devices()[:1], tokenizer, train_source, tmp_path)
  saved = _host(state)
  next_batch = next(it)
  _, uninterrupted = mm.make_train_step(tx)(state, sharding.to_global(next_batch, mm.mesh))

  it2 = _iterator(config, tokenizer, train_source)
  ckpt = Checkpoints(tmp_path)
  assert ckpt.latest_step() == 2
  restored = ckpt.restore(2, mm.abstract_train_state(tx), it2)
  jax.tree.map(np.testing.assert_array_equal, saved["params"], _host(restored["params"]))
  jax.tree.map(np.testing.assert_array_equal, saved["opt_state"], _host(restored["opt_state"]))
  assert int(restored["step"]) == 2
  batch = next(it2)
  jax.tree.map(np.testing.assert_array_equal, next_batch, batch)
  _, resumed = mm.make_train_step(tx)(restored, sharding.to_global(batch, mm.mesh))
  assert float(resumed["loss"]) == float(uninterrupted["loss"])


@pytest.mark.slow  # long: decodes, or trains and resumes, several times
def test_checkpoint_from_8_devices_restores_on_1(test_config, tokenizer, train_source, tmp_path):
  config = copy.deepcopy(test_config)
  config.mesh.update(data=2, fsdp=2, tensor=2)
  _, _, state, _ = _trained(config, jax.devices(), tokenizer, train_source, tmp_path)
  saved = _host(state)
  config.mesh.update(data=1, fsdp=1, tensor=1)
  mm1, tx1 = make_run(config, jax.devices()[:1], tokenizer.vocab_size)
  restored = Checkpoints(tmp_path).restore(2, mm1.abstract_train_state(tx1),
                                           _iterator(config, tokenizer, train_source))
  leaf = restored["params"]["decoder"]["embedder"]["embedding"]
  assert leaf.sharding.device_set == {jax.devices()[0]}
  jax.tree.map(np.testing.assert_array_equal, saved["params"], _host(restored["params"]))
  jax.tree.map(np.testing.assert_array_equal, saved["opt_state"], _host(restored["opt_state"]))
  # Params alone (what eval reads) restore too.
  params = Checkpoints(tmp_path, read_only=True).restore_params(2, mm1.abstract_params)
  jax.tree.map(np.testing.assert_array_equal, saved["params"], _host(params))


@pytest.mark.slow  # trains and saves first
def test_other_architecture_is_refused(test_config, tokenizer, train_source, tmp_path):
  config = copy.deepcopy(test_config)
  _trained(config, jax.devices()[:1], tokenizer, train_source, tmp_path, steps=1)
  config.model.decoder.mlp_dim = 96
  mm, _ = make_run(config, jax.devices()[:1], tokenizer.vocab_size)
  with pytest.raises(UserError, match=r"belongs to another architecture: \d+ parameters differ \(first: "
                                      r"decoder/block_0/down/kernel: float32\[64, 32\] in the checkpoint"):
    Checkpoints(tmp_path, read_only=True).check_compatible(1, mm.abstract_params)


@pytest.mark.slow  # trains and saves first
def test_changed_optim_rules_are_refused_in_one_line(test_config, tokenizer, train_source, tmp_path):
  config = copy.deepcopy(test_config)
  _trained(config, jax.devices()[:1], tokenizer, train_source, tmp_path, steps=1)
  config.optim.rules = (("decoder/.*", "frozen"), (".*", "trainable"))  # no Adam moments for the LLM
  mm, tx = make_run(config, jax.devices()[:1], tokenizer.vocab_size)
  ckpt = Checkpoints(tmp_path, read_only=True)
  ckpt.check_compatible(1, mm.abstract_params)  # the params are the same
  with pytest.raises(UserError, match=r"holds another optimizer state than this config makes: \d+ arrays "
                                      r"differ \(first: opt_state\.\S+decoder\S+: shape \[.*\] in the "
                                      r"checkpoint, absent in this config\); the optimizer or optim.rules "
                                      r"changed") as e:
    ckpt.restore(1, mm.abstract_train_state(tx), _iterator(config, tokenizer, train_source))
  assert "\n" not in str(e.value) and "init.parts" in str(e.value)


@pytest.mark.slow  # long: decodes, or trains and resumes, several times
def test_a_checkpoint_without_the_numerics_state_resumes_with_zeros(test_config, tokenizer, train_source,
                                                                     tmp_path):
  """Checkpoints written before the run kept state["numerics"] still resume."""
  config = copy.deepcopy(test_config)
  mm, tx = make_run(config, jax.devices()[:1], tokenizer.vocab_size)
  state, it = mm.init_train_state(tx, seed=0), _iterator(config, tokenizer, train_source)
  state, _ = mm.make_train_step(tx)(state, sharding.to_global(next(it), mm.mesh))
  old = {k: v for k, v in state.items() if k != "numerics"}
  saved = _host(old)
  ckpt = Checkpoints(tmp_path)
  ckpt.save(1, old, it, config)
  ckpt.close()
  restored = Checkpoints(tmp_path, read_only=True).restore(
      1, mm.abstract_train_state(tx), _iterator(config, tokenizer, train_source))
  jax.tree.map(np.testing.assert_array_equal, saved["params"], _host(restored["params"]))
  jax.tree.map(np.testing.assert_array_equal, saved["opt_state"], _host(restored["opt_state"]))
  assert set(restored["numerics"]) == set(state["numerics"])
  for name, x in restored["numerics"].items():
    assert x.shape == state["numerics"][name].shape and not np.asarray(x).any(), name
  # and training goes on from it
  _, out = mm.make_train_step(tx)(restored, sharding.to_global(next(it), mm.mesh))
  assert np.isfinite(float(out["loss"]))


def test_read_only_on_a_missing_workdir_creates_nothing(tmp_path):
  ckpt = Checkpoints(tmp_path / "absent", read_only=True)
  assert ckpt.latest_step() is None and ckpt.all_steps() == []
  assert not (tmp_path / "absent").exists()

"""init.parts: params loaded by name from another run's checkpoint onto this model's mesh, the rest left
as they were, and the errors that name a wrong prefix, size or directory."""
import copy

import jax
import numpy as np
import pytest

from conftest import make_run
from mm_jax.checkpoint import Checkpoints
from mm_jax.errors import UserError
from mm_jax.checkpoint.parts import load_parts, map_parts


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _saved_params(config, devices, vocab, workdir, seed):
  """Saves freshly initialised params (as an import does) and returns them on the host."""
  mm, _ = make_run(config, devices, vocab)
  params = mm.init_params(seed)
  ckpt = Checkpoints(workdir)
  ckpt.save_params(0, params, config)
  ckpt.wait()
  ckpt.close()
  return _host(params)


@pytest.mark.slow  # trains, saves and loads parts
def test_parts_load_by_name_and_leave_the_rest(test_config, tmp_path):
  config = copy.deepcopy(test_config)
  src = _saved_params(config, jax.devices()[:1], 40, tmp_path / "src", seed=1)
  # The destination: another mesh (8 devices), its own init, the encoder from `src`.
  mm, _ = make_run(config, jax.devices(), 40)
  fresh = mm.init_params(seed=2)
  before = _host(fresh)
  plans = map_parts(((str(tmp_path / "src"), "encoder/", "encoder/"),), mm.abstract_params)
  loaded = _host(load_parts(plans, fresh))
  jax.tree.map(np.testing.assert_array_equal, loaded["encoder"], src["encoder"])
  jax.tree.map(np.testing.assert_array_equal, loaded["decoder"], before["decoder"])
  assert not np.array_equal(loaded["encoder"]["pos_embedding"], before["encoder"]["pos_embedding"])


def test_parts_errors_name_the_problem(test_config, tmp_path):
  config = copy.deepcopy(test_config)
  _saved_params(config, jax.devices()[:1], 40, tmp_path / "src", seed=1)
  wide = copy.deepcopy(config)
  wide.model.encoder.width = 64
  mm, _ = make_run(wide, jax.devices()[:1], 40)
  src = str(tmp_path / "src")
  with pytest.raises(UserError, match=r"encoder/.* is float32\[.*in the checkpoint but .* architectures differ"):
    map_parts(((src, "encoder/", "encoder/"),), mm.abstract_params)
  with pytest.raises(UserError, match=r"vision/block_0/attn/k/bias \(for encoder/block_0/attn/k/bias\) is not in"):
    map_parts(((src, "vision/", "encoder/"),), mm.abstract_params)
  with pytest.raises(UserError, match="no parameter of this model starts with 'nope/'"):
    map_parts(((src, "encoder/", "nope/"),), mm.abstract_params)
  with pytest.raises(UserError, match="no checkpoint in"):
    map_parts(((str(tmp_path / "absent"), "", ""),), mm.abstract_params)

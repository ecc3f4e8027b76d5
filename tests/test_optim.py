"""Freeze rules: coverage errors, frozen params untouched, optimizer state only for trainable params."""
import copy

import jax
import numpy as np
import pytest

from conftest import make_run
from mm_jax.train import optim
from mm_jax.train import sharding
from mm_jax.data import pipeline
from mm_jax.errors import UserError

PARAMS = {"encoder": {"w": np.zeros((2, 3))}, "connector": {"proj": {"kernel": np.zeros(3)}},
          "decoder": {"b": np.zeros(4)}}


def test_first_matching_rule_wins():
  labels = optim.param_labels(PARAMS, (("connector/.*", "trainable"), (".*", "frozen")))
  assert labels == {"encoder": {"w": "frozen"}, "connector": {"proj": {"kernel": "trainable"}},
                    "decoder": {"b": "frozen"}}


def test_uncovered_params_are_an_error_naming_them():
  with pytest.raises(UserError, match=r"leave 2 parameters uncovered \(decoder/b, encoder/w\).*add a rule"):
    optim.param_labels(PARAMS, (("connector/.*", "trainable"),))


@pytest.mark.parametrize("rule", [("x", "train"), ("(", "frozen"), ("x",)])
def test_malformed_rules_are_errors(rule):
  with pytest.raises(UserError, match="optim.rules"):
    optim.param_labels(PARAMS, (rule,))


def test_connector_only_step_freezes_encoder_and_decoder(test_config, tokenizer, train_source):
  config = copy.deepcopy(test_config)
  config.optim.rules = (("connector/.*", "trainable"), (".*", "frozen"))
  mm, tx = make_run(config, jax.devices()[:1], tokenizer.vocab_size)
  state = mm.init_train_state(tx, seed=0)
  before = jax.tree.map(np.asarray, state["params"])
  batch = next(pipeline.train_iterator(config, tokenizer, train_source, process_index=0, process_count=1))
  step = mm.make_train_step(tx)
  for _ in range(2):  # step 0 has lr 0 (warmup)
    state, _ = step(state, sharding.to_global(batch, mm.mesh))
  after = jax.tree.map(np.asarray, state["params"])
  for part in ("encoder", "decoder"):
    jax.tree.map(np.testing.assert_array_equal, before[part], after[part])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(a - b).max(), before["connector"],
                                       after["connector"]))
  assert max(moved) > 0
  # Adam's two moments for the connector only; the rest of the state is scalars (counts).
  n_connector = sum(x.size for x in jax.tree.leaves(before["connector"]))
  state_arrays = [x for x in jax.tree.leaves(state["opt_state"]) if getattr(x, "ndim", 0) > 0]
  assert sum(x.size for x in state_arrays) == 2 * n_connector


def test_lr_factors_first_match_and_errors():
  labels = optim.param_labels(PARAMS, (("decoder/.*", "frozen"), (".*", "trainable")))
  assert optim.lr_factors(labels, (("encoder/.*", 0.1), (".*", 1.0))) == {"encoder/w": 0.1}
  with pytest.raises(UserError, match="'decodr/.*' matches no trainable parameter"):
    optim.lr_factors(labels, (("decodr/.*", 0.5),))
  with pytest.raises(UserError, match="'decoder/.*' matches no trainable"):  # frozen: nothing to scale
    optim.lr_factors(labels, (("decoder/.*", 0.5),))
  with pytest.raises(UserError, match=r"must be \(regex, factor >= 0\)"):
    optim.lr_factors(labels, (("encoder/.*", "fast"),))


@pytest.mark.slow  # 12-16 s: the full suite runs it, the fast tier leaves it out
def test_lr_scales_scale_the_update_of_their_group_only(test_config, tokenizer, train_source):
  """One step at factor 0.25 on the encoder: its update is a quarter of the unscaled run's, the rest
  of the model moves exactly as without scales (one global clip, the same Adam state)."""
  batch = next(pipeline.train_iterator(test_config, tokenizer, train_source, process_index=0,
                                       process_count=1))
  moves = {}
  for scales in ((), (("encoder/.*", 0.25),)):
    config = copy.deepcopy(test_config)
    config.optim.lr_scales = scales
    mm, tx = make_run(config, jax.devices()[:1], tokenizer.vocab_size)
    state = mm.init_train_state(tx, seed=0)
    before = jax.tree.map(np.asarray, state["params"])
    step = mm.make_train_step(tx)
    for _ in range(2):  # step 0 has lr 0 (warmup)
      state, _ = step(state, sharding.to_global(batch, mm.mesh))
    moves[scales] = jax.tree.map(lambda a, b: np.asarray(b) - a, before, state["params"])
  plain, scaled = moves[()], moves[(("encoder/.*", 0.25),)]
  for a, b in zip(jax.tree.leaves(plain["encoder"]), jax.tree.leaves(scaled["encoder"])):
    np.testing.assert_allclose(b, 0.25 * a, rtol=1e-4, atol=1e-9)
  assert max(np.abs(x).max() for x in jax.tree.leaves(plain["encoder"])) > 0
  for part in ("connector", "decoder"):
    jax.tree.map(np.testing.assert_allclose, plain[part], scaled[part])

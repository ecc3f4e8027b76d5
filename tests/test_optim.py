"""Freeze rules: coverage errors, frozen params untouched, optimizer state only for trainable params."""
import copy

import jax
import numpy as np
import pytest

from conftest import make_run
from mm_jax import optim, sharding
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

"""Non-finite steps (optim.nonfinite): the check names the step and the parameter groups, "stop" keeps
the last finite state and saves nothing after it, "skip" drops the update and counts it, and a finite
step is bitwise the unchecked one."""
import copy
import dataclasses
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import make_run
from mm_jax.train import optim
from mm_jax.train import sharding
from mm_jax.train import loop as train
from mm_jax.checkpoint import Checkpoints
from mm_jax.data import pipeline
from mm_jax.tasks import TASKS
from mm_jax.errors import UserError

POISONED = "decoder/block_1/up/kernel"


def test_param_groups_name_layers_scanned_or_not_and_skip_frozen():
  params = {"connector": {"proj": {"kernel": np.zeros((2, 2))}},
            "decoder": {"blocks": {"w": np.zeros((3, 2, 2))}, "embedder": {"e": np.zeros((4, 2))}},
            "encoder": {"block_0": {"w": np.zeros((2, 2))}, "pos": np.zeros(3)}}
  labels = optim.param_labels(params, (("encoder/.*", "frozen"), (".*", "trainable")))
  groups = optim.param_groups(params, labels)
  assert groups.names == ("connector/proj", "decoder/block_0", "decoder/block_1", "decoder/block_2",
                          "decoder/embedder", "encoder/block_0", "encoder/pos")
  grads = jax.tree.map(np.ones_like, params)
  grads["decoder"]["blocks"]["w"][1, 0, 0] = np.inf
  grads["encoder"]["pos"][0] = np.nan  # frozen: never read
  finite = np.asarray(jax.jit(groups.finite)(grads))
  assert finite.tolist() == [True, True, False, True, True, True, True]
  assert groups.describe(~finite) == "decoder/block_1"
  assert groups.describe([True] * 7) == "connector/proj, decoder"  # encoder is frozen: never bad


@pytest.mark.parametrize("field, value", [("nonfinite", "ignore"), ("max_consecutive_skips", 0)])
def test_bad_policy_fields_are_user_errors(test_config, field, value):
  cfg = copy.deepcopy(test_config.optim)
  cfg[field] = value
  with pytest.raises(UserError, match=f"optim.{field}="):
    optim.nonfinite_policy(cfg)


def _poisonable(monkeypatch):
  """The vqa loss plus 0 * sqrt(0 * W) for W = POISONED where batch["poison"] is 1: the same loss, and
  a NaN gradient (0 * inf) in that one parameter only."""
  task = TASKS["vqa"]

  def loss(model, params, batch, optim_cfg):
    batch = dict(batch)
    flag = jnp.max(batch.pop("poison"))
    w = functools.reduce(lambda t, k: t[k], POISONED.split("/"), params)
    return task.loss(model, params, batch, optim_cfg) + 0.0 * jnp.sum(jnp.sqrt(w * 0.0 + (1 - flag)))
  monkeypatch.setitem(TASKS, "vqa", dataclasses.replace(task, loss=loss))


class _Ckpt:
  def wait(self):
    pass

  def latest_step(self):
    return 2


def _batches(config, tokenizer, source, n):
  it = pipeline.train_iterator(config, tokenizer, source, process_index=0, process_count=1)
  return [next(it) for _ in range(n)]


def _host(tree):
  return jax.tree.map(np.asarray, tree)


def _run(mm, tx, step, batches, poisoned_steps, start=None):
  """(states[i]: the state after step i on the host (0: `start`, default the init of seed 0), the last
  state) of `step` over `batches`, batch i poisoned if i is in poisoned_steps."""
  if start is None:
    state = mm.init_train_state(tx, seed=0)
  else:  # a host copy: no second compile of the init
    state = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), start, mm.abstract_train_state(tx))
  states = [_host(state)]
  for i, batch in enumerate(batches, 1):
    poison = np.full(len(batch["text"]), i in poisoned_steps, np.float32)
    state, _ = step(state, sharding.to_global(dict(batch, poison=poison), mm.mesh))
    states.append(_host(state))
  return states, state


@pytest.mark.slow  # long: decodes, or trains and resumes, several times
def test_stop_keeps_the_last_finite_state_and_names_the_group(test_config, tokenizer, train_source,
                                                               monkeypatch):
  """Steps 1-2 finite: bitwise the step without the check; step 3 has a NaN gradient in one group:
  it and every later step apply nothing, and the check names step 3 and the group."""
  _poisonable(monkeypatch)
  mm, tx = make_run(test_config, jax.devices()[:1], tokenizer.vocab_size)
  batches = _batches(test_config, tokenizer, train_source, 4)
  states, last = _run(mm, tx, mm.make_train_step(tx), batches, {3})
  task = TASKS[mm.model.task]

  @jax.jit
  def unchecked(params, opt, batch):  # the step as it was before the check
    grads = jax.grad(functools.partial(task.loss, mm.model, optim_cfg=mm.config.optim))(params, batch)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  params, opt = states[0]["params"], states[0]["opt_state"]
  with mm.context():
    for batch in batches[:2]:
      params, opt = unchecked(params, opt, dict(batch, poison=np.zeros(len(batch["text"]), np.float32)))
  jax.tree.map(np.testing.assert_array_equal, states[2]["params"], _host(params))
  jax.tree.map(np.testing.assert_array_equal, states[2]["opt_state"], _host(opt))
  for s in states[3:]:
    for part in ("params", "opt_state"):
      jax.tree.map(np.testing.assert_array_equal, states[2][part], s[part])
  assert [int(s["numerics"]["halted"]) for s in states] == [0, 0, 0, 3, 3]
  with pytest.raises(UserError, match=r"^the gradients of decoder/block_1 went non-finite at step 3; "
                     r"the last checkpoint is step 2, nothing was saved after it; lower --config.optim.lr "
                     r"\(now 0.002\) or check the data, or set --config.optim.nonfinite=skip"):
    mm.check_numerics(last, _Ckpt())


@pytest.mark.slow  # several train steps
def test_skip_drops_the_update_counts_it_and_stops_after_too_many(test_config, tokenizer, train_source,
                                                                  monkeypatch):
  _poisonable(monkeypatch)
  config = copy.deepcopy(test_config)
  config.optim.nonfinite, config.optim.max_consecutive_skips = "skip", 2
  b = _batches(config, tokenizer, train_source, 2)
  mm, tx = make_run(config, jax.devices()[:1], tokenizer.vocab_size)
  step = mm.make_train_step(tx)
  skipped, last = _run(mm, tx, step, [b[0], b[1], b[1], b[1], b[1], b[1], b[1]], {2, 3, 5, 6, 7})
  clean, _ = _run(mm, tx, step, [b[0], b[1]], set(), start=skipped[0])
  for part in ("params", "opt_state"):  # the two skipped steps as if never taken (the schedule too)
    jax.tree.map(np.testing.assert_array_equal, clean[2][part], skipped[4][part])
    jax.tree.map(np.testing.assert_array_equal, clean[2][part], skipped[7][part])
  assert mm.check_numerics(skipped[4], _Ckpt()) == {"skipped_steps": 2}
  assert [int(s["numerics"]["halted"]) for s in skipped] == [0] * 7 + [7]  # a third bad step in a row
  with pytest.raises(UserError, match=r"^the gradients of decoder/block_1 went non-finite at step 7, 3 "
                     r"steps in a row \(skipping does not recover this run\); the last checkpoint is "
                     r"step 2.*raise --config.optim.max_consecutive_skips \(now 2\)$"):
    mm.check_numerics(last, _Ckpt())


@pytest.mark.slow  # trains end to end
def test_train_stops_at_a_nan_batch_then_resumes_skipping_it(test_config, tmp_path, monkeypatch):
  """A NaN image at step 3: "stop" exits naming it with the checkpoint of step 2 intact and nothing
  later; the same command with nonfinite=skip resumes from step 2, skips step 3 and logs the count."""
  config = copy.deepcopy(test_config)  # 4 steps, a log and a checkpoint every 2
  to_global, calls, poison_call = sharding.to_global, [], [3]

  def poisoned(batch, mesh):
    calls.append(1)
    if len(calls) == poison_call[0]:
      batch = dict(batch, image=np.full_like(batch["image"], np.nan))
    return to_global(batch, mesh)
  monkeypatch.setattr(sharding, "to_global", poisoned)
  with pytest.raises(UserError, match=r"^the loss and the gradients of connector/proj, decoder, encoder "
                     r"went non-finite at step 3; the last checkpoint is step 2, nothing was saved"):
    train.train(config, str(tmp_path))
  assert Checkpoints(tmp_path, read_only=True).all_steps() == [2]
  calls.clear()
  poison_call[0] = 1  # resumed at step 2: its first batch is step 3's again
  config.optim.nonfinite = "skip"
  assert train.train(config, str(tmp_path))["skipped_steps"] == 1
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [(m["step"], m.get("skipped_steps")) for m in logged] == [(2, None), (4, 1)]
  assert all(np.isfinite(m["loss"]) for m in logged)

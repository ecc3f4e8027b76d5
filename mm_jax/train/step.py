"""The train step of a model's task loss, and its non-finite guard (optim.nonfinite).

  step = step_fn(model, config.optim, tx, groups)      # (state, batch) -> (state, {"loss"}), to jit
The step checks the loss and each parameter group's gradients (optim.param_groups) and applies no
update when one holds a NaN or Inf; what happened is kept in state["numerics"] (a few replicated
scalars, saved with the state), which the loop reads only where it syncs anyway (log and checkpoint
steps): check_numerics stops the run before a save.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax

from mm_jax.errors import UserError
from mm_jax.tasks import TASKS
from mm_jax.train import optim


def step_fn(model, optim_cfg: mlc.ConfigDict, tx: optax.GradientTransformation, groups):
  """(state, batch) -> (state, {"loss"}): one update of the task's loss, or none if not all finite."""
  policy, max_skips = optim.nonfinite_policy(optim_cfg)
  loss_fn = functools.partial(TASKS[model.task].loss, model, optim_cfg=optim_cfg)

  def step(state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], batch)
    updates, opt = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # A non-finite step keeps params and optimizer state as they were (the schedule's count too),
    # and so does every step after a stop: nothing non-finite reaches a checkpoint. A select of the
    # new values: bitwise the unchecked step when all is finite.
    bad_G = jnp.concatenate([~jnp.isfinite(loss)[None], ~groups.finite(grads)])  # [the loss, groups]
    ok, num, n = ~jnp.any(bad_G), state["numerics"], state["step"] + 1
    running = num["halted"] == 0
    keep = lambda new, old: jnp.where(ok & running, new, old)
    params, opt = jax.tree.map(keep, params, state["params"]), jax.tree.map(keep, opt, state["opt_state"])
    record = ~ok & running
    consecutive = jnp.where(running, jnp.where(ok, 0, num["consecutive"] + 1), num["consecutive"])
    halt = record & (consecutive > max_skips if policy == "skip" else True)
    numerics = {"halted": jnp.where(halt, n, num["halted"]),
                "bad_step": jnp.where(record, n, num["bad_step"]),
                "bad": jnp.where(record, bad_G, num["bad"]),
                "skipped": num["skipped"] + (~(ok & running)).astype(jnp.int32),
                "consecutive": consecutive}
    return ({"params": params, "opt_state": opt, "step": n, "numerics": numerics}, {"loss": loss})
  return step


def numerics_init(num_groups: int) -> dict:
  """halted: the step the run stopped at (0: running); bad_step and bad ([the loss, the groups]):
  the last non-finite step (0: none) and what was non-finite in it; skipped: steps whose update was
  not applied; consecutive: non-finite steps in a row up to the last one."""
  zero = lambda: jnp.zeros((), jnp.int32)  # distinct arrays: the state is donated leaf by leaf
  return {"halted": zero(), "bad_step": zero(), "skipped": zero(), "consecutive": zero(),
          "bad": jnp.zeros((1 + num_groups,), bool)}


def check_numerics(state, ckpt, groups, optim_cfg: mlc.ConfigDict) -> dict[str, int]:
  """Raises UserError if the run stopped at a non-finite step (after ckpt.wait(): the last checkpoint
  is complete); else the metrics to log ({"skipped_steps": n} under nonfinite="skip"). One small
  host read: call it where the loop syncs anyway, and before every save."""
  num = jax.device_get(state["numerics"])
  policy, max_skips = optim.nonfinite_policy(optim_cfg)
  if not num["halted"]:
    return {"skipped_steps": int(num["skipped"])} if policy == "skip" else {}
  ckpt.wait()
  names, step = groups.describe(num["bad"][1:]), int(num["bad_step"])
  what = ("the loss" + (f" and the gradients of {names}" if names else "") if num["bad"][0]
          else f"the gradients of {names}")
  last = ckpt.latest_step()
  saved = (f"the last checkpoint is step {last}, nothing was saved after it" if last is not None
           else "no checkpoint was saved")
  lr = f"lower --config.optim.lr (now {optim_cfg.lr:g}) or check the data"
  if policy == "skip":
    raise UserError(f"{what} went non-finite at step {step}, {int(num['consecutive'])} steps in a "
                    f"row (skipping does not recover this run); {saved}; {lr}, or raise "
                    f"--config.optim.max_consecutive_skips (now {max_skips})")
  raise UserError(f"{what} went non-finite at step {step}; {saved}; {lr}, or set "
                  "--config.optim.nonfinite=skip to skip such steps")

"""The model on a mesh: abstract params and their shardings, sharded init, and the train step of its
task's loss (mm_jax.tasks.TASKS[model.task]).

Nothing here materialises an unsharded array: params are born sharded (jit of init with out_shardings),
the optimizer state takes the params' shardings, and the train step is one jit that states its in/out
shardings and donates the state.

Non-finite steps (optim.nonfinite): the step itself checks the loss and each parameter group's
gradients (optim.param_groups) and applies no update when one holds a NaN or Inf; what happened is
kept in state["numerics"] (a few replicated scalars, saved with the state), which the loop reads only
where it reads anyway (log and checkpoint steps): check_numerics stops the run before a save.
"""
import contextlib
import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from jax.sharding import Mesh

from mm_jax.tasks import TASKS
from mm_jax.train import optim
from mm_jax.train import sharding
from mm_jax.errors import UserError
from mm_jax.models import build_model


@contextlib.contextmanager
def mesh_context(mesh: Mesh, rules):
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    yield


@dataclasses.dataclass
class ModelOnMesh:
  """A model, its mesh and rules, and the shardings of its params."""
  config: mlc.ConfigDict
  model: nn.Module
  mesh: Mesh
  rules: tuple
  param_shardings: dict
  abstract_params: dict  # ShapeDtypeStructs carrying their shardings

  @classmethod
  def create(cls, config: mlc.ConfigDict, vocab_size: int, mesh: Mesh) -> "ModelOnMesh":
    model = build_model(config.model, vocab_size)
    rules = tuple((name, tuple(ax) if isinstance(ax, (list, tuple)) else ax)
                  for name, ax in config.axis_rules)
    key = jax.random.key(0)  # made outside the mesh: its devices may be compile-only (mm_jax.plan)
    with mesh_context(mesh, rules):
      boxed = jax.eval_shape(functools.partial(cls._init_boxed, model, config), key)
    p_sh = sharding.param_shardings(boxed, mesh, rules)
    abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                            nn.meta.unbox(boxed), p_sh)
    return cls(config, model, mesh, rules, p_sh, abstract)

  @staticmethod
  def _init_boxed(model, config, rng):
    task = TASKS[model.task]
    b = task.example_batch(config)
    return model.init(rng, *(b[k] for k in task.inputs))["params"]

  def context(self):
    """The mesh and the logical axis rules, for tracing anything that calls the model."""
    return mesh_context(self.mesh, self.rules)

  def init_params(self, seed: int) -> dict:
    init = lambda rng: nn.meta.unbox(self._init_boxed(self.model, self.config, rng))
    with self.context():
      return jax.jit(init, out_shardings=self.param_shardings)(jax.random.key(seed))

  # --- training ---

  def abstract_train_state(self, tx: optax.GradientTransformation) -> dict:
    """The train state as ShapeDtypeStructs with shardings (the restore target)."""
    with self.context():
      opt = jax.eval_shape(tx.init, self.abstract_params)
    opt_sh = sharding.like_params(opt, self.abstract_params, self.mesh)
    opt = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), opt, opt_sh)
    rep = sharding.replicated(self.mesh)
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=rep)
    numerics = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                            jax.eval_shape(self._numerics_init))
    return {"params": self.abstract_params, "opt_state": opt, "step": step, "numerics": numerics}

  def init_train_state(self, tx: optax.GradientTransformation, seed: int, params=None) -> dict:
    """The step-0 state around `params` (default: the init of `seed`), the optimizer state fresh."""
    shardings = jax.tree.map(lambda x: x.sharding, self.abstract_train_state(tx))
    params = self.init_params(seed) if params is None else params
    with self.context():
      opt = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.int32(0), shardings["step"])
    numerics = jax.device_put(self._numerics_init(), shardings["numerics"])
    return {"params": params, "opt_state": opt, "step": step, "numerics": numerics}

  def train_step_jit(self, tx: optax.GradientTransformation):
    """The train step's jax.jit object, jit(state, batch) -> (state, {"loss"}), with stated shardings
    and the state donated; call or .lower() it inside self.context() (mm_jax.plan lowers it).
    A step whose loss or trainable gradients are not all finite applies no update (optim.nonfinite)."""
    state_sh = jax.tree.map(lambda x: x.sharding, self.abstract_train_state(tx))
    batch_sh = sharding.batch_sharding(self.mesh)

    policy, max_skips = optim.nonfinite_policy(self.config.optim)
    groups = self.param_groups

    def step(state, batch):
      loss, grads = jax.value_and_grad(functools.partial(
          TASKS[self.model.task].loss, self.model, optim_cfg=self.config.optim))(state["params"], batch)
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

    return jax.jit(step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(self.mesh)), donate_argnums=0)

  # --- non-finite steps ---

  @functools.cached_property
  def param_groups(self) -> optim.ParamGroups:
    """The groups a non-finite step reports (optim.param_groups under config.optim.rules)."""
    return optim.param_groups(self.abstract_params,
                              optim.param_labels(self.abstract_params, self.config.optim.rules))

  def _numerics_init(self) -> dict:
    """halted: the step the run stopped at (0: running); bad_step and bad ([the loss, the groups]):
    the last non-finite step (0: none) and what was non-finite in it; skipped: steps whose update was
    not applied; consecutive: non-finite steps in a row up to the last one."""
    zero = lambda: jnp.zeros((), jnp.int32)  # distinct arrays: the state is donated leaf by leaf
    return {"halted": zero(), "bad_step": zero(), "skipped": zero(), "consecutive": zero(),
            "bad": jnp.zeros((1 + len(self.param_groups.names),), bool)}

  def check_numerics(self, state, ckpt) -> dict[str, int]:
    """Raises UserError if the run stopped at a non-finite step (after ckpt.wait(): the last checkpoint
    is complete); else the metrics to log ({"skipped_steps": n} under nonfinite="skip"). One small
    host read: call it where the loop syncs anyway, and before every save."""
    num = jax.device_get(state["numerics"])
    policy, max_skips = optim.nonfinite_policy(self.config.optim)
    if not num["halted"]:
      return {"skipped_steps": int(num["skipped"])} if policy == "skip" else {}
    ckpt.wait()
    groups, step = self.param_groups.describe(num["bad"][1:]), int(num["bad_step"])
    what = ("the loss" + (f" and the gradients of {groups}" if groups else "") if num["bad"][0]
            else f"the gradients of {groups}")
    last = ckpt.latest_step()
    saved = (f"the last checkpoint is step {last}, nothing was saved after it" if last is not None
             else "no checkpoint was saved")
    lr = f"lower --config.optim.lr (now {self.config.optim.lr:g}) or check the data"
    if policy == "skip":
      raise UserError(f"{what} went non-finite at step {step}, {int(num['consecutive'])} steps in a "
                      f"row (skipping does not recover this run); {saved}; {lr}, or raise "
                      f"--config.optim.max_consecutive_skips (now {max_skips})")
    raise UserError(f"{what} went non-finite at step {step}; {saved}; {lr}, or set "
                    "--config.optim.nonfinite=skip to skip such steps")

  def make_train_step(self, tx: optax.GradientTransformation):
    """train_step_jit(tx), run inside the mesh context: step(state, batch) -> (state, {"loss"})."""
    jitted = self.train_step_jit(tx)

    def run(state, batch):
      with self.context():
        return jitted(state, batch)
    return run

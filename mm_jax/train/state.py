"""The model on a mesh: abstract params and their shardings, sharded init, and the jitted train step.

  mm = ModelOnMesh.create(config, tokenizer.vocab_size, mesh)
  state = mm.init_train_state(tx, seed);  step = mm.make_train_step(tx);  state, out = step(state, batch)
Nothing here materialises an unsharded array: params are born sharded (jit of init with out_shardings),
the optimizer state takes the params' shardings, and the train step (mm_jax.train.step) is one jit that
states its in/out shardings and donates the state.
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
from mm_jax.train import step as step_lib
from mm_jax.models import build_model, example_batch, model_inputs


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
    b = example_batch(config, task)
    return model.init(rng, *(b[k] for k in model_inputs(model, task)))["params"]

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

    step = step_lib.step_fn(self.model, self.config.optim, tx, self.param_groups)
    return jax.jit(step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(self.mesh)), donate_argnums=0)

  # --- non-finite steps ---

  @functools.cached_property
  def param_groups(self) -> optim.ParamGroups:
    """The groups a non-finite step reports (optim.param_groups under config.optim.rules)."""
    return optim.param_groups(self.abstract_params,
                              optim.param_labels(self.abstract_params, self.config.optim.rules))

  def _numerics_init(self) -> dict:
    return step_lib.numerics_init(len(self.param_groups.names))

  def check_numerics(self, state, ckpt) -> dict[str, int]:
    """step.check_numerics of this run's state: raises UserError if it stopped at a non-finite step."""
    return step_lib.check_numerics(state, ckpt, self.param_groups, self.config.optim)

  def make_train_step(self, tx: optax.GradientTransformation):
    """train_step_jit(tx), run inside the mesh context: step(state, batch) -> (state, {"loss"})."""
    jitted = self.train_step_jit(tx)

    def run(state, batch):
      with self.context():
        return jitted(state, batch)
    run.programs = jitted._cache_size  # compiled programs so far: one per batch shape (native buckets)
    return run

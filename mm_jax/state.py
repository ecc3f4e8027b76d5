"""The model on a mesh: abstract params and their shardings, sharded init, the loss and the train step.

Nothing here materialises an unsharded array: params are born sharded (jit of init with out_shardings),
the optimizer state takes the params' shardings, and the train step is one jit that states its in/out
shardings and donates the state.
"""
import contextlib
import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections as mlc
import optax
from jax.sharding import Mesh

from mm_jax import contrastive, sharding
from mm_jax.errors import UserError
from mm_jax.models import build_model


def example_batch(config: mlc.ConfigDict, batch: int = 1, task: str = "vqa") -> dict:
  """Zeros shaped like a training batch of `task` (the model's `task` attribute)."""
  s, t = config.data.image_size, config.data.text_len
  out = {"image": jnp.zeros((batch, s, s, 3), jnp.float32), "text": jnp.zeros((batch, t), jnp.int32)}
  if task == "vqa":
    out.update(mask_ar=jnp.zeros((batch, t), jnp.int32), mask_input=jnp.ones((batch, t), jnp.int32),
               mask_loss=jnp.zeros((batch, t), jnp.int32))
  return out


def forward(model: nn.Module, params, batch: dict) -> jax.Array:
  return model.apply({"params": params}, *(batch[k] for k in TASKS[model.task].inputs))


def loss_fn(model: nn.Module, params, batch: dict, norm: str = "example") -> jax.Array:
  """Next-token cross-entropy on the loss-masked (suffix) tokens.

  norm="example": the mean over each example's suffix tokens, then over examples (big_vision's
  PaliGemma trainer): a one-word answer weighs as much as a 20-token caption. norm="token": the mean
  over all suffix tokens of the batch (HF transformers), where long targets dominate.
  """
  logits_BxTxV = forward(model, params, batch)[:, :-1].astype(jnp.float32)
  weights_BxT = batch["mask_loss"][:, 1:].astype(jnp.float32)
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["text"][:, 1:])
  if norm == "token":
    return jnp.sum(ce_BxT * weights_BxT) / jnp.maximum(jnp.sum(weights_BxT), 1.0)
  per_example_B = jnp.sum(ce_BxT * weights_BxT, axis=1) / jnp.maximum(jnp.sum(weights_BxT, axis=1), 1.0)
  return jnp.mean(per_example_B)


LOSS_NORMS = ("example", "token")


def _vqa_loss(model: nn.Module, params, batch: dict, optim_cfg: mlc.ConfigDict) -> jax.Array:
  return loss_fn(model, params, batch, norm=optim_cfg.loss_norm)


def _contrastive_loss(model: nn.Module, params, batch: dict, optim_cfg: mlc.ConfigDict) -> jax.Array:
  """contrastive.LOSSES[optim.loss] over the TxI logits of the whole (global) batch."""
  return contrastive.LOSSES[optim_cfg.loss](forward(model, params, batch))


def _choice(field: str, known) -> Callable[[mlc.ConfigDict], None]:
  def check(config):
    value = config.optim.get(field)
    if value not in known:
      raise UserError(f"optim.{field}={value!r} is unknown; use one of {tuple(known)} "
                      f"(--config.optim.{field}=...)")
  return check


@dataclasses.dataclass(frozen=True)
class Task:
  """What the trainer needs of a model's task (`model.task`): the batch keys its __call__ takes, its
  loss (model, params, batch, optim_cfg) and a check of the config's loss fields."""
  inputs: tuple[str, ...]
  loss: Callable
  check: Callable[[mlc.ConfigDict], None]


TASKS = {
    "vqa": Task(("image", "text", "mask_ar", "mask_input"), _vqa_loss, _choice("loss_norm", LOSS_NORMS)),
    "contrastive": Task(("image", "text"), _contrastive_loss, _choice("loss", contrastive.LOSSES)),
}


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
    b = example_batch(config, task=model.task)
    return model.init(rng, *(b[k] for k in TASKS[model.task].inputs))["params"]

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
    step = jax.ShapeDtypeStruct((), jnp.int32, sharding=sharding.replicated(self.mesh))
    return {"params": self.abstract_params, "opt_state": opt, "step": step}

  def init_train_state(self, tx: optax.GradientTransformation, seed: int, params=None) -> dict:
    """The step-0 state around `params` (default: the init of `seed`), the optimizer state fresh."""
    shardings = jax.tree.map(lambda x: x.sharding, self.abstract_train_state(tx))
    params = self.init_params(seed) if params is None else params
    with self.context():
      opt = jax.jit(tx.init, out_shardings=shardings["opt_state"])(params)
    step = jax.device_put(jnp.int32(0), shardings["step"])
    return {"params": params, "opt_state": opt, "step": step}

  def train_step_jit(self, tx: optax.GradientTransformation):
    """The train step's jax.jit object, jit(state, batch) -> (state, {"loss"}), with stated shardings
    and the state donated; call or .lower() it inside self.context() (mm_jax.plan lowers it)."""
    state_sh = jax.tree.map(lambda x: x.sharding, self.abstract_train_state(tx))
    batch_sh = sharding.batch_sharding(self.mesh)

    def step(state, batch):
      loss, grads = jax.value_and_grad(functools.partial(
          TASKS[self.model.task].loss, self.model, optim_cfg=self.config.optim))(state["params"], batch)
      updates, opt = tx.update(grads, state["opt_state"], state["params"])
      params = optax.apply_updates(state["params"], updates)
      return {"params": params, "opt_state": opt, "step": state["step"] + 1}, {"loss": loss}

    return jax.jit(step, in_shardings=(state_sh, batch_sh),
                   out_shardings=(state_sh, sharding.replicated(self.mesh)), donate_argnums=0)

  def make_train_step(self, tx: optax.GradientTransformation):
    """train_step_jit(tx), run inside the mesh context: step(state, batch) -> (state, {"loss"})."""
    jitted = self.train_step_jit(tx)

    def run(state, batch):
      with self.context():
        return jitted(state, batch)
    return run

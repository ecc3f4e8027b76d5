"""Connectors: encoder features BxPxE -> decoder-width tokens BxPxD. Chosen by name from CONNECTORS."""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.models.layers import ACTIVATIONS, DType, dense


class Linear(nn.Module):
  """One linear layer with bias (LLaVA-1.0, PaliGemma)."""
  width: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_BxPxE: jax.Array) -> jax.Array:
    # "embed_in" (not "embed"): a param may not carry one logical name twice.
    return dense(self.width, ("embed_in", "embed"), "proj", dtype=self.dtype,
                 param_dtype=self.param_dtype)(x_BxPxE)


class MLP(nn.Module):
  """Two linear layers with bias and an exact GELU between (LLaVA-1.5: fc1 E->D, fc2 D->D)."""
  width: int
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_BxPxE: jax.Array) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = ACTIVATIONS["gelu"](dense(self.width, ("embed_in", "embed"), "fc1", **kw)(x_BxPxE))
    return dense(self.width, ("mlp", "embed"), "fc2", **kw)(h)


CONNECTORS = {"linear": Linear, "mlp": MLP}

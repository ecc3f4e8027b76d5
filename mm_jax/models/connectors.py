"""Connectors: encoder features BxPxE -> decoder-width tokens BxPxD. Chosen by name from CONNECTORS."""
import flax.linen as nn
import jax

from mm_jax.models.layers import dense


class Linear(nn.Module):
  """One linear layer with bias (LLaVA-1.0, PaliGemma)."""
  width: int

  @nn.compact
  def __call__(self, x_BxPxE: jax.Array) -> jax.Array:
    # "embed_in" (not "embed"): a param may not carry one logical name twice.
    return dense(self.width, ("embed_in", "embed"), "proj")(x_BxPxE)


CONNECTORS = {"linear": Linear}

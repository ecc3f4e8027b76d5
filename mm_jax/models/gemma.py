"""Gemma-style decoder: scaled token embedding, RMSNorm (1 + w), RoPE, grouped-query attention, GeGLU MLP,
tied output head; an optional KV cache for decoding.

The decoder takes embeddings, not tokens, so image features can sit beside text embeddings (`embed` gives
the text ones); the attention mask comes from the caller (prefix-LM, causal, cached decoding).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.models.layers import Attention, RMSNorm, constrain, dense, partitioned

Array = jax.Array
Cache = tuple[dict[str, Array], ...]  # one {"k", "v"} (BxSxKxH) per block


class DecoderBlock(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, cache=None, cache_index=None):
    attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, rope_theta=self.rope_theta,
                     name="attn")
    y, cache = attn(RMSNorm(name="norm_attn")(x_BxLxD), mask_BxLxS, positions_BxL, cache, cache_index)
    x_BxLxD = x_BxLxD + y
    y = RMSNorm(name="norm_mlp")(x_BxLxD)
    gate = dense(self.mlp_dim, ("embed", "mlp"), "gate", use_bias=False)(y)
    up = dense(self.mlp_dim, ("embed", "mlp"), "up", use_bias=False)(y)
    h_BxLxF = constrain(nn.gelu(gate, approximate=True) * up, ("act_batch", "act_len", "act_mlp"))
    x_BxLxD = x_BxLxD + dense(x_BxLxD.shape[-1], ("mlp", "embed"), "down", use_bias=False)(h_BxLxF)
    return constrain(x_BxLxD, ("act_batch", "act_len", "act_embed")), cache


class Decoder(nn.Module):
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope_theta: float = 10_000.0

  def setup(self):
    self.embedder = nn.Embed(
        self.vocab_size, self.width, name="embedder",
        embedding_init=partitioned(nn.initializers.normal(stddev=0.02), ("vocab", "embed")))
    self.blocks = [DecoderBlock(self.num_heads, self.num_kv_heads, self.head_dim, self.mlp_dim,
                                self.rope_theta, name=f"block_{i}") for i in range(self.depth)]
    self.final_norm = RMSNorm(name="final_norm")

  def embed(self, tokens_BxL: Array) -> Array:
    """Text token embeddings, scaled by sqrt(width) as in Gemma (image features are not scaled)."""
    return self.embedder(tokens_BxL) * jnp.sqrt(jnp.float32(self.width))

  def __call__(self, x_BxLxD: Array, positions_BxL: Array, mask_BxLxS: Array,
               cache: Cache | None = None, cache_index=None) -> tuple[Array, Cache | None]:
    """Embeddings -> logits BxLxV (tied head). With a cache, returns the updated cache too."""
    new_cache = []
    for i, block in enumerate(self.blocks):
      x_BxLxD, c = block(x_BxLxD, positions_BxL, mask_BxLxS,
                         None if cache is None else cache[i], cache_index)
      new_cache.append(c)
    logits_BxLxV = self.embedder.attend(self.final_norm(x_BxLxD))
    logits_BxLxV = constrain(logits_BxLxV, ("act_batch", "act_len", "act_vocab"))
    return logits_BxLxV, (None if cache is None else tuple(new_cache))

  def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> Cache:
    shape = (batch, length, self.num_kv_heads, self.head_dim)
    return tuple({"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype)} for _ in range(self.depth))

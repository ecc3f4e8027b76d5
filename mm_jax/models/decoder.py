"""Gemma / Llama-style decoder: token embedding, pre-norm blocks of grouped-query attention with RoPE and a
gated MLP, a final norm and an output head; an optional KV cache for decoding.

One module, two families by config (the differences HF's implementations have):
                 norm                    mlp_act     embed_scale      head          rope
  Gemma          "gemma": x*(1+w), eps 1e-6   gelu_tanh   x sqrt(width)   tied          default
  Llama (2, 3)   "llama": w*x,     eps 1e-5   silu        none            untied        default / llama3
  Qwen2 (-VL)    as Llama, with biases on q, k, v (qkv_bias)                          M-RoPE (rope sections)
head_dim is independent of width. The decoder takes embeddings, not tokens, so image features can sit
beside text embeddings (`embed` gives the text ones); the attention mask comes from the caller.
Blocks are block_0 .. block_{depth-1}, or with scan=True one `blocks` stacked on a "layers" axis; remat
and remat_names pick what the backward pass keeps (models/stack.py).
"""
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from mm_jax.models import flop_count, stack
from mm_jax.models.layers import (ACTIVATIONS, Attention, DType, RMSNorm, Rope, constrain, dense,
                                  fused_projections, partitioned)

Array = jax.Array
# One {"k", "v"} (BxKxSxH) per block; scanned: one {"k", "v"} of depth x BxKxSxH.
Cache = tuple[dict[str, Array], ...] | dict[str, Array]


def cache_len(cache: Cache) -> int:
  """S, the slots of a cache of either layout."""
  return cache["k"].shape[3] if isinstance(cache, dict) else cache[0]["k"].shape[2]


def prefill_masks(input_mask_BxL: Array, cache: Cache, causal: bool) -> tuple[Array, Array]:
  """The masks of a prefill of L positions into cache slots [0, L): (cache_mask_BxS, the slots holding
  real tokens; mask_BxLxS, keys the real slots, the prefill one bidirectional block or causal)."""
  (b, l), s = input_mask_BxL.shape, cache_len(cache)
  cache_mask_BxS = jnp.pad(input_mask_BxL, ((0, 0), (0, s - l))) > 0
  mask_BxLxS = jnp.broadcast_to(cache_mask_BxS[:, None, :], (b, l, s))
  if causal:
    mask_BxLxS = mask_BxLxS & (jnp.arange(s)[None, None, :] <= jnp.arange(l)[None, :, None])
  return cache_mask_BxS, mask_BxLxS


def decode_token(decoder: "Decoder", token_B: Array, position_B: Array, cache: Cache,
                 cache_mask_BxS: Array, slot) -> tuple[Array, Cache, Array]:
  """One text token per example through the decoder at RoPE position position_B, its k/v into cache
  slot `slot`: (logits BxV, cache, cache_mask). The decode_step of the families whose image tokens sit
  in the sequence (call it inside the model's apply)."""
  cache_mask_BxS = cache_mask_BxS.at[:, slot].set(True)
  logits_Bx1xV, cache = decoder(decoder.embed(token_B[:, None]), position_B[:, None],
                                cache_mask_BxS[:, None, :], cache, slot)
  return logits_Bx1xV[:, 0], cache, cache_mask_BxS


def count_gated_mlp(t: flop_count.Tally, part: str, pre: str, x: str, b: int, l: int, d: int,
                    f: int) -> None:
  """FLOPs of a block's norm_mlp and gated MLP (gate, up, down under `pre`) on stream x -> stream m."""
  t.ew("h", [x], [f"{pre}/norm_mlp"])
  t.dense(part, f"{pre}/gate", "h", "g", b * l, d, f)
  t.dense(part, f"{pre}/up", "h", "u", b * l, d, f)
  t.ew("g", ["g", "u"])
  t.dense(part, f"{pre}/down", "g", "m", b * l, f, d)


class DecoderBlock(nn.Module):
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope: Rope
  norm: str
  norm_eps: float
  mlp_act: str
  qkv_bias: bool = False
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def _norm(self, name):
    return RMSNorm(self.norm_eps, self.norm, self.param_dtype, name=name)

  @nn.compact
  def __call__(self, x_BxLxD, positions_BxL, mask_BxLxS, cache=None, cache_index=None):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, use_bias=self.qkv_bias,
                     rope=self.rope, out_bias=False, name="attn", **kw)
    y, cache = attn(self._norm("norm_attn")(x_BxLxD), mask_BxLxS, positions_BxL, cache, cache_index)
    x_BxLxD = x_BxLxD + y
    y = self._norm("norm_mlp")(x_BxLxD)
    gate, up = fused_projections(y, [dense(self.mlp_dim, ("embed", "mlp"), name, use_bias=False, **kw)
                                     for name in ("gate", "up")])
    h_BxLxF = checkpoint_name(constrain(ACTIVATIONS[self.mlp_act](gate) * up,
                                        ("act_batch", "act_len", "act_mlp")), "mlp_hidden")
    x_BxLxD = x_BxLxD + dense(x_BxLxD.shape[-1], ("mlp", "embed"), "down", use_bias=False, **kw)(h_BxLxF)
    return constrain(x_BxLxD, ("act_batch", "act_len", "act_embed")), cache


class Decoder(nn.Module):
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  rope: Rope = Rope()
  norm: str = "gemma"
  norm_eps: float = 1e-6
  mlp_act: str = "gelu_tanh"
  embed_scale: bool = True
  tie_embeddings: bool = True
  qkv_bias: bool = False  # biases on q, k, v (Qwen2), none on o
  embed_rows: int = 0  # rows of the embedding table (0: vocab_size); Mllama's has vocab_size + 8
  scan: bool = False
  remat: str = "none"
  remat_names: tuple[str, ...] = ()
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def block_fields(self) -> dict:
    """DecoderBlock's fields (cross_attention applies a block functionally over stacked params)."""
    return dict(num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, head_dim=self.head_dim,
                mlp_dim=self.mlp_dim, rope=self.rope, norm=self.norm, norm_eps=self.norm_eps,
                mlp_act=self.mlp_act, qkv_bias=self.qkv_bias, dtype=self.dtype,
                param_dtype=self.param_dtype)

  def setup(self):
    if self.mlp_act not in ACTIVATIONS:
      raise ValueError(f"unknown mlp_act {self.mlp_act!r}; known: {', '.join(ACTIVATIONS)}")
    if self.embed_rows and self.tie_embeddings and self.embed_rows != self.vocab_size:
      raise ValueError("an embedding table of other than vocab_size rows needs an untied head")
    self.embedder = nn.Embed(
        self.embed_rows or self.vocab_size, self.width, name="embedder", dtype=self.dtype,
        param_dtype=self.param_dtype,
        embedding_init=partitioned(nn.initializers.normal(stddev=0.02), ("vocab", "embed")))
    stack.check("model.decoder", self.remat, self.remat_names)
    if self.scan:
      self.blocks = DecoderBlock(**self.block_fields(), name="blocks")
    else:
      cls = stack.remat_module(DecoderBlock, self.remat, self.remat_names)
      self.blocks = [cls(**self.block_fields(), name=f"block_{i}") for i in range(self.depth)]
    self.final_norm = RMSNorm(self.norm_eps, self.norm, self.param_dtype, name="final_norm")
    if not self.tie_embeddings:
      self.head = dense(self.vocab_size, ("embed", "vocab"), "head", use_bias=False,
                        dtype=self.dtype, param_dtype=self.param_dtype)

  def embed(self, tokens_BxL: Array) -> Array:
    """Text token embeddings; Gemma scales them by sqrt(width), rounded to the compute dtype as in HF
    (image features are not scaled). The table (nn.Embed's lookup, in the compute dtype) is gathered
    along its fsdp-sharded embed axis first, as FSDP gathers any weight before use: looked up sharded,
    the embeddings came out batch-replicated and the partitioner rematerialized them whole to shard
    them over the batch."""
    table_VxD = constrain(self.embedder.embedding.astype(self.dtype), ("vocab", None))
    x_BxLxD = constrain(jnp.take(table_VxD, tokens_BxL, axis=0), ("act_batch", "act_len", "act_embed"))
    if self.embed_scale:
      x_BxLxD = x_BxLxD * jnp.asarray(self.width ** 0.5, self.dtype)
    return x_BxLxD

  def __call__(self, x_BxLxD: Array, positions_BxL: Array, mask_BxLxS: Array,
               cache: Cache | None = None, cache_index=None, head: bool = True
               ) -> tuple[Array, Cache | None]:
    """Embeddings -> logits BxLxV. With a cache, returns the updated cache too. head=False: the last
    block's output BxLxD instead (the caller applies `logits` to the positions it needs)."""
    x_BxLxD = x_BxLxD.astype(self.dtype)
    out = self.logits if head else (lambda x: x)
    if self.scan:
      x_BxLxD, new_cache = stack.scan(
          lambda block, x, *args: block(x, *args), self.blocks, self.depth, x_BxLxD, positions_BxL,
          mask_BxLxS, cache, cache_index, in_axes=(nn.broadcast, nn.broadcast, 0, nn.broadcast),
          remat=self.remat, remat_names=self.remat_names)
      return out(x_BxLxD), new_cache
    new_cache = []
    for i, block in enumerate(self.blocks):
      x_BxLxD, c = block(x_BxLxD, positions_BxL, mask_BxLxS,
                         None if cache is None else cache[i], cache_index)
      new_cache.append(c)
    return out(x_BxLxD), (None if cache is None else tuple(new_cache))

  def logits(self, x_BxLxD: Array) -> Array:
    """Final norm and output head: the last block's output -> logits BxLxV."""
    x_BxLxD = self.final_norm(x_BxLxD)
    logits_BxLxV = self.embedder.attend(x_BxLxD) if self.tie_embeddings else self.head(x_BxLxD)
    return constrain(logits_BxLxV, ("act_batch", "act_len", "act_vocab"))

  def count_embed(self, t: flop_count.Tally, pre: str, x: str) -> None:
    """Text embeddings into stream x: a gather, no FLOPs."""
    t.ew(x, [], [f"{pre}/embedder"])

  def count_flops(self, t: flop_count.Tally, pre: str, x: str, b: int, l: int, head_len: int,
                  before_block: Callable[[int], None] = lambda i: None) -> None:
    """FLOPs of the blocks (part `pre`) on b x l positions of stream x, then of the head (part "head")
    on head_len of them; before_block(i) counts what a caller runs before block i (a cross block)."""
    d, f = self.width, self.mlp_dim
    for i in range(self.depth):
      before_block(i)
      blk = f"{pre}/block_{i}"
      t.ew("h", [x], [f"{blk}/norm_attn"])
      flop_count.attention(t, pre, f"{blk}/attn", "h", "h", "a", b, l, l, d, self.num_heads,
                           self.num_kv_heads, self.head_dim)
      t.ew(x, [x, "a"])
      count_gated_mlp(t, pre, blk, x, b, l, d, f)
      t.ew(x, [x, "m"])
    t.ew(x, [x], [f"{pre}/final_norm"])
    head = f"{pre}/embedder" if self.tie_embeddings else f"{pre}/head"
    t.dense("head", head, x, "logits", b * head_len, d, self.vocab_size)

  def init_cache(self, batch: int, length: int) -> Cache:
    shape = (batch, self.num_kv_heads, length, self.head_dim)  # BxKxSxH: see layers.attend_kv_major
    if self.scan:
      return {name: jnp.zeros((self.depth, *shape), self.dtype) for name in ("k", "v")}
    return tuple({"k": jnp.zeros(shape, self.dtype), "v": jnp.zeros(shape, self.dtype)}
                 for _ in range(self.depth))

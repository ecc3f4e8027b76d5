r"""A mixture-of-experts MLP: a router picks top_k of num_experts gated MLPs per token (Mixtral, OLMoE,
Qwen2-MoE; transformers 5.23's routing), optionally plus a shared expert behind a sigmoid gate
(Qwen2-MoE / DeepSeek).

  y_BxLxD, stats = MoeMLP(num_experts=8, top_k=2, expert_dim=F, ...)(x_BxLxD, valid_BxL)

Routing: softmax over the experts in float32, the top_k probabilities, renormalised to sum 1 when
norm_topk (Mixtral always; OLMoE / Qwen2-MoE by config). Top-k of the softmax then renormalised is the
softmax of the top-k logits, so Mixtral's "top-k then softmax" is norm_topk=True.
Dispatch: dropless (capacity_factor 0): the token-expert assignments sorted by expert and run through
`jax.lax.ragged_dot`, every assignment computed; or capacity routing: each expert takes at most
C = ceil(capacity_factor * tokens * top_k / num_experts) assignments (first come, in token order) into
an E x C buffer, the rest dropped (their weight lost, the token keeps its residual) and counted.
stats (sums over this layer's valid tokens, for the decoder to add over layers): `assign_KxE` how many
tokens picked expert e as their k-th choice, `prob_E` the router probabilities summed, `z` the
squared logsumexp of the logits summed (ST-MoE's z-loss), `tokens`, and `dropped` assignments.
load_balancing_loss(...) is transformers' aux_loss (Switch): E * sum_k,e f_ke * P_e over every layer's
tokens at once.
"""
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.models.layers import ACTIVATIONS, partitioned

Array = jax.Array


class MoeMLP(nn.Module):
  num_experts: int
  top_k: int
  expert_dim: int
  norm_topk: bool = True
  shared_dim: int = 0  # a shared expert's hidden width (0: none)
  capacity_factor: float = 0.0  # 0: dropless
  act: str = "silu"
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    if not 1 <= self.top_k <= self.num_experts:
      raise ValueError(f"moe top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")

  def _param(self, name, names, shape, scale):
    init = nn.initializers.normal(scale)
    return self.param(name, partitioned(init, names), shape, self.param_dtype)

  @nn.compact
  def __call__(self, x_BxLxD: Array, valid_BxL: Array | None = None) -> tuple[Array, dict]:
    b, l, d = x_BxLxD.shape
    e, k, f = self.num_experts, self.top_k, self.expert_dim
    x_TxD = x_BxLxD.reshape(b * l, d).astype(self.dtype)
    valid_T = (jnp.ones([b * l], jnp.float32) if valid_BxL is None
               else valid_BxL.reshape(-1).astype(jnp.float32))
    router_DxE = self._param("router", ("embed", None), (d, e), d ** -0.5)
    logits_TxE = x_TxD.astype(jnp.float32) @ router_DxE.astype(jnp.float32)
    probs_TxE = jax.nn.softmax(logits_TxE, axis=-1)
    top_p_TxK, top_i_TxK = jax.lax.top_k(probs_TxE, k)
    if self.norm_topk:
      top_p_TxK = top_p_TxK / top_p_TxK.sum(-1, keepdims=True)
    gate_up_ExDx2F = self._param("gate_up", ("expert", "embed", "mlp"), (e, d, 2 * f), d ** -0.5)
    down_ExFxD = self._param("down", ("expert", "mlp", "embed"), (e, f, d), f ** -0.5)
    experts = (gate_up_ExDx2F.astype(self.dtype), down_ExFxD.astype(self.dtype))
    if self.capacity_factor > 0:
      y_TxD, dropped = self._capacity(x_TxD, top_p_TxK, top_i_TxK, valid_T, *experts)
    else:
      y_TxD, dropped = self._dropless(x_TxD, top_p_TxK, top_i_TxK, *experts), jnp.zeros([])
    if self.shared_dim:
      y_TxD = y_TxD + self._shared(x_TxD)
    onehot_TxKxE = jax.nn.one_hot(top_i_TxK, e) * valid_T[:, None, None]
    stats = dict(assign_KxE=onehot_TxKxE.sum(0), prob_E=(probs_TxE * valid_T[:, None]).sum(0),
                 z=(jax.nn.logsumexp(logits_TxE, axis=-1) ** 2 * valid_T).sum(), tokens=valid_T.sum(),
                 dropped=dropped)
    return y_TxD.reshape(b, l, d).astype(x_BxLxD.dtype), stats

  def _mlp(self, h_Nx2F: Array) -> Array:
    gate, up = jnp.split(h_Nx2F, 2, axis=-1)
    return ACTIVATIONS[self.act](gate) * up

  def _dropless(self, x_TxD, top_p_TxK, top_i_TxK, gate_up_ExDx2F, down_ExFxD) -> Array:
    """Every assignment: sorted by expert, grouped matmuls (ragged_dot), weighted back onto its token."""
    k = top_i_TxK.shape[1]
    order_N = jnp.argsort(top_i_TxK.reshape(-1), stable=True)
    token_N = order_N // k
    sizes_E = jnp.bincount(top_i_TxK.reshape(-1), length=self.num_experts).astype(jnp.int32)
    h_Nx2F = jax.lax.ragged_dot(x_TxD[token_N], gate_up_ExDx2F, sizes_E)
    out_NxD = jax.lax.ragged_dot(self._mlp(h_Nx2F), down_ExFxD, sizes_E)
    w_N = top_p_TxK.reshape(-1)[order_N].astype(out_NxD.dtype)
    return jnp.zeros_like(x_TxD).at[token_N].add(out_NxD * w_N[:, None])

  def _capacity(self, x_TxD, top_p_TxK, top_i_TxK, valid_T, gate_up_ExDx2F, down_ExFxD):
    """Each expert's first C assignments (token order, a token's k choices in turn) in an E x C buffer;
    the others dropped: (output, dropped assignments of valid tokens)."""
    t, k = top_i_TxK.shape
    e = self.num_experts
    c = max(1, math.ceil(self.capacity_factor * t * k / e))
    onehot_NxE = jax.nn.one_hot(top_i_TxK.reshape(-1), e, dtype=jnp.int32)
    slot_N = (jnp.cumsum(onehot_NxE, axis=0) * onehot_NxE).sum(-1) - 1  # its place in its expert's queue
    kept_N = slot_N < c
    token_N, expert_N = jnp.arange(t * k) // k, top_i_TxK.reshape(-1)
    buffer_ExCxD = jnp.zeros((e, c, x_TxD.shape[-1]), x_TxD.dtype).at[
        expert_N, jnp.where(kept_N, slot_N, c)].set(x_TxD[token_N], mode="drop")
    h_ExCx2F = jnp.einsum("ecd,edf->ecf", buffer_ExCxD, gate_up_ExDx2F)
    out_ExCxD = jnp.einsum("ecf,efd->ecd", self._mlp(h_ExCx2F), down_ExFxD)
    out_NxD = out_ExCxD[expert_N, jnp.minimum(slot_N, c - 1)] * kept_N[:, None]
    w_N = top_p_TxK.reshape(-1).astype(out_NxD.dtype)
    y_TxD = jnp.zeros_like(x_TxD).at[token_N].add(out_NxD * w_N[:, None])
    return y_TxD, ((~kept_N) * valid_T[token_N]).sum()

  def _shared(self, x_TxD: Array) -> Array:
    """Qwen2-MoE's shared expert: a gated MLP every token takes, scaled by sigmoid(x . gate)."""
    d, f = x_TxD.shape[-1], self.shared_dim
    gate_up_Dx2F = self._param("shared_gate_up", ("embed", "mlp"), (d, 2 * f), d ** -0.5)
    down_FxD = self._param("shared_down", ("mlp", "embed"), (f, d), f ** -0.5)
    gate_D = self._param("shared_gate", ("embed", None), (d, 1), d ** -0.5)
    h_TxD = self._mlp(x_TxD @ gate_up_Dx2F.astype(self.dtype)) @ down_FxD.astype(self.dtype)
    return jax.nn.sigmoid(x_TxD @ gate_D.astype(self.dtype)) * h_TxD


def load_balancing_loss(stats: list[dict], num_experts: int) -> Array:
  """transformers' load_balancing_loss_func over the layers' stats at once: num_experts * sum over
  (k, e) of the fraction of tokens whose k-th choice is e times the mean router probability of e."""
  tokens = sum(s["tokens"] for s in stats)
  f_KxE = sum(s["assign_KxE"] for s in stats) / tokens
  p_E = sum(s["prob_E"] for s in stats) / tokens
  return num_experts * (f_KxE * p_E[None]).sum()


def z_loss(stats: list[dict]) -> Array:
  """ST-MoE's router z-loss: the mean over the layers' tokens of logsumexp(logits)^2."""
  return sum(s["z"] for s in stats) / sum(s["tokens"] for s in stats)

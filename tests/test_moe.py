"""models/moe.py against transformers 5.23's sparse MoE blocks on small random ones built here (Mixtral,
OLMoE without renormalised top-k, Qwen2-MoE with its shared expert): the outputs, and the load-balancing
loss equal to HF's load_balancing_loss_func; capacity routing equal to dropless when no expert
overflows, its drops counted when they do."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import MixtralConfig, OlmoeConfig, Qwen2MoeConfig
from transformers.models.mixtral import modeling_mixtral
from transformers.models.olmoe import modeling_olmoe
from transformers.models.qwen2_moe import modeling_qwen2_moe

from mm_jax.models import moe

D, F, E, K, SHARED = 16, 24, 4, 2, 20


def _hf(name: str):
  """(the HF block, randomly initialised, eval mode; our module; our params from its weights)."""
  torch.manual_seed(0)
  common = dict(hidden_size=D, intermediate_size=F, num_experts_per_tok=K, hidden_act="silu")
  if name == "mixtral":
    block = modeling_mixtral.MixtralSparseMoeBlock(MixtralConfig(num_local_experts=E, **common))
    ours = moe.MoeMLP(num_experts=E, top_k=K, expert_dim=F, norm_topk=True)
  elif name == "olmoe":
    block = modeling_olmoe.OlmoeSparseMoeBlock(OlmoeConfig(num_experts=E, norm_topk_prob=False, **common))
    ours = moe.MoeMLP(num_experts=E, top_k=K, expert_dim=F, norm_topk=False)
  else:
    config = Qwen2MoeConfig(num_experts=E, norm_topk_prob=True, moe_intermediate_size=F,
                            shared_expert_intermediate_size=SHARED, **common)
    block = modeling_qwen2_moe.Qwen2MoeSparseMoeBlock(config)
    ours = moe.MoeMLP(num_experts=E, top_k=K, expert_dim=F, norm_topk=True, shared_dim=SHARED)
  with torch.no_grad():
    for p in block.parameters():
      p.normal_(0, 0.3)
  block.eval()
  t = lambda x: jnp.asarray(x.detach().numpy())
  params = {"router": t(block.gate.weight).T,
            "gate_up": t(block.experts.gate_up_proj).transpose(0, 2, 1),  # E x D x 2F, gate first
            "down": t(block.experts.down_proj).transpose(0, 2, 1)}
  if name == "qwen2_moe":
    s = block.shared_expert
    params.update(shared_gate_up=jnp.concatenate([t(s.gate_proj.weight).T, t(s.up_proj.weight).T], -1),
                  shared_down=t(s.down_proj.weight).T, shared_gate=t(block.shared_expert_gate.weight).T)
  return block, ours, params


@pytest.mark.parametrize("name", ["mixtral", "olmoe", "qwen2_moe"])
def test_outputs_and_aux_loss_equal_hf(name):
  block, ours, params = _hf(name)
  x = np.random.default_rng(1).normal(size=(2, 5, D)).astype(np.float32)
  with torch.no_grad():
    want = block(torch.from_numpy(x)).numpy()
    logits = block.gate(torch.from_numpy(x))[0]
  got, stats = ours.apply({"params": params}, jnp.asarray(x))
  assert np.abs(np.asarray(got) - want).max() <= 1e-5
  aux = modeling_mixtral.load_balancing_loss_func((logits,), E, K).item()
  assert abs(float(moe.load_balancing_loss([stats], E)) - aux) <= 1e-5
  mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
  _, masked = ours.apply({"params": params}, jnp.asarray(x), jnp.asarray(mask))
  aux = modeling_mixtral.load_balancing_loss_func((logits,), E, K, torch.from_numpy(mask)).item()
  assert abs(float(moe.load_balancing_loss([masked], E)) - aux) <= 1e-5


def test_capacity_routing_equals_dropless_until_an_expert_overflows():
  _, dropless, params = _hf("mixtral")
  x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 8, D)).astype(np.float32))
  want, _ = dropless.apply({"params": params}, x)
  roomy = moe.MoeMLP(num_experts=E, top_k=K, expert_dim=F, capacity_factor=float(E))  # C = all tokens
  got, stats = roomy.apply({"params": params}, x)
  np.testing.assert_allclose(got, want, atol=1e-6)
  assert float(stats["dropped"]) == 0
  tight = moe.MoeMLP(num_experts=E, top_k=K, expert_dim=F, capacity_factor=0.5)  # C = 4 of 32 each
  got, stats = tight.apply({"params": params}, x)
  per_expert = np.asarray(stats["assign_KxE"]).sum(0)
  assert float(stats["dropped"]) == np.maximum(per_expert - 4, 0).sum() > 0
  assert np.abs(np.asarray(got) - np.asarray(want)).max() > 1e-3  # dropped assignments change outputs
  grads = jax.grad(lambda p: tight.apply({"params": p}, x)[0].sum())(params)
  assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))


def test_top_k_above_the_experts_is_refused():
  with pytest.raises(ValueError, match="top_k=5 must be in"):
    moe.MoeMLP(num_experts=4, top_k=5, expert_dim=8).init(jax.random.PRNGKey(0), jnp.zeros((1, 2, 8)))

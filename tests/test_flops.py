"""mm_jax.flops: a hand count on the tiny config, the backward by freeze rules, and XLA's own count.

XLA:CPU's cost_analysis counts every dot of an unscanned model (one device, so nothing is split) plus
the elementwise work the analytic count leaves out: it must lie between 1x and 1.05x the analytic count
when matmuls dominate (width 128). A missed or extra matmul of the backward moves it by more than that.
"""
import copy
import functools

import jax
import ml_collections as mlc
import pytest
from conftest import load_config

from mm_jax import tasks
from mm_jax.perf import flops
from mm_jax.train import optim
from mm_jax.train import sharding
from mm_jax.train.state import ModelOnMesh

ALL = ((".*", "trainable"),)
CONNECTOR_ONLY = (("connector/.*", "trainable"), (".*", "frozen"))  # LLaVA stage 1
FROZEN_ENCODER = (("encoder/.*", "frozen"), (".*", "trainable"))
FROZEN_LLM = (("decoder/.*", "frozen"), (".*", "trainable"))        # Llama 3.2 Vision stage 1
V = 100


def _setup(config, rules=ALL, vocab=V):
  config = copy.deepcopy(config)
  config.optim.rules = rules
  mesh = sharding.make_mesh(config.mesh, jax.devices()[:1])
  mm = ModelOnMesh.create(config, vocab, mesh)
  return config, mm, optim.param_labels(mm.abstract_params, rules)


def _hand_count(b=8):
  """Forward FLOPs of configs/shapes_tiny.py:test by part, written out (2 x multiply-adds)."""
  p, d, l = 16, 32, 20 + 16  # 32px / patch 8 = 16 patches; decoder sequence = text 20 + 16 image tokens
  patch = 2 * p * (8 * 8 * 3) * d
  enc = 4 * 2 * p * d * d + 2 * (2 * 2 * p * p * 16) + 2 * 2 * p * d * 64  # qkvo, scores + pv, mlp
  conn = 2 * p * d * d
  qkvo = 2 * l * d * 32 + 2 * 2 * l * d * 16 + 2 * l * 32 * d               # 4 heads x 8, 2 kv heads
  attn = 2 * (2 * 4 * l * l * 8)
  mlp = 3 * 2 * l * d * 64
  head = 2 * l * d * V  # every position of the row (image slots inside it): the loss masks pick
  return {"patch": b * patch, "encoder_blocks": b * enc, "connector": b * conn,
          "dense": b * 2 * (qkvo + mlp), "attn": b * 2 * attn, "head": b * head}


def test_forward_matches_hand_count():
  config, mm, _ = _setup(load_config("test"))
  h = _hand_count()
  out = flops.forward_flops(config, mm.abstract_params)
  assert out["by_part"] == {"encoder": h["patch"] + h["encoder_blocks"], "connector": h["connector"],
                            "decoder": h["dense"] + h["attn"], "head": h["head"]}
  assert out["total"] == sum(h.values())
  assert flops.forward_flops(config, mm.abstract_params, batch_size=1)["total"] == sum(h.values()) / 8


@pytest.mark.parametrize("rules,parts", [
    # (part: backward / forward). Pixels need no gradient: the patch embedding has no dX.
    (ALL, {"encoder": None, "connector": 2, "decoder": 2, "head": 2}),
    # LLaVA stage 1: frozen encoder forward only; the connector dW only; the frozen LLM passes the
    # gradient down: dX of its projections and of both attention operands, no dW.
    (CONNECTOR_ONLY, {"encoder": 0, "connector": 1, "decoder": None, "head": 1}),
    (FROZEN_ENCODER, {"encoder": 0, "connector": 1, "decoder": 2, "head": 2}),
])
def test_train_backward_follows_freeze_rules(rules, parts):
  config, mm, labels = _setup(load_config("test"), rules)
  h = _hand_count()
  out = flops.train_flops(config, mm.abstract_params, labels)
  expected = dict(parts)
  if rules is ALL:
    expected["encoder"] = (h["patch"] * 1 + h["encoder_blocks"] * 2) / (h["patch"] + h["encoder_blocks"])
  if rules is CONNECTOR_ONLY:
    expected["decoder"] = (h["dense"] * 1 + h["attn"] * 2) / (h["dense"] + h["attn"])
  for part, ratio in expected.items():
    row = out["by_part"][part]
    assert row["backward"] == pytest.approx(ratio * row["forward"]), part
  assert out["total"] == out["forward"] + out["backward"]
  assert out["forward"] == sum(h.values())


def _wide(family, connector="linear"):
  """Matmul-dominated (width 128) and unscanned, for XLA:CPU's count."""
  c = load_config("test")
  c.model.family, c.model.connector = family, connector
  c.global_batch_size, c.data.image_size, c.data.text_len = 4, 64, 48
  c.model.encoder.update(dict(patch_size=8, width=128, depth=2, num_heads=4, mlp_dim=256))
  c.model.decoder.update(dict(width=128, depth=2, num_heads=4, num_kv_heads=2, head_dim=32, mlp_dim=256))
  c.model.connector_options.resampler.update(dict(num_queries=16, depth=1, num_heads=4, mlp_dim=256))
  return c


def _wide_mllama():
  """The cross family in Llama 3.2 Vision's form: the tiled tower (2 tiles, all of an image's in one
  sequence), cross blocks at stack indices 1 and 3 of 4 (a trailing one)."""
  c = _wide("cross")
  c.model.encoder = mlc.ConfigDict(dict(patch_size=8, width=128, depth=2, global_depth=1, num_heads=4,
                                        mlp_dim=256, image_size=64, max_num_tiles=2,
                                        aspect_ratios=((1, 1), (1, 2)), intermediate_layers=(0,)))
  c.model.family_options.cross.update(dict(layers=(1, 3), encoder="mllama", unseen_rows="hf",
                                           image_groups="consecutive"))
  return c


@pytest.mark.parametrize("family,connector,rules", [
    ("unified", "linear", ALL), ("unified", "linear", CONNECTOR_ONLY), ("cross", "linear", FROZEN_LLM),
    ("hybrid", "pixel_shuffle", CONNECTOR_ONLY), ("lm", "linear", ALL), ("mllama", "linear", FROZEN_LLM),
], ids=["unified-all", "unified-connector_only", "cross-frozen_llm", "hybrid-connector_only", "lm-all",
        "mllama-frozen_llm"])
def test_train_flops_match_xla_cost_analysis(family, connector, rules):
  config = _wide_mllama() if family == "mllama" else _wide(family, connector)
  config, mm, labels = _setup(config, rules, vocab=256)
  tx = optim.make_optimizer(config.optim, config.total_steps, labels)
  example_batch = tasks.TASKS[mm.model.task].example_batch
  batch = jax.eval_shape(functools.partial(example_batch, config, config.global_batch_size))
  with mm.context():
    xla = mm.train_step_jit(tx).lower(mm.abstract_train_state(tx), batch).compile().cost_analysis()
  ours = flops.train_flops(config, mm.abstract_params, labels)["total"]
  assert 1.0 <= xla["flops"] / ours <= 1.05


def test_forward_flops_match_xla_cost_analysis():
  config, mm, _ = _setup(_wide("unified"), vocab=256)
  example_batch = tasks.TASKS[mm.model.task].example_batch
  batch = jax.eval_shape(functools.partial(example_batch, config, config.global_batch_size))
  with mm.context():
    fwd = jax.jit(functools.partial(tasks.forward, mm.model)).lower(mm.abstract_params, batch)
    xla = fwd.compile().cost_analysis()
  assert 1.0 <= xla["flops"] / flops.forward_flops(config, mm.abstract_params)["total"] <= 1.05


@pytest.mark.parametrize("family", ["unified", "cross"])
def test_scanned_layers_count_as_unrolled(family):
  counts = []
  for scan in (False, True):
    config = load_config("test")
    config.model.family, config.model.family_options.cross.every = family, 2
    config.model.encoder.scan = config.model.decoder.scan = scan
    config, mm, labels = _setup(config, FROZEN_LLM)
    counts.append(flops.train_flops(config, mm.abstract_params, labels))
  assert counts[0] == counts[1]


def test_a_model_without_count_flops_is_a_value_error(monkeypatch):
  """Each model class counts itself (count_flops); one that does not: ValueError naming it (the trainer
  logs a warning and runs without MFU)."""
  config, mm, _ = _setup(load_config("test"))

  class Uncounted:
    pass
  monkeypatch.setattr(flops, "build_model", lambda *args: Uncounted())
  with pytest.raises(ValueError, match=r"no count for Uncounted \(it has no count_flops method\)"):
    flops.forward_flops(config, mm.abstract_params)

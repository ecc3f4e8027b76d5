"""mm_jax.mfu: the peak table, the override, the measured CPU peak, tokens per step, and the train loop's
tokens_per_s and mfu in metrics.jsonl."""
import copy
import json
import types

import jax
import pytest

from conftest import load_config
from mm_jax.perf import mfu
from mm_jax.train import loop as train
from mm_jax.config import validate
from mm_jax.errors import UserError
from mm_jax.train.metrics import MetricWriter
from mm_jax.models import build_model


def _device(kind: str, platform: str = "gpu"):
  return types.SimpleNamespace(device_kind=kind, platform=platform, process_index=0)


@pytest.mark.parametrize("kind,dtype,peak,key", [
    ("NVIDIA H100 80GB HBM3", "bfloat16", 989e12, "NVIDIA H100"),
    ("NVIDIA H100 80GB HBM3", "float32", 494.7e12, "NVIDIA H100"),  # TF32: jax's DEFAULT precision
    ("NVIDIA H100 PCIe", "bfloat16", 756e12, "NVIDIA H100 PCIe"),  # the longest prefix wins
    ("NVIDIA H200", "bfloat16", 989e12, "NVIDIA H200"),
    ("NVIDIA A100-SXM4-80GB", "bfloat16", 312e12, "NVIDIA A100"),
    ("TPU v5 lite", "bfloat16", 197e12, "TPU v5 lite"),  # not "TPU v5" (v5p)
    ("TPU v5", "bfloat16", 459e12, "TPU v5"),
    ("TPU v6 lite", "float32", 918e12, "TPU v6 lite"),
    ("TPU v4", "bfloat16", 275e12, "TPU v4"),
])
def test_table_by_prefix_and_dtype(kind, dtype, peak, key):
  assert mfu.peak_flops_per_device(_device(kind, "tpu" if "TPU" in kind else "gpu"), dtype) == (
      peak, f"datasheet ({key}, {dtype})")


def test_override_wins_and_unknown_kinds_are_not_in_the_table():
  assert mfu.peak_flops_per_device(_device("TPU v5 lite", "tpu"), "bfloat16", override=1e14) == (
      1e14, "config.mfu_peak_flops")
  assert mfu.datasheet_peak("NVIDIA GeForce RTX 4090", "bfloat16") is None
  assert mfu.datasheet_peak("TPU v5 lite", "float16") is None


def test_cpu_is_measured_and_shared_by_the_hosts_devices():
  cpu = jax.devices("cpu")[0]
  peak, source = mfu.peak_flops_per_device(cpu, "float32", n=128, seconds=0.02)
  assert source == "measured" and peak > 0
  # conftest simulates 8 CPU devices on this host: each gets an eighth of the host's rate.
  assert peak == mfu.matmul_peak_flops("float32", 128, 0.02, cpu) / len(jax.devices("cpu"))


def test_bad_peak_override_is_a_user_error():
  config = load_config("test")
  config.mfu_peak_flops = -1.0
  with pytest.raises(UserError, match=r"^mfu_peak_flops=-1.0 must be a number >= 0"):
    validate.check_fields(config)


@pytest.mark.parametrize("family,tokens", [
    ("unified", 8 * (16 + 20)),  # (32 / 8)^2 = 16 image tokens (linear connector) + text_len 20
    ("cross", 8 * 20),           # the image only by cross-attention: text tokens
    ("hybrid", 8 * (4 + 20)),    # the 16x16 thumbnail (tiles 2): 4 tokens in the sequence
    ("lm", 8 * 20),
])
def test_tokens_per_step(family, tokens):
  config = load_config("test")  # global_batch_size 8, image 32, patch 8, text_len 20
  config.model.family = family
  assert mfu.tokens_per_step(config, build_model(config.model, 128)) == tokens


def test_tokens_per_step_siglip_counts_both_towers():
  config = load_config("test", "siglip_shapes")
  assert mfu.tokens_per_step(config, build_model(config.model, 128)) == 8 * (16 + 20)


def test_writer_calls_throughput_only_once_steps_per_sec_is_known(tmp_path):
  calls = []
  writer = MetricWriter(tmp_path, 10, lambda sps: calls.append(sps) or {"mfu": 0.5})
  writer.write(1, {"loss": 1.0})  # a run with one log step never asks (so never measures a peak)
  assert not calls
  writer.write(2, {"loss": 1.0})
  writer.close()
  assert len(calls) == 1
  assert [sorted(json.loads(l)) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
      ["loss", "step"], ["loss", "mfu", "step", "steps_per_sec"]]


@pytest.mark.slow  # trains end to end
def test_train_logs_tokens_per_s_and_mfu_after_the_first_log(test_config, tmp_path):
  config = copy.deepcopy(test_config)  # 4 steps, a log every 2
  config.checkpoint_every = 4  # one save: the run is mostly compiles
  train.train(config, str(tmp_path))
  logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [m["step"] for m in logged] == [2, 4]
  assert "mfu" not in logged[0] and "tokens_per_s" not in logged[0]
  for m in logged[1:]:
    assert m["tokens_per_s"] == pytest.approx(8 * (16 + 20) * m["steps_per_sec"])
    assert 0 < m["mfu"] < 1, m
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(tmp_path / "tensorboard"))
  events.Reload()
  assert [s.step for s in events.Scalars("mfu")] == [4]

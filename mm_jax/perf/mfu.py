"""Model-FLOP utilisation: what a train step achieves against the chips' peak FLOP/s.

  mfu = train FLOPs per step (mm_jax.flops, frozen parts forward only) x steps/s
        / (peak FLOP/s per device x devices)

The peak per device: config.mfu_peak_flops if set (> 0), else the datasheet's dense peak of the device
kind and compute dtype (PEAK_FLOPS), else (CPU, or a kind not in the table) measured, as the best rate
of a jitted square matmul of the compute dtype (the same kind of kernel a step's projections run on),
once per process and size.
"""
import functools
import time

import jax
import jax.numpy as jnp
import ml_collections as mlc
from absl import logging

from mm_jax.perf import flops as flops_lib
from mm_jax.tasks import TASKS

# Dense (no sparsity) peak FLOP/s per jax device, by device_kind prefix (the longest matching prefix
# wins: "TPU v5 lite" before "TPU v5") and compute dtype. Sources: the Cloud TPU system-architecture
# pages (per chip; v4 and v5p run a chip's two TensorCores as one device, "megacore"), and NVIDIA's
# H100 (SXM; PCIe), H200 and A100 datasheets.
# float32: the rate jax's DEFAULT matmul precision (this codebase sets no other) gets from f32 inputs:
# on TPU one bf16 pass (so the bf16 peak), on A100 / H100 / H200 TF32 tensor cores (jax issue 18934),
# not the CUDA-core FP32 rate (H100 67e12, A100 19.5e12), which f32 matmuls would exceed (MFU > 1).
PEAK_FLOPS = {
    "TPU v4": {"bfloat16": 275e12, "float32": 275e12},
    "TPU v5 lite": {"bfloat16": 197e12, "float32": 197e12},  # v5e
    "TPU v5": {"bfloat16": 459e12, "float32": 459e12},       # v5p
    "TPU v6 lite": {"bfloat16": 918e12, "float32": 918e12},  # v6e (Trillium)
    "NVIDIA H100": {"bfloat16": 989e12, "float32": 494.7e12},  # SXM5; TF32 dense
    "NVIDIA H100 PCIe": {"bfloat16": 756e12, "float32": 378e12},
    "NVIDIA H200": {"bfloat16": 989e12, "float32": 494.7e12},  # the H100 SXM's tensor cores
    "NVIDIA A100": {"bfloat16": 312e12, "float32": 156e12},    # SXM and PCIe; TF32 dense
}


@functools.lru_cache(maxsize=None)
def matmul_peak_flops(dtype: str = "float32", n: int = 1024, seconds: float = 0.3,
                      device: jax.Device | None = None) -> float:
  """FLOP/s of an n x n @ n x n matmul on `device` (default: the first), the best of repeats over about
  `seconds` after a warm-up: 2 n^3 / time."""
  device = device or jax.devices()[0]
  a_NxN = jax.device_put(jnp.ones((n, n), dtype), device)
  matmul = jax.jit(lambda a: a @ a)
  matmul(a_NxN).block_until_ready()
  best, end = float("inf"), time.perf_counter() + seconds
  while time.perf_counter() < end or best == float("inf"):
    start = time.perf_counter()
    matmul(a_NxN).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * n ** 3 / best


def datasheet_peak(device_kind: str, dtype: str) -> tuple[float, str] | None:
  """(FLOP/s, the table's key) of the longest PEAK_FLOPS prefix of device_kind, or None."""
  keys = [k for k in PEAK_FLOPS if device_kind.startswith(k) and dtype in PEAK_FLOPS[k]]
  if not keys:
    return None
  key = max(keys, key=len)
  return PEAK_FLOPS[key][dtype], key


def peak_flops_per_device(device: jax.Device, dtype: str, *, override: float = 0.0, n: int = 1024,
                          seconds: float = 0.3) -> tuple[float, str]:
  """(peak FLOP/s of one device at compute `dtype`, where it comes from).

  override > 0 (config.mfu_peak_flops) wins. CPU devices of one process share its cores (and XLA's
  matmul uses all of them), so each gets the measured rate divided by their count: the devices then
  add up to the host's rate however many are simulated.
  """
  if override:
    return float(override), "config.mfu_peak_flops"
  if device.platform != "cpu":
    found = datasheet_peak(device.device_kind, dtype)
    if found:
      return found[0], f"datasheet ({found[1]}, {dtype})"
  measured = matmul_peak_flops(dtype, n, seconds, device)
  if device.platform == "cpu":
    measured /= sum(d.process_index == device.process_index for d in jax.devices("cpu"))
  return measured, "measured"


def tokens_per_step(config: mlc.ConfigDict, model) -> int:
  """Tokens one train step processes: global_batch_size x the tokens of one example's sequence(s), as
  its task counts them (Task.tokens_per_example: e.g. the decoder's text and the image tokens in it)."""
  return int(TASKS[model.task].tokens_per_example(config, model) * config.global_batch_size)


class Throughput:
  """tokens_per_s and mfu from a steps/s: the step's FLOPs and tokens counted once at construction,
  the peak looked up (or measured) at the first call only, so a run that never knows its steps/s
  (fewer than 2 log steps) never measures."""

  def __init__(self, config: mlc.ConfigDict, model, abstract_params, labels, devices):
    self.flops = flops_lib.train_flops(config, abstract_params, labels, model=model)["total"]
    self.tokens = tokens_per_step(config, model)
    self._devices = list(devices)
    self._dtype = config.model.dtype
    self._override = config.mfu_peak_flops  # 0: automatic
    self.peak = self.source = None

  def __call__(self, steps_per_sec: float) -> dict[str, float]:
    if self.peak is None:
      local = [d for d in self._devices if d.process_index == jax.process_index()]  # one it can run on
      per_device, self.source = peak_flops_per_device((local or self._devices)[0], self._dtype,
                                                      override=self._override)
      self.peak = per_device * len(self._devices)
      logging.info("mfu: %.4g model FLOPs per step against %.4g FLOP/s per device (%s) x %d devices",
                   self.flops, per_device, self.source, len(self._devices))
    return {"tokens_per_s": self.tokens * steps_per_sec, "mfu": self.flops * steps_per_sec / self.peak}

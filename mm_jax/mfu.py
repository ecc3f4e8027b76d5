"""Model-FLOP utilisation: what a train step achieves against the chips' peak FLOP/s.

On CPU no datasheet gives the peak: it is measured, as the best rate of a jitted square matmul of the
compute dtype (the same kind of kernel a step's projections run on), once per process and size.
"""
import functools
import time

import jax
import jax.numpy as jnp


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

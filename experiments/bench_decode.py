r"""Greedy decoding: the KV cache (mm_jax.eval.decode.greedy_decode) against recomputing the full forward for
every new token, and the cached per-token latency at a short and a long context.

  python experiments/bench_decode.py                   # configs/shapes_tiny.py's model, random params
  python experiments/bench_decode.py --batch=8 --new_tokens=128 --repeats=5

1. 128 new tokens after image (16 tokens) + a 16-token prefix, --batch examples, two ways, alternated:
   cache      greedy_decode, jitted: one prefill, then one decode_step per token (a fori_loop)
   recompute  a jitted full forward (model.apply, teacher-forced layout: image + prefix + the tokens
              so far, in a fixed buffer of 16 + 16 + 128 positions, the rest masked as padding) per
              new token, taking the argmax at the last real position. The buffer is fixed so that it
              compiles once; a growing sequence would recompile per length (or cost about half the
              FLOPs, still quadratic in the tokens generated).
   Both produce the same tokens (checked: "tokens_equal").
2. Per-token latency with the cache: decode_step in a jitted fori_loop of --latency_steps steps after a
   prefill of 32 and of 512 context tokens (image + prefix), alternated.

One JSON line per measurement, then
  {"bench": "decode", "summary": true, "speedup": recompute_s / cache_s, "target": 10, "ok": ...,
   "latency_ms_32", "latency_ms_512"}
Expected on the shared 2-core CPU (batch 4): cache ~9,600 tokens/s, recompute ~310 tokens/s for 128
tokens: speedup ~30x (target >= 10); per token ~0.31 ms at 32 and ~0.68 ms at 512 tokens of context.
The cache is kept BxKxSxH, the layout attention's dots read, so a step transposes only its new
token's k/v (with the cache BxSxKxH, XLA:CPU transposed every layer's whole cache each step: 7,460
tokens/s, 0.44 / 0.97 ms in the same session). ~30 s. Appends to
experiments/bench_decode.jsonl.
"""
import argparse
import functools
import json
import pathlib
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "experiments"))

from bench_stages import load_config  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.train import sharding  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.eval.decode import greedy_decode  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.train.state import ModelOnMesh  # pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.cli import keep_freed_memory  # pylint: disable=g-import-not-at-top,wrong-import-position

keep_freed_memory()  # as mm_jax.train does on CPU: XLA's per-step temporaries are not faulted in anew

TARGET = 10.0
JSONL = REPO / "experiments" / "bench_decode.jsonl"


def make_recompute_decode(model, b: int, p: int, max_new: int):
  """Greedy decoding without a cache: the full forward over the whole sequence for every new token
  (one jitted forward, compiled once, called per token). Prefixes are unpadded here (all P long).
  Returns decode(params, image, prefix_BxP) -> int32 BxM, as greedy_decode."""
  t = p + max_new
  pos_T = jnp.arange(t)

  @jax.jit
  def next_token(params, image_BxHxWxC, text_BxT, length):
    # Prefix: one bidirectional block (mask_ar 0); generated tokens causal; past `length`: padding.
    mask_ar_BxT = jnp.broadcast_to(pos_T >= p, (b, t)).astype(jnp.int32)
    mask_input_BxT = jnp.broadcast_to(pos_T < length, (b, t)).astype(jnp.int32)
    logits_BxTxV = model.apply({"params": params}, image_BxHxWxC, text_BxT, mask_ar_BxT, mask_input_BxT)
    token_B = jnp.argmax(logits_BxTxV[:, length - 1], axis=-1).astype(jnp.int32)
    return text_BxT.at[:, length].set(token_B, mode="drop")

  def decode(params, image_BxHxWxC, prefix_BxP):
    text_BxT = jnp.zeros((b, t), jnp.int32).at[:, :p].set(prefix_BxP)
    for length in range(p, t):
      text_BxT = next_token(params, image_BxHxWxC, text_BxT, length)
    return text_BxT[:, p:]
  return decode


def timed(fn, *args):
  start = time.perf_counter()
  out = jax.block_until_ready(fn(*args))
  return time.perf_counter() - start, out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default="shapes_tiny")
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--prefix", type=int, default=16, help="text prefix tokens (after the image)")
  parser.add_argument("--new_tokens", type=int, default=128)
  parser.add_argument("--contexts", default="32,512", help="context tokens (image + prefix) for latency")
  parser.add_argument("--latency_steps", type=int, default=64)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args(argv)
  name, _, arg = args.config.partition(":")
  config = load_config(name, arg)
  vocab = config.model.decoder.vocab_size or config.data.vocab_size
  mesh = sharding.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  mm = ModelOnMesh.create(config, vocab, mesh)
  model, params = mm.model, mm.init_params(0)
  rng = np.random.default_rng(0)
  s, b = config.data.image_size, args.batch
  image = jnp.asarray(rng.uniform(-1, 1, (b, s, s, 3)), jnp.float32)
  n = model.num_image_tokens(image.shape)

  def prefix(p: int):
    return jnp.asarray(rng.integers(4, vocab, (b, p)), jnp.int32)

  # 1. cache vs recompute, 128 new tokens.
  prefix_BxP = prefix(args.prefix)
  decode = jax.jit(functools.partial(greedy_decode, model, max_new=args.new_tokens))
  cache = lambda: decode(params, image, prefix_BxP, jnp.ones_like(prefix_BxP),
                         jnp.full((b,), args.prefix, jnp.int32))
  recompute_fn = make_recompute_decode(model, b, args.prefix, args.new_tokens)
  recompute = lambda: recompute_fn(params, image, prefix_BxP)
  sides = {"cache": cache, "recompute": recompute}
  lines, times, outs = [], {k: [] for k in sides}, {}
  with mm.context():
    for k, fn in sides.items():
      outs[k] = np.asarray(fn())  # compile + warm-up
    for r in range(args.repeats):
      for k in (list(sides) if r % 2 == 0 else reversed(list(sides))):
        times[k].append(timed(sides[k])[0])
  equal = float(np.mean(outs["cache"] == outs["recompute"]))
  for k, ts in times.items():
    sec = statistics.median(ts)
    lines.append({"bench": "decode", "what": k, "new_tokens": args.new_tokens, "batch": b,
                  "context": n + args.prefix, "seconds": round(sec, 4),
                  "tokens_per_s": round(b * args.new_tokens / sec, 1),
                  "repeats_s": [round(t, 4) for t in ts]})

  # 2. per-token latency with the cache at each context length.
  def decode_loop(params, cache, cache_mask, token_B, ctx):
    def body(t, carry):
      token_B, cache, cache_mask = carry
      logits_BxV, cache, cache_mask = model.apply(
          {"params": params}, token_B, jnp.full((b,), ctx, jnp.int32) + t, cache, cache_mask, ctx + t,
          method=model.decode_step)
      return jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32), cache, cache_mask
    return jax.lax.fori_loop(0, args.latency_steps, body, (token_B, cache, cache_mask))[0]

  contexts = [int(c) for c in args.contexts.split(",")]
  loops = {}
  with mm.context():
    for ctx in contexts:
      p = ctx - n
      pre = prefix(p)
      kv = model.decoder.init_cache(b, ctx + args.latency_steps)
      prefill = jax.jit(functools.partial(model.apply, method=model.prefill))
      _, kv, kv_mask = prefill({"params": params}, image, pre, jnp.ones_like(pre), kv)
      loop = jax.jit(functools.partial(decode_loop, ctx=ctx))
      token = jnp.zeros((b,), jnp.int32)
      loops[ctx] = functools.partial(loop, params, kv, kv_mask, token)
      loops[ctx]()  # compile + warm-up
    lat = {c: [] for c in contexts}
    for r in range(args.repeats):
      for ctx in (contexts if r % 2 == 0 else reversed(contexts)):
        lat[ctx].append(timed(loops[ctx])[0] / args.latency_steps * 1e3)
  for ctx, ts in lat.items():
    lines.append({"bench": "decode", "what": "cached_token_latency", "context": ctx, "batch": b,
                  "cache_slots": ctx + args.latency_steps, "ms_per_token": round(statistics.median(ts), 3),
                  "repeats_ms": [round(t, 3) for t in ts]})

  speedup = statistics.median(times["recompute"]) / statistics.median(times["cache"])
  lines.append({"bench": "decode", "summary": True, "config": args.config, "batch": b,
                "new_tokens": args.new_tokens, "speedup": round(speedup, 1), "target": TARGET,
                "ok": speedup >= TARGET and equal == 1.0, "tokens_equal": equal,
                "cache_tokens_per_s": lines[0]["tokens_per_s"],
                "recompute_tokens_per_s": lines[1]["tokens_per_s"],
                **{f"latency_ms_{c}": round(statistics.median(lat[c]), 3) for c in contexts},
                "latency_ratio": round(statistics.median(lat[contexts[-1]])
                                       / statistics.median(lat[contexts[0]]), 2),
                "device": jax.devices()[0].device_kind})
  with open(JSONL, "a") as f:
    for line in lines:
      print(json.dumps(line), flush=True)
      f.write(json.dumps(line) + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())

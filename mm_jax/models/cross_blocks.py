"""The cross family's gated cross-attention blocks (Flamingo / Llama 3.2 Vision form): `CrossBlock`
(kv once per image set, then per text chunk) and `CrossStack`, the `cross` parameter subtree
(block_i, or scanned one `blocks` stacked on a "layers" axis). cross_attention.py places them between
the decoder's blocks.
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.models import stack
from mm_jax.models.decoder import count_gated_mlp
from mm_jax.models.flop_count import Tally, attention
from mm_jax.models.layers import (ACTIVATIONS, DType, Projection, RMSNorm, attend_kv_major, constrain,
                                  dense, partitioned)

Array = jax.Array
KV = dict[str, Array]  # {"k", "v"}: BxKxSxH, S = images x tokens per image (scanned: one, CxBxKxSxH)


def kv_len(kvs) -> int:
  """S, the image tokens of the cross blocks' k/v (a tuple per block, or stacked)."""
  return kvs["k"].shape[3] if isinstance(kvs, dict) else kvs[0]["k"].shape[2]


class CrossBlock(nn.Module):
  """Gated cross-attention + gated MLP. `kv` once per image set, then `__call__` per text chunk."""
  width: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  mlp_dim: int
  norm: str = "gemma"
  norm_eps: float = 1e-6
  mlp_act: str = "gelu_tanh"
  unseen_rows: str = "zero"  # see CrossOptions
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  def setup(self):
    n, k, h, d = self.num_heads, self.num_kv_heads, self.head_dim, self.width
    if n % k:
      raise ValueError(f"cross num_heads={n} must be a multiple of num_kv_heads={k}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    proj = lambda m, heads, name: Projection((m, h), ("embed", heads, "head_dim"), name=name, **kw)
    norm = lambda name, axis="embed": RMSNorm(self.norm_eps, self.norm, self.param_dtype, axis, name=name)
    self.q, self.k, self.v = proj(n, "heads", "q"), proj(k, "kv_heads", "k"), proj(k, "kv_heads", "v")
    self.o = Projection((d,), ("heads", "head_dim", "embed"), n_in=2, name="o", **kw)
    self.q_norm, self.k_norm = norm("q_norm", "head_dim"), norm("k_norm", "head_dim")
    self.norm_attn, self.norm_mlp = norm("norm_attn"), norm("norm_mlp")
    self.gate = dense(self.mlp_dim, ("embed", "mlp"), "gate", use_bias=False, **kw)
    self.up = dense(self.mlp_dim, ("embed", "mlp"), "up", use_bias=False, **kw)
    self.down = dense(d, ("mlp", "embed"), "down", use_bias=False, **kw)
    zero = partitioned(nn.initializers.zeros_init(), ())
    self.attn_gate = self.param("attn_gate", zero, (), self.param_dtype)
    self.mlp_gate = self.param("mlp_gate", zero, (), self.param_dtype)

  def kv(self, img_BxSxD: Array) -> KV:
    """Image keys (normalised per head, no RoPE) and values, laid out BxKxSxH as attention's dots read
    them: cached at prefill, they are not transposed again at every decode step."""
    kv_major = lambda x_BxSxKxH: x_BxSxKxH.transpose(0, 2, 1, 3)
    return {"k": kv_major(self.k_norm(self.k(img_BxSxD))), "v": kv_major(self.v(img_BxSxD))}

  def __call__(self, x_BxLxD: Array, kv: KV, mask_BxLxS: Array) -> Array:
    seen_BxLx1 = jnp.any(mask_BxLxS, axis=-1, keepdims=True)
    row_BxLx1 = seen_BxLx1.astype(self.dtype)
    gate = lambda g: jnp.tanh(g.astype(jnp.float32)).astype(self.dtype)
    hf = self.unseen_rows == "hf"
    if hf:  # HF Mllama: a row that sees no image attends to every key, and keeps that branch
      mask_BxLxS = mask_BxLxS | ~seen_BxLx1
    q_BxLxNxH = self.q_norm(self.q(self.norm_attn(x_BxLxD)))
    out_BxLxNxH = constrain(attend_kv_major(q_BxLxNxH, kv["k"], kv["v"], mask_BxLxS),
                            ("act_batch", "act_len", "act_heads", None))
    # "zero": a row that sees no image attends uniformly over masked keys: finite, and zeroed by `row`.
    attn_BxLxD = self.o(out_BxLxNxH) if hf else row_BxLx1 * self.o(out_BxLxNxH)
    x_BxLxD = x_BxLxD + gate(self.attn_gate) * attn_BxLxD
    y_BxLxD = self.norm_mlp(x_BxLxD)
    h_BxLxF = constrain(ACTIVATIONS[self.mlp_act](self.gate(y_BxLxD)) * self.up(y_BxLxD),
                        ("act_batch", "act_len", "act_mlp"))
    x_BxLxD = x_BxLxD + gate(self.mlp_gate) * (row_BxLx1 * self.down(h_BxLxF))
    return constrain(x_BxLxD, ("act_batch", "act_len", "act_embed"))

  def count_kv(self, t: Tally, part: str, pre: str, img: str, kv: tuple[str, str], b: int, s: int):
    """kv() on b x s image tokens of stream img -> streams kv = (k, v)."""
    kh = self.num_kv_heads * self.head_dim
    t.dense(part, f"{pre}/k", img, kv[0], b * s, self.width, kh)
    t.ew(kv[0], [kv[0]], [f"{pre}/k_norm"])
    t.dense(part, f"{pre}/v", img, kv[1], b * s, self.width, kh)

  def count_flops(self, t: Tally, part: str, pre: str, x: str, kv: tuple[str, str], b: int, l: int,
                  s: int) -> None:
    """__call__ on b x l positions of stream x, attending to s image tokens in streams kv."""
    d = self.width
    t.ew("h", [x], [f"{pre}/norm_attn"])
    t.ew("k", [kv[0]])
    t.ew("v", [kv[1]])
    attention(t, part, pre, "h", None, "a", b, l, s, d, self.num_heads, self.num_kv_heads,
              self.head_dim, qk_norm=True)
    t.ew("a", ["a"], [f"{pre}/attn_gate"])
    t.ew(x, [x, "a"])
    count_gated_mlp(t, part, pre, x, b, l, d, self.mlp_dim)
    t.ew("m", ["m"], [f"{pre}/mlp_gate"])
    t.ew(x, [x, "m"])


class CrossStack(nn.Module):
  """The `cross` subtree: `count` CrossBlocks named block_i, or with scan one `blocks` stacked on a
  "layers" axis (applied by CrossAttentionVLM._run_scanned)."""
  count: int
  block: dict  # CrossBlock's fields
  scan: bool = False
  remat: str = "none"
  remat_names: tuple[str, ...] = ()

  def setup(self):
    if self.scan:
      self.blocks = CrossBlock(**self.block, name="blocks")
    else:
      cls = stack.remat_module(CrossBlock, self.remat, self.remat_names)
      self.blocks = [cls(**self.block, name=f"block_{i}") for i in range(self.count)]

  def count_kv(self, t: Tally, pre: str, img: str, b: int, s: int) -> None:
    """FLOPs of kv(): every block's image k/v (streams img_k{j}, img_v{j}), once per step."""
    block = CrossBlock(**self.block, parent=None)
    for j in range(self.count):
      block.count_kv(t, pre, f"{pre}/block_{j}", img, (f"img_k{j}", f"img_v{j}"), b, s)

  def count_block(self, t: Tally, pre: str, j: int, x: str, b: int, l: int, s: int) -> None:
    """FLOPs of block j on b x l positions of stream x over s image tokens (after count_kv)."""
    CrossBlock(**self.block, parent=None).count_flops(t, pre, f"{pre}/block_{j}", x,
                                                      (f"img_k{j}", f"img_v{j}"), b, l, s)

  def kv(self, img_BxSxD: Array):
    """Every block's image k/v: a tuple of KV, or scanned one KV stacked CxBxKxSxH."""
    if not self.scan:
      return tuple(b.kv(img_BxSxD) for b in self.blocks)
    if self.is_initializing():  # run each block once on a dummy query, creating all its params
      b = img_BxSxD.shape[0]
      x_Bx1xD = jnp.zeros((b, 1, self.block["width"]), img_BxSxD.dtype)
      mask_Bx1xS = jnp.ones((b, 1, img_BxSxD.shape[1]), bool)

      def body(block, x, img):
        kv = block.kv(img)
        return block(x, kv, mask_Bx1xS), kv
      return stack.scan(body, self.blocks, self.count, x_Bx1xD, img_BxSxD, in_axes=(nn.broadcast,))[1]
    cross = CrossBlock(**self.block, parent=None)
    return jax.vmap(lambda p: cross.apply({"params": p}, img_BxSxD, method="kv"))(self.stacked())

  def stacked(self) -> dict:
    """The scanned blocks' params, each with a leading axis of `count`."""
    return nn.meta.unbox(self.variables["params"]["blocks"])

  def __call__(self, i: int, x_BxLxD: Array, kv: KV, mask_BxLxS: Array) -> Array:
    return self.blocks[i](x_BxLxD, kv, mask_BxLxS)

"""The cross family (Flamingo, Llama 3.2 Vision, NVLM-X): images never enter the decoder's sequence;
gated cross-attention blocks between the decoder's blocks let text attend to them.

  image(s) -> encoder -> connector -> features BxIxPxD -> per cross block k/v (computed once)
  text -> embed -> [cross_0, block_0 .. block_N-1] [cross_1, block_N ..] ... -> final norm -> head
A super-block is 1 cross block + N = model.family_options.cross.every decoder blocks (cross first, as
Flamingo). Scanned (model.decoder.scan), the super-blocks run as a lax.scan over the stacked params.
Parameter subtrees: `encoder`, `connector`, `decoder` (exactly the text LLM of `lm`), `cross/block_i`
(scanned: `cross/blocks`). Cross block, Mllama's, pre-norm: x += tanh(gate) * row * CrossAttn(norm(x))
and x += tanh(gate) * row * MLP(norm(x)); gates start at 0, so the untrained model is the text LLM.
Token t (a row index) sees image i iff image_pos[i] <= t and, with packed examples (segment), t is of
the example of image i (last_image_only: the last such group); `row` zeroes both branches for a token
that sees no image (experiments/README.md has the details and HF's difference).
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.config import fields
from mm_jax.errors import UserError
from mm_jax.models import checks, encoders, family, stack
from mm_jax.models.decoder import Cache, Decoder, DecoderBlock, count_gated_mlp, prefill_masks
from mm_jax.models.flop_count import Sizes, Tally, attention, counter
from mm_jax.models.layers import (ACTIVATIONS, DType, Projection, RMSNorm, attend_kv_major, constrain,
                                  dense, make_attn_mask, partitioned, row_positions)

Array = jax.Array
KV = dict[str, Array]  # {"k", "v"}: BxKxSxH, S = images x tokens per image (scanned: one, CxBxKxSxH)


def kv_len(kvs) -> int:
  """S, the image tokens of the cross blocks' k/v (a tuple per block, or stacked)."""
  return kvs["k"].shape[3] if isinstance(kvs, dict) else kvs[0]["k"].shape[2]


def visible_images(image_pos_BxI: Array, rows_BxL: Array, last_image_only: bool,
                   segment_BxL: Array | None = None) -> Array:
  """BxLxI bool: which images each token sees (see the module docstring). rows: the tokens' row indices
  (not RoPE positions, which restart in a packed row). With segment_BxL image i belongs to the example
  of the first token that sees it, segment[image_pos[i]]; padding (segment 0) sees none; an empty image
  (image_pos = L) is seen by nobody."""
  seen_BxLxI = image_pos_BxI[:, None, :] <= rows_BxL[:, :, None]
  if segment_BxL is not None:
    at_BxI = jnp.clip(image_pos_BxI, 0, segment_BxL.shape[1] - 1)
    image_seg_Bx1xI = jnp.take_along_axis(segment_BxL, at_BxI, axis=1)[:, None, :]
    seg_BxLx1 = segment_BxL[:, :, None]
    seen_BxLxI = seen_BxLxI & (seg_BxLx1 == image_seg_Bx1xI) & (seg_BxLx1 > 0)
  if last_image_only:  # keep the images at the largest position seen: the last group
    last_BxL = jnp.max(jnp.where(seen_BxLxI, image_pos_BxI[:, None, :], -1), axis=-1)
    seen_BxLxI = seen_BxLxI & (image_pos_BxI[:, None, :] == last_BxL[:, :, None])
  return seen_BxLxI


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
    row_BxLx1 = jnp.any(mask_BxLxS, axis=-1, keepdims=True).astype(self.dtype)
    gate = lambda g: jnp.tanh(g.astype(jnp.float32)).astype(self.dtype)
    q_BxLxNxH = self.q_norm(self.q(self.norm_attn(x_BxLxD)))
    out_BxLxNxH = constrain(attend_kv_major(q_BxLxNxH, kv["k"], kv["v"], mask_BxLxS),
                            ("act_batch", "act_len", "act_heads", None))
    # A row that sees no image attends uniformly over masked keys: finite, and zeroed by `row`.
    x_BxLxD = x_BxLxD + gate(self.attn_gate) * (row_BxLx1 * self.o(out_BxLxNxH))
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


class CrossAttentionVLM(nn.Module):
  """Same interface as vlm.UnifiedVLM (trainer, eval, decode.greedy_decode). `image` is BxHxWxC (one
  image) or BxIxHxWxC; `image_pos_BxI` (optional, default 0) places the images in the text (an empty
  image slot: image_pos = L); segment and positions pack several examples in a row."""
  encoder: nn.Module
  connector: nn.Module
  decoder: Decoder
  cross: CrossStack
  cross_every: int = 1
  prefix_attention: bool = True
  last_image_only: bool = True
  task = "vqa"

  def num_image_tokens(self, image_shape) -> int:
    """Tokens of one image in the decoder's sequence: none (BxHxWxC or BxIxHxWxC alike)."""
    del image_shape
    return 0

  def image_features(self, image: Array) -> Array:
    """BxHxWxC or BxIxHxWxC -> connector features Bx(I*P)xD, and I."""
    image_BxIxHxWxC = image[:, None] if image.ndim == 4 else image
    b, i = image_BxIxHxWxC.shape[:2]
    f_NxPxD = self.connector(self.encoder(image_BxIxHxWxC.reshape(b * i, *image_BxIxHxWxC.shape[2:])))
    return f_NxPxD.reshape(b, i * f_NxPxD.shape[1], f_NxPxD.shape[2]), i

  def _cross_mask(self, image_pos_BxI: Array, rows_BxL: Array, s: int,
                  segment_BxL: Array | None = None) -> Array:
    """BxLxS over the image tokens (each image's P tokens share its visibility)."""
    seen_BxLxI = visible_images(image_pos_BxI, rows_BxL, self.last_image_only, segment_BxL)
    return jnp.repeat(seen_BxLxI, s // image_pos_BxI.shape[1], axis=2)

  def _image(self, image: Array, image_pos_BxI: Array | None):
    img_BxSxD, i = self.image_features(image)
    if image_pos_BxI is None:
      image_pos_BxI = jnp.zeros((img_BxSxD.shape[0], i), jnp.int32)
    return self.cross.kv(img_BxSxD.astype(self.decoder.dtype)), image_pos_BxI

  def _run(self, x_BxLxD, positions_BxL, mask_BxLxS, kvs, xmask_BxLxS, cache=None, cache_index=None):
    """Super-blocks (cross block, then cross_every decoder blocks) -> logits BxLxV, self-attn cache."""
    if self.decoder.scan:
      return self._run_scanned(x_BxLxD, positions_BxL, mask_BxLxS, kvs, xmask_BxLxS, cache, cache_index)
    x_BxLxD, new_cache = x_BxLxD.astype(self.decoder.dtype), []
    for i, block in enumerate(self.decoder.blocks):
      if i % self.cross_every == 0:
        x_BxLxD = self.cross(i // self.cross_every, x_BxLxD, kvs[i // self.cross_every], xmask_BxLxS)
      x_BxLxD, c = block(x_BxLxD, positions_BxL, mask_BxLxS,
                         None if cache is None else cache[i], cache_index)
      new_cache.append(c)
    return self.decoder.logits(x_BxLxD), tuple(new_cache)

  def _run_scanned(self, x_BxLxD, positions_BxL, mask_BxLxS, kvs, xmask_BxLxS, cache, cache_index):
    """_run over stacked params: lax.scan over super-blocks, each a cross block then a lax.scan over
    its cross_every decoder blocks; the decoder's remat policy applies to both kinds of block."""
    x_BxLxD = x_BxLxD.astype(self.decoder.dtype)
    if self.is_initializing():  # the decoder creates its params (stacked blocks, final norm, head)
      self.decoder(x_BxLxD, positions_BxL, mask_BxLxS)
    count, every = self.cross.count, self.cross_every
    group = lambda a: a.reshape(count, every, *a.shape[1:])  # depth -> super-blocks x cross_every
    dec_params = jax.tree.map(group, nn.meta.unbox(self.decoder.variables["params"]["blocks"]))
    dec, cross = DecoderBlock(**self.decoder.block_fields(), parent=None), CrossBlock(**self.cross.block,
                                                                                        parent=None)
    remat = lambda f: stack.remat_fn(f, self.decoder.remat, self.decoder.remat_names)
    dec_fn = remat(lambda p, x, c: dec.apply({"params": p}, x, positions_BxL, mask_BxLxS, c, cache_index))
    cross_fn = remat(lambda p, x, kv: cross.apply({"params": p}, x, kv, xmask_BxLxS))

    def superblock(x, inputs):
      cross_p, kv, dec_p, c = inputs
      return jax.lax.scan(lambda x, pc: dec_fn(pc[0], x, pc[1]), cross_fn(cross_p, x, kv), (dec_p, c))

    x_BxLxD, new_cache = jax.lax.scan(
        superblock, x_BxLxD,
        (self.cross.stacked(), kvs, dec_params, None if cache is None else jax.tree.map(group, cache)))
    if new_cache is not None:
      new_cache = jax.tree.map(lambda a: a.reshape(-1, *a.shape[2:]), new_cache)
    return self.decoder.logits(x_BxLxD), new_cache

  def __call__(self, image: Array, text_BxT: Array, mask_ar_BxT: Array, mask_input_BxT: Array,
               image_pos_BxI: Array | None = None, segment_BxT: Array | None = None,
               positions_BxT: Array | None = None) -> Array:
    """Teacher-forced forward -> text logits BxTxV (logit t predicts token t + 1). segment_BxT: the
    example of each token (packing, layers.make_attn_mask); positions_BxT: RoPE positions (default
    0 .. T-1); images are placed by row index whatever the positions."""
    kvs, image_pos_BxI = self._image(image, image_pos_BxI)
    rows_BxT = row_positions(text_BxT)
    mask_ar_BxT = mask_ar_BxT if self.prefix_attention else jnp.ones_like(mask_input_BxT)
    xmask_BxTxS = self._cross_mask(image_pos_BxI, rows_BxT, kv_len(kvs), segment_BxT)
    logits_BxTxV, _ = self._run(self.decoder.embed(text_BxT), row_positions(text_BxT, positions_BxT),
                                make_attn_mask(mask_input_BxT, mask_ar_BxT, segment_BxT), kvs, xmask_BxTxS)
    return logits_BxTxV

  def prefill(self, image: Array, prefix_BxP: Array, prefix_mask_BxP: Array, cache: Cache,
              image_pos_BxI: Array | None = None):
    """Runs the (right-padded) prefix, filling self-attention slots [0, P) of `cache` (the decoder's
    init_cache); the image k/v of every cross block are computed here, once, and kept in the cache.

    Returns (logits BxPxV, cache {"self", "cross", "image_pos"}, cache_mask BxS: real slots).
    """
    kvs, image_pos_BxI = self._image(image, image_pos_BxI)
    cache_mask_BxS, mask_BxLxS = prefill_masks(prefix_mask_BxP, cache, causal=not self.prefix_attention)
    positions_BxL = row_positions(prefix_BxP)
    xmask_BxLxS = self._cross_mask(image_pos_BxI, positions_BxL, kv_len(kvs))
    logits_BxLxV, cache = self._run(self.decoder.embed(prefix_BxP), positions_BxL, mask_BxLxS, kvs,
                                    xmask_BxLxS, cache, 0)
    return logits_BxLxV, {"self": cache, "cross": kvs, "image_pos": image_pos_BxI}, cache_mask_BxS

  def decode_step(self, token_B: Array, position_B: Array, cache: dict, cache_mask_BxS: Array, slot):
    """One token per example at text position `position_B` (also its RoPE position), cache slot `slot`."""
    cache_mask_BxS = cache_mask_BxS.at[:, slot].set(True)
    kvs = cache["cross"]
    xmask_Bx1xS = self._cross_mask(cache["image_pos"], position_B[:, None], kv_len(kvs))
    logits_Bx1xV, self_cache = self._run(self.decoder.embed(token_B[:, None]), position_B[:, None],
                                         cache_mask_BxS[:, None, :], kvs, xmask_Bx1xS, cache["self"], slot)
    return logits_Bx1xV[:, 0], dict(cache, self=self_cache), cache_mask_BxS

  def count_flops(self, t: Tally, sizes: Sizes, batch: int, images_per_row: int | None = None) -> None:
    """Matmul FLOPs of the teacher-forced forward on `batch` examples (flop_count.py): None, one image
    each (the hybrid's thumbnail inserted: text_len + N positions); M, the in-row layout: M images per
    row, whose slots (the hybrid's) are inside text_len."""
    self.decoder.count_embed(t, "decoder", "x")
    m = images_per_row or 1
    s, n = self._count_images(t, sizes.image_size, batch * m)
    self.cross.count_kv(t, "cross", "img", batch, m * s)
    l = sizes.text_len + (n if images_per_row is None else 0)

    def cross_block(i: int) -> None:  # a super-block starts with its cross block
      if i % self.cross_every == 0:
        self.cross.count_block(t, "cross", i // self.cross_every, "x", batch, l, s)
    self.decoder.count_flops(t, "decoder", "x", batch, l, l, before_block=cross_block)

  def _count_images(self, t: Tally, size: int, b: int) -> tuple[int, int]:
    """FLOPs of the features of b images (stream img): (its tokens per image, in the sequence per image)."""
    patches, e = counter(self.encoder)(t, "encoder", b, size, "img")
    return counter(self.connector)(t, "connector", "img", b, patches, e), 0


@dataclasses.dataclass(frozen=True)
class CrossOptions:
  """model.family_options.cross (read by the cross and hybrid families); 0: the decoder's value."""
  every: int = 1                 # a cross block before every `every` decoder blocks
  num_heads: int = 0
  num_kv_heads: int = 0
  head_dim: int = 0
  mlp_dim: int = 0
  last_image_only: bool = True   # a token sees the last image (group) before it; False: all before it


OPTIONS = "model.family_options.cross"


def cross_attention(model_cfg, tokenizer_vocab: int) -> CrossAttentionVLM:
  """Method B (Llama 3.2 Vision, Flamingo, NVLM-X): text attends to the image by gated cross-attention.

  model.encoder, model.connector, model.decoder as the other families; model.family_options.cross
  (CrossOptions); model.prefix_attention."""
  decoder = family.build_decoder(model_cfg, tokenizer_vocab)
  opts = family.family_options(model_cfg, "cross", CrossOptions)
  every = opts.every
  if every < 1:
    raise UserError(f"{OPTIONS}.every must be >= 1, got {every}")
  if decoder.scan and decoder.depth % every:
    raise UserError(f"scanned super-blocks need model.decoder.depth ({decoder.depth}) to be a multiple "
                    f"of {OPTIONS}.every ({every}); change one, or set model.decoder.scan=False")
  field = lambda name: getattr(opts, name) or getattr(decoder, name)
  block = dict(width=decoder.width, num_heads=field("num_heads"), num_kv_heads=field("num_kv_heads"),
               head_dim=field("head_dim"), mlp_dim=field("mlp_dim"), norm=decoder.norm,
               norm_eps=decoder.norm_eps, mlp_act=decoder.mlp_act, **family.dtypes(model_cfg))
  return CrossAttentionVLM(
      encoder=encoders.ENCODERS["vit"].build(model_cfg), connector=family.build_connector(model_cfg),
      decoder=decoder, cross=CrossStack(count=-(-decoder.depth // every), block=block, scan=decoder.scan,
                                        remat=decoder.remat, remat_names=decoder.remat_names),
      cross_every=every, prefix_attention=model_cfg.prefix_attention,
      last_image_only=opts.last_image_only)


def check_cross(config) -> None:
  """model.family_options.cross: its sizes, and query heads a multiple of kv heads."""
  for name in ("num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
    fields.integer(config, f"{OPTIONS}.{name}", 0)  # 0: the decoder's
  fields.integer(config, f"{OPTIONS}.every", 1)
  fields.boolean(config, f"{OPTIONS}.last_image_only")
  opts, dec = config.model.family_options.cross, config.model.decoder
  heads, kv = opts.num_heads or dec.num_heads, opts.num_kv_heads or dec.num_kv_heads
  if heads % kv:
    raise UserError(f"the cross-attention's query heads ({heads}) must be a multiple of its kv heads "
                    f"({kv}); set --config.{OPTIONS}.num_heads / num_kv_heads (0: the decoder's)")


def _check(config) -> None:
  encoders.check_image(config, "vit")
  checks.decoder(config)
  check_cross(config)


CROSS = family.Family(cross_attention, _check, options=CrossOptions)

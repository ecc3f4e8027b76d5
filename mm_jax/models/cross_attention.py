"""The cross family (Flamingo, Llama 3.2 Vision, NVLM-X): images never enter the decoder's sequence;
gated cross-attention blocks between the decoder's blocks let text attend to them.

  image(s) -> encoder -> connector -> features BxIxPxD -> per cross block k/v (computed once)
  text -> embed -> [cross_0, block_0 .. block_N-1] [cross_1, block_N ..] ... -> final norm -> head
A super-block is 1 cross block + N = model.family_options.cross.every decoder blocks (cross first, as
Flamingo). Scanned (model.decoder.scan), the super-blocks run as a lax.scan over the stacked params.
Llama 3.2 Vision's placement instead (family_options.cross.layers, unscanned): cross block k at index
layers[k] of the whole stack, a trailing one after the last decoder block. Blocks: cross_blocks.py.
Parameter subtrees: `encoder`, `connector`, `decoder` (exactly the text LLM of `lm`), `cross/block_i`
(scanned: `cross/blocks`). Cross block, Mllama's, pre-norm: x += tanh(gate) * row * CrossAttn(norm(x))
and x += tanh(gate) * row * MLP(norm(x)); gates start at 0, so the untrained model is the text LLM.
Token t (a row index) sees image i iff image_pos[i] <= t and, with packed examples (segment), t is of
the example of image i (last_image_only: the last such group); `row` zeroes both branches for a token
that sees no image (unseen_rows="hf": only the MLP's, as HF Mllama; experiments/README.md). A tiled
encoder (mllama_vit) also takes aspect-ratio ids and says which keys (filled tiles) a row may read.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.config import fields
from mm_jax.errors import UserError
from mm_jax.models import checks, encoders, family, stack
from mm_jax.models.cross_blocks import CrossBlock, CrossStack, kv_len
from mm_jax.models.decoder import Cache, Decoder, DecoderBlock, prefill_masks
from mm_jax.models.flop_count import Sizes, Tally, counter
from mm_jax.models.layers import make_attn_mask, row_positions

Array = jax.Array


def run_starts(image_pos_BxI: Array) -> Array:
  """BxI: where the run of consecutive image positions that image i is in starts (positions sorted)."""
  new_BxI = jnp.concatenate([jnp.ones_like(image_pos_BxI[:, :1], bool),
                             image_pos_BxI[:, 1:] != image_pos_BxI[:, :-1] + 1], axis=1)
  return jax.lax.cummax(jnp.where(new_BxI, image_pos_BxI, -1), axis=1)


def visible_images(image_pos_BxI: Array, rows_BxL: Array, last_image_only: bool,
                   segment_BxL: Array | None = None, groups: str = "position") -> Array:
  """BxLxI bool: which images each token sees (see the module docstring). rows: the tokens' row indices
  (not RoPE positions, which restart in a packed row). With segment_BxL image i belongs to the example
  of the first token that sees it, segment[image_pos[i]]; padding (segment 0) sees none; an empty image
  (image_pos = L) is seen by nobody. groups: what "the last group" is, images at one position, or
  ("consecutive", Llama 3.2 Vision's processor) images whose positions are a run of consecutive tokens."""
  seen_BxLxI = image_pos_BxI[:, None, :] <= rows_BxL[:, :, None]
  if segment_BxL is not None:
    at_BxI = jnp.clip(image_pos_BxI, 0, segment_BxL.shape[1] - 1)
    image_seg_Bx1xI = jnp.take_along_axis(segment_BxL, at_BxI, axis=1)[:, None, :]
    seg_BxLx1 = segment_BxL[:, :, None]
    seen_BxLxI = seen_BxLxI & (seg_BxLx1 == image_seg_Bx1xI) & (seg_BxLx1 > 0)
  if last_image_only:  # keep the images of the largest group key seen: the last group
    key_BxI = image_pos_BxI if groups == "position" else run_starts(image_pos_BxI)
    last_BxL = jnp.max(jnp.where(seen_BxLxI, key_BxI[:, None, :], -1), axis=-1)
    seen_BxLxI = seen_BxLxI & (key_BxI[:, None, :] == last_BxL[:, :, None])
  return seen_BxLxI


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
  cross_before: tuple[int, ...] = ()  # cross block k runs before decoder block cross_before[k] (depth:
                                      # after the last); () : before every cross_every-th
  image_groups: str = "position"      # visible_images' groups
  task = "vqa"

  def before(self) -> tuple[int, ...]:
    return self.cross_before or tuple(range(0, self.decoder.depth, self.cross_every))

  def num_image_tokens(self, image_shape) -> int:
    """Tokens of one image in the decoder's sequence: none (BxHxWxC or BxIxHxWxC alike)."""
    del image_shape
    return 0

  def image_features(self, image: Array, aspect_ratio_ids_BxI: Array | None = None):
    """BxHxWxC or BxIxHxWxC (a tiled encoder: also BxIxTxHxWxC, with aspect-ratio ids BxI) ->
    (connector features Bx(I*P)xD, I, the keys a row that sees the image may read BxS or None)."""
    image_BxIx_ = image[:, None] if image.ndim == 4 else image
    b, i = image_BxIx_.shape[:2]
    flat = image_BxIx_.reshape(b * i, *image_BxIx_.shape[2:])
    keys_BxS = None
    if getattr(self.encoder, "tiled", False):  # Mllama's: tiles, an aspect ratio per image
      ids_N = (jnp.full((b * i,), self.encoder.default_id(), jnp.int32) if aspect_ratio_ids_BxI is None
               else aspect_ratio_ids_BxI.reshape(b * i))
      f_NxPxD, keys_BxS = self.encoder(flat, ids_N), self.encoder.key_mask(ids_N).reshape(b, -1)
    else:
      f_NxPxD = self.encoder(flat)
    f_NxPxD = self.connector(f_NxPxD)
    return f_NxPxD.reshape(b, i * f_NxPxD.shape[1], f_NxPxD.shape[2]), i, keys_BxS

  def _cross_mask(self, image_pos_BxI: Array, rows_BxL: Array, s: int,
                  segment_BxL: Array | None = None, keys_BxS: Array | None = None) -> Array:
    """BxLxS over the image tokens (each image's P tokens share its visibility; keys_BxS: and only
    those may be read, e.g. the filled tiles)."""
    seen_BxLxI = visible_images(image_pos_BxI, rows_BxL, self.last_image_only, segment_BxL,
                                self.image_groups)
    mask_BxLxS = jnp.repeat(seen_BxLxI, s // image_pos_BxI.shape[1], axis=2)
    return mask_BxLxS if keys_BxS is None else mask_BxLxS & keys_BxS[:, None, :]

  def _image(self, image: Array, image_pos_BxI: Array | None, aspect_ratio_ids_BxI: Array | None,
             length: int):
    if getattr(self.encoder, "tiled", False) and aspect_ratio_ids_BxI is None and image_pos_BxI is not None:
      # one tile each, aspect ratio (1, 1); an empty slot (at or past the row) is HF's padding image, id 0
      aspect_ratio_ids_BxI = jnp.where(image_pos_BxI >= length, 0, self.encoder.default_id())
    img_BxSxD, i, keys_BxS = self.image_features(image, aspect_ratio_ids_BxI)
    if image_pos_BxI is None:
      image_pos_BxI = jnp.zeros((img_BxSxD.shape[0], i), jnp.int32)
    return self.cross.kv(img_BxSxD.astype(self.decoder.dtype)), image_pos_BxI, keys_BxS

  def _run(self, x_BxLxD, positions_BxL, mask_BxLxS, kvs, xmask_BxLxS, cache=None, cache_index=None):
    """Cross blocks between the decoder blocks (before()) -> logits BxLxV, self-attn cache."""
    if self.decoder.scan:
      return self._run_scanned(x_BxLxD, positions_BxL, mask_BxLxS, kvs, xmask_BxLxS, cache, cache_index)
    x_BxLxD, new_cache, before = x_BxLxD.astype(self.decoder.dtype), [], self.before()
    blocks = list(self.decoder.blocks) + [None]  # None: after the last block (a trailing cross block)
    for i, block in enumerate(blocks):
      for k in [k for k, at in enumerate(before) if at == i]:
        x_BxLxD = self.cross(k, x_BxLxD, kvs[k], xmask_BxLxS)
      if block is not None:
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
               positions_BxT: Array | None = None, aspect_ratio_ids_BxI: Array | None = None) -> Array:
    """Teacher-forced forward -> text logits BxTxV (logit t predicts token t + 1). segment_BxT: the
    example of each token (packing, layers.make_attn_mask); positions_BxT: RoPE positions (default
    0 .. T-1); images are placed by row index whatever the positions. aspect_ratio_ids_BxI: a tiled
    encoder's (mllama_vit), for images BxIxTxHxWxC (default: each image one tile)."""
    kvs, image_pos_BxI, keys_BxS = self._image(image, image_pos_BxI, aspect_ratio_ids_BxI, text_BxT.shape[1])
    rows_BxT = row_positions(text_BxT)
    mask_ar_BxT = mask_ar_BxT if self.prefix_attention else jnp.ones_like(mask_input_BxT)
    xmask_BxTxS = self._cross_mask(image_pos_BxI, rows_BxT, kv_len(kvs), segment_BxT, keys_BxS)
    logits_BxTxV, _ = self._run(self.decoder.embed(text_BxT), row_positions(text_BxT, positions_BxT),
                                make_attn_mask(mask_input_BxT, mask_ar_BxT, segment_BxT), kvs, xmask_BxTxS)
    return logits_BxTxV

  def prefill(self, image: Array, prefix_BxP: Array, prefix_mask_BxP: Array, cache: Cache,
              image_pos_BxI: Array | None = None, aspect_ratio_ids_BxI: Array | None = None):
    """Runs the (right-padded) prefix, filling self-attention slots [0, P) of `cache` (the decoder's
    init_cache); the image k/v of every cross block are computed here, once, and kept in the cache.

    Returns (logits BxPxV, cache {"self", "cross", "image_pos", "keys"}, cache_mask BxS: real slots).
    """
    kvs, image_pos_BxI, keys_BxS = self._image(image, image_pos_BxI, aspect_ratio_ids_BxI,
                                               prefix_BxP.shape[1])
    cache_mask_BxS, mask_BxLxS = prefill_masks(prefix_mask_BxP, cache, causal=not self.prefix_attention)
    positions_BxL = row_positions(prefix_BxP)
    xmask_BxLxS = self._cross_mask(image_pos_BxI, positions_BxL, kv_len(kvs), None, keys_BxS)
    logits_BxLxV, cache = self._run(self.decoder.embed(prefix_BxP), positions_BxL, mask_BxLxS, kvs,
                                    xmask_BxLxS, cache, 0)
    cache = {"self": cache, "cross": kvs, "image_pos": image_pos_BxI, "keys": keys_BxS}
    return logits_BxLxV, cache, cache_mask_BxS

  def decode_step(self, token_B: Array, position_B: Array, cache: dict, cache_mask_BxS: Array, slot):
    """One token per example at text position `position_B` (also its RoPE position), cache slot `slot`."""
    cache_mask_BxS = cache_mask_BxS.at[:, slot].set(True)
    kvs = cache["cross"]
    xmask_Bx1xS = self._cross_mask(cache["image_pos"], position_B[:, None], kv_len(kvs), None,
                                   cache.get("keys"))
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

    before = self.before()

    def cross_block(i: int) -> None:  # the cross blocks that run before decoder block i
      for k in [k for k, at in enumerate(before) if at == i]:
        self.cross.count_block(t, "cross", k, "x", batch, l, s)
    self.decoder.count_flops(t, "decoder", "x", batch, l, l, before_block=cross_block)
    cross_block(self.decoder.depth)  # trailing cross blocks (their order does not change the count)

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
  # Llama 3.2 Vision's form (the import sets it): `layers` are the cross blocks' indices in the whole
  # stack of depth + len(layers) (cross_attention_layers; () uses `every`); unseen_rows "zero" zeroes
  # both branches for a token that sees no image, "hf" attends it to every key and zeroes only the MLP;
  # image_groups "consecutive": images on consecutive tokens are one group (visible_images).
  layers: tuple[int, ...] = ()
  unseen_rows: str = "zero"
  image_groups: str = "position"
  encoder: str = "vit"           # encoders.ENCODERS: "mllama", the tiled one


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
  before = tuple(at - k for k, at in enumerate(sorted(opts.layers)))  # `layers` given: `every` unused
  if before and decoder.scan:
    raise UserError(f"cross blocks at {OPTIONS}.layers run unscanned; set model.decoder.scan=False")
  if decoder.scan and decoder.depth % every:
    raise UserError(f"scanned super-blocks need model.decoder.depth ({decoder.depth}) to be a multiple "
                    f"of {OPTIONS}.every ({every}); change one, or set model.decoder.scan=False")
  field = lambda name: getattr(opts, name) or getattr(decoder, name)
  block = dict(width=decoder.width, num_heads=field("num_heads"), num_kv_heads=field("num_kv_heads"),
               head_dim=field("head_dim"), mlp_dim=field("mlp_dim"), norm=decoder.norm,
               norm_eps=decoder.norm_eps, mlp_act=decoder.mlp_act, unseen_rows=opts.unseen_rows,
               **family.dtypes(model_cfg))
  count = len(before) or -(-decoder.depth // every)
  return CrossAttentionVLM(
      encoder=encoders.ENCODERS[opts.encoder].build(model_cfg), connector=family.build_connector(model_cfg),
      decoder=decoder, cross=CrossStack(count=count, block=block, scan=decoder.scan,
                                        remat=decoder.remat, remat_names=decoder.remat_names),
      cross_every=every, prefix_attention=model_cfg.prefix_attention,
      last_image_only=opts.last_image_only, cross_before=before, image_groups=opts.image_groups)


def check_cross(config) -> None:
  """model.family_options.cross: its sizes, and query heads a multiple of kv heads."""
  for name in ("num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
    fields.integer(config, f"{OPTIONS}.{name}", 0)  # 0: the decoder's
  fields.integer(config, f"{OPTIONS}.every", 1)
  fields.boolean(config, f"{OPTIONS}.last_image_only")
  opts, dec = family.family_options(config.model, "cross", CrossOptions), config.model.decoder
  heads, kv = opts.num_heads or dec.num_heads, opts.num_kv_heads or dec.num_kv_heads
  if heads % kv:
    raise UserError(f"the cross-attention's query heads ({heads}) must be a multiple of its kv heads "
                    f"({kv}); set --config.{OPTIONS}.num_heads / num_kv_heads (0: the decoder's)")
  for name, known in (("unseen_rows", ("zero", "hf")), ("image_groups", ("position", "consecutive")),
                      ("encoder", ("vit", "mllama"))):  # not "patches": the blocks read features
    if getattr(opts, name) not in known:
      raise UserError(f"{OPTIONS}.{name}={getattr(opts, name)!r} is not one of {', '.join(known)}")
  if opts.unseen_rows == "hf" and config.data.get("packing"):  # its fallback: every key of the row
    raise UserError(f"{OPTIONS}.unseen_rows='hf' lets a token that sees no image read every image of its "
                    "row, other packed examples' too; set --config.data.packing=False")
  layers, total = list(opts.layers), dec.depth + len(opts.layers)
  if layers != sorted(set(layers)) or any(not isinstance(j, int) or not 0 <= j < total for j in layers):
    raise UserError(f"{OPTIONS}.layers={tuple(layers)} must be ascending distinct indices in [0, {total}) "
                    "(the whole stack: model.decoder.depth decoder blocks + the cross blocks)")


def _check(config) -> None:
  check_cross(config)  # first: it names an unknown encoder
  encoders.check_image(config, family.family_options(config.model, "cross", CrossOptions).encoder)
  checks.decoder(config)


CROSS = family.Family(cross_attention, _check, options=CrossOptions)

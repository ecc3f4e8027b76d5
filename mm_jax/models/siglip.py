"""The siglip family: two towers (HF SiglipModel, big_vision two_towers) scoring image-text pairs,
logits_per_text = normalize(txt) @ normalize(img).T * exp(scale) + bias.

  image -> encoder (vit.ViT, final LN) -> map_head (attention pooling) -> img_BxE   (E = encoder width)
  text  -> text (embed + positions, pre-LN blocks, final LN, LAST position, head) -> txt_BxE
Parameter subtrees: `encoder` (exactly vit.ViT: it loads into the unified model by init.parts),
`map_head`, `text`, `logit_scale`, `logit_bias`. The HF name of every tensor: experiments/README.md
("Notes moved from module docstrings") and mm_jax/convert/names.py. The logit scale and bias start at
the paper's log(10) and -10 (model.family_options.siglip).
"""
import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from mm_jax.config import fields
from mm_jax.errors import UserError
from mm_jax.models import encoders, family
from mm_jax.models.flop_count import Sizes, Tally, attention, vit_block
from mm_jax.models.layers import ACTIVATIONS, Attention, DType, constrain, dense, layer_norm, partitioned
from mm_jax.models.vit import EncoderBlock

Array = jax.Array


class MAPHead(nn.Module):
  """Multihead attention pooling: one learned query attends over the features (no residual around the
  attention, as HF's SiglipMultiheadAttentionPoolingHead), then o + MLP(LN(o))."""
  num_heads: int
  mlp_dim: int
  norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, x_BxPxD: Array) -> Array:
    b, _, d = x_BxPxD.shape
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    probe_1x1xD = self.param("probe", partitioned(nn.initializers.normal(stddev=d ** -0.5),
                                                  (None, None, "embed")), (1, 1, d), self.param_dtype)
    q_Bx1xD = jnp.broadcast_to(probe_1x1xD.astype(self.dtype), (b, 1, d))
    attn = Attention(self.num_heads, self.num_heads, d // self.num_heads, use_bias=True, name="attn", **kw)
    o_Bx1xD, _ = attn(q_Bx1xD, jnp.ones((b, 1, 1), bool), kv_BxSxD=x_BxPxD)
    y = layer_norm("ln_mlp", self.norm_eps, **kw)(o_Bx1xD)
    y = dense(self.mlp_dim, ("embed", "mlp"), "mlp_in", **kw)(y)
    o_Bx1xD = o_Bx1xD + dense(d, ("mlp", "embed"), "mlp_out", **kw)(ACTIVATIONS["gelu_tanh"](y))
    return o_Bx1xD[:, 0]

  def count_flops(self, t: Tally, pre: str, x: str, b: int, patches: int, d: int) -> None:
    """b x patches features of width d in stream x -> the pooled Bx1xD, in stream x."""
    n = self.num_heads
    t.ew("probe", [], [f"{pre}/probe"])
    attention(t, pre, f"{pre}/attn", "probe", x, x, b, 1, patches, d, n, n, d // n)
    t.ew("h", [x], [f"{pre}/ln_mlp"])
    t.dense(pre, f"{pre}/mlp_in", "h", "m", b, d, self.mlp_dim)
    t.dense(pre, f"{pre}/mlp_out", "m", "m", b, self.mlp_dim, d)
    t.ew(x, [x, "m"])


class TextEncoder(nn.Module):
  """Tokens BxT (T <= max_len) -> BxE: bidirectional, no padding mask (HF / big_vision), the LAST
  position pooled (padding or not), then a dense head to the image embedding width."""
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  mlp_dim: int
  max_len: int
  out_dim: int
  norm_eps: float = 1e-6
  dtype: DType = jnp.float32
  param_dtype: DType = jnp.float32

  @nn.compact
  def __call__(self, text_BxT: Array) -> Array:
    d, t = self.width, text_BxT.shape[1]
    if t > self.max_len:
      raise ValueError(f"text length {t} exceeds the text tower's max_len {self.max_len}")
    if d % self.num_heads:
      raise ValueError(f"text width={d} must be a multiple of num_heads={self.num_heads}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x_BxTxD = nn.Embed(self.vocab_size, d, name="embedder", **kw, embedding_init=partitioned(
        nn.initializers.normal(stddev=d ** -0.5), ("vocab", "embed")))(text_BxT)
    pos_init = partitioned(nn.initializers.normal(stddev=d ** -0.5), ("text_len", "embed"))
    pos_LxD = self.param("pos_embedding", pos_init, (self.max_len, d), self.param_dtype)
    x_BxTxD = x_BxTxD + pos_LxD[None, :t].astype(self.dtype)
    x_BxTxD = constrain(x_BxTxD, ("act_batch", "act_len", "act_embed"))
    for i in range(self.depth):
      block = EncoderBlock(self.num_heads, self.mlp_dim, self.norm_eps, name=f"block_{i}", **kw)
      x_BxTxD = block(x_BxTxD, None)
    pooled_BxD = layer_norm("ln_final", self.norm_eps, **kw)(x_BxTxD)[:, -1]
    # "embed_out": the image embedding width (a param may not carry one logical name twice).
    return dense(self.out_dim, ("embed", "embed_out"), "head", **kw)(pooled_BxD)

  def count_flops(self, t: Tally, pre: str, x: str, b: int, l: int) -> None:
    """b texts of l tokens -> their embeddings BxE, in stream x."""
    t.ew(x, [], [f"{pre}/embedder", f"{pre}/pos_embedding"])
    for i in range(self.depth):
      vit_block(t, pre, f"{pre}/block_{i}", x, b, l, self.width, self.num_heads, self.mlp_dim)
    t.ew(x, [x], [f"{pre}/ln_final"])
    t.dense(pre, f"{pre}/head", x, x, b, self.width, self.out_dim)


def l2_normalize(x_BxE: Array) -> Array:
  x32 = x_BxE.astype(jnp.float32)
  return x32 * jax.lax.rsqrt(jnp.maximum(jnp.sum(x32 * x32, axis=-1, keepdims=True), 1e-12))


class SigLIP(nn.Module):
  """__call__(image, text) -> logits_per_text TxI (float32): row i text, column j image."""
  encoder: nn.Module   # vit.ViT with final_norm=True
  map_head: nn.Module  # MAPHead
  text: nn.Module      # TextEncoder
  logit_scale_init: float = math.log(10.0)
  logit_bias_init: float = -10.0
  task = "contrastive"

  def setup(self):
    const = lambda v: partitioned(nn.initializers.constant(v), ())
    self.logit_scale = self.param("logit_scale", const(self.logit_scale_init), (), jnp.float32)
    self.logit_bias = self.param("logit_bias", const(self.logit_bias_init), (), jnp.float32)

  def embed_image(self, image_BxHxWxC: Array) -> Array:
    """L2-normalised image embeddings BxE, float32."""
    return l2_normalize(self.map_head(self.encoder(image_BxHxWxC)))

  def embed_text(self, text_BxT: Array) -> Array:
    """L2-normalised text embeddings BxE, float32."""
    return l2_normalize(self.text(text_BxT))

  def logits(self, txt_BxE: Array, img_BxE: Array) -> Array:
    return txt_BxE @ img_BxE.T * jnp.exp(self.logit_scale) + self.logit_bias

  def __call__(self, image_BxHxWxC: Array, text_BxT: Array) -> Array:
    return self.logits(self.embed_text(text_BxT), self.embed_image(image_BxHxWxC))

  def count_flops(self, t: Tally, sizes: Sizes, batch: int) -> None:
    """Matmul FLOPs of the forward on `batch` image-text pairs (models/flop_count.py)."""
    patches, e = self.encoder.count_flops(t, "encoder", batch, sizes.image_size, "img")
    self.map_head.count_flops(t, "map_head", "img", batch, patches, e)
    self.text.count_flops(t, "text", "txt", batch, sizes.text_len)
    t.product("logits", "txt", "img", "logits", 2.0 * batch * batch * self.text.out_dim)


# --- the siglip family ---

@dataclasses.dataclass(frozen=True)
class SigLIPOptions:
  """model.family_options.siglip: the logit scale (log) and bias at init."""
  logit_scale_init: float = math.log(10.0)
  logit_bias_init: float = -10.0


def siglip(model_cfg, tokenizer_vocab: int) -> SigLIP:
  """Two towers: model.encoder (ViT) + a MAP head of the encoder's heads / mlp_dim, model.text
  (TextEncoder; vocab_size 0: the tokenizer's), projected to the encoder's width."""
  encoder = encoders.ENCODERS["vit"].build(model_cfg)
  kw = family.dtypes(model_cfg)
  fields_ = dict(model_cfg.text)
  vocab = family.vocab_size("text", fields_.pop("vocab_size", 0), tokenizer_vocab)
  text = family.make(TextEncoder, fields_, "text", vocab_size=vocab, out_dim=encoder.width, **kw)
  head = MAPHead(encoder.num_heads, encoder.mlp_dim, encoder.norm_eps, **kw)
  opts = family.family_options(model_cfg, "siglip", SigLIPOptions)
  return SigLIP(encoder=encoder, map_head=head, text=text, **dataclasses.asdict(opts))


def _check(config) -> None:
  encoders.check_image(config, "vit")
  for field in ("width", "depth", "num_heads", "mlp_dim", "max_len"):
    fields.integer(config, f"model.text.{field}", 1)
  fields.integer(config, "model.text.vocab_size", 0)
  fields.heads("text", fields.get(config, "model.text.width"), fields.get(config, "model.text.num_heads"))
  max_len, text_len = fields.get(config, "model.text.max_len"), config.data.text_len
  if max_len is not fields.ABSENT and max_len < text_len:  # the text tower's position table
    raise UserError(f"data.text_len={text_len} exceeds model.text.max_len={max_len}, the text tower's "
                    "positions; set --config.data.text_len to at most that (or model.text.max_len)")


SIGLIP = family.Family(siglip, _check, options=SigLIPOptions)

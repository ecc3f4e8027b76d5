"""Hugging Face tensor names -> mm_jax param paths, and how each tensor becomes its param.

File names are first made canonical: every layout HF writes or reads (the transformers-5 on-disk one,
the in-memory one, the hub's) maps to one prefix per part:
  text.*       model.* (CausalLM), language_model.model.*, model.language_model.*
  lm_head.*    lm_head.*, language_model.lm_head.*
  vision.*     vision_tower.*, vision_tower.vision_model.*, model.vision_tower[.vision_model].*;
               Mllama: [model.]vision_model.*;
               SigLIP: vision_model.*, or no prefix (SiglipVisionModel)
  text.*       SiglipModel: text_model.* (logit_scale, logit_bias as they are)
  projector.*  multi_modal_projector.*, model.multi_modal_projector.*
Then one Entry per param: HF `nn.Linear` weights are (out, in) and become our kernels (in..., out...);
conv weights (D, C, p, p) become (p, p, C, D); norms, embeddings and biases are copied (reshaped).
Gemma's RMSNorm weight is the offset w of x * (1 + w), as our "gemma" scale; Llama's is the scale.
"""
import dataclasses
import math
import re

import numpy as np

_ALIASES = {
    "lm": {"model.": "text.", "lm_head.": "lm_head."},
    "vlm": {"language_model.model.": "text.", "model.language_model.": "text.",
            "language_model.lm_head.": "lm_head.", "lm_head.": "lm_head.",
            "vision_tower.vision_model.": "vision.", "vision_tower.": "vision.",
            "model.vision_tower.vision_model.": "vision.", "model.vision_tower.": "vision.",
            "multi_modal_projector.": "projector.", "model.multi_modal_projector.": "projector.",
            "vision_model.": "vision.", "model.vision_model.": "vision.",  # Mllama's tower
            "model.image_newline": "image_newline", "image_newline": "image_newline"},  # LLaVA-NeXT
    "vision": {"vision_model.": "vision.", "": "vision."},
    "qwen2_vl": {"model.language_model.": "text.", "model.": "text.", "lm_head.": "lm_head.",
                 "model.visual.": "vision.", "visual.": "vision."},
    "siglip": {"vision_model.": "vision.", "text_model.": "text.", "logit_scale": "logit_scale",
               "logit_bias": "logit_bias"},
}


@dataclasses.dataclass(frozen=True)
class Entry:
  """HF tensor `hf` (canonical name) -> our param `ours` ('decoder/block_0/attn/q/kernel').

  kind: "copy" (same shape), "flat" (HF holds our shape flattened: q/k/v biases), "linear" (HF (out,
  in); the first n_in dims of our kernel are the input), "conv", "out_first" (HF (out, *in), ours
  (*in, out): Qwen2-VL's Conv3d patch embedding). part=(i, n): the i-th of n equal row blocks of the
  HF tensor (packed q/k/v: the MAP head's, Qwen2-VL's tower's).
  """
  hf: str
  ours: str
  kind: str = "copy"
  n_in: int = 1
  part: tuple[int, int] = (0, 1)

  def hf_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The HF tensor's shape for our param of `shape`."""
    n = self.part[1]
    if self.kind == "copy":
      return shape
    if self.kind == "flat":
      return (n * math.prod(shape),)
    if self.kind == "linear":
      return (n * math.prod(shape[self.n_in:]), math.prod(shape[:self.n_in]))
    if self.kind == "out_first":
      return (shape[-1], *shape[:-1])
    p, p2, c, d = shape
    return (d, c, p, p2)

  def transform(self, x: np.ndarray, shape: tuple[int, ...]) -> np.ndarray:
    """Our param of `shape` from the HF tensor `x` (already cut to this entry's part); numpy, whose
    freed temporaries go back to the OS (jax's eager ops kept ~15% of the model more resident)."""
    if self.kind == "linear":
      return np.ascontiguousarray(x.reshape(x.shape[0], -1).T).reshape(shape)
    if self.kind == "conv":
      return np.ascontiguousarray(x.transpose(2, 3, 1, 0))
    if self.kind == "out_first":
      return np.ascontiguousarray(np.moveaxis(x, 0, -1))
    return x.reshape(shape)


def canonical(name: str, layout: str) -> str | None:
  """The canonical name of file tensor `name`, or None if no prefix of the layout matches."""
  for prefix in sorted(_ALIASES[layout], key=len, reverse=True):
    if name.startswith(prefix):
      return _ALIASES[layout][prefix] + name[len(prefix):]
  return None


def decoder(depth: int, tied: bool) -> list[Entry]:
  out = [Entry("text.embed_tokens.weight", "decoder/embedder/embedding")]
  for i in range(depth):
    t, o = f"text.layers.{i}.", f"decoder/block_{i}/"
    out += [Entry(t + "input_layernorm.weight", o + "norm_attn/scale"),
            Entry(t + "post_attention_layernorm.weight", o + "norm_mlp/scale"),
            Entry(t + "self_attn.o_proj.weight", o + "attn/o/kernel", "linear", n_in=2)]
    out += [Entry(t + f"self_attn.{x}_proj.weight", o + f"attn/{x}/kernel", "linear") for x in "qkv"]
    out += [Entry(t + f"mlp.{x}_proj.weight", o + f"{x}/kernel", "linear")
            for x in ("gate", "up", "down")]
  out.append(Entry("text.norm.weight", "decoder/final_norm/scale"))
  if not tied:
    out.append(Entry("lm_head.weight", "decoder/head/kernel", "linear"))
  return out


def _layer_norm(hf: str, ours: str) -> list[Entry]:
  return [Entry(hf + ".weight", ours + "/scale"), Entry(hf + ".bias", ours + "/bias")]


def _dense(hf: str, ours: str, kind_bias: str = "copy", n_in: int = 1) -> list[Entry]:
  return [Entry(hf + ".weight", ours + "/kernel", "linear", n_in),
          Entry(hf + ".bias", ours + "/bias", kind_bias)]


def encoder(depth: int, final_norm: bool, root: str = "encoder", hf: str = "vision.") -> list[Entry]:
  """The SigLIP vision tower (vit.ViT): its first `depth` layers, and the post-LN if `final_norm`."""
  out = [Entry(hf + "embeddings.patch_embedding.weight", f"{root}/patch_embed/kernel", "conv"),
         Entry(hf + "embeddings.patch_embedding.bias", f"{root}/patch_embed/bias"),
         Entry(hf + "embeddings.position_embedding.weight", f"{root}/pos_embedding")]
  for i in range(depth):
    t, o = f"{hf}encoder.layers.{i}.", f"{root}/block_{i}/"
    out += _layer_norm(t + "layer_norm1", o + "ln_attn") + _layer_norm(t + "layer_norm2", o + "ln_mlp")
    for x in "qkv":
      out += _dense(t + f"self_attn.{x}_proj", o + f"attn/{x}", "flat")
    out += _dense(t + "self_attn.out_proj", o + "attn/o", n_in=2)
    out += _dense(t + "mlp.fc1", o + "mlp_in") + _dense(t + "mlp.fc2", o + "mlp_out")
  if final_norm:
    out += _layer_norm(hf + "post_layernorm", f"{root}/ln_final")
  return out


def mllama_encoder(depth: int, global_depth: int, root: str = "encoder", hf: str = "vision.") -> list[Entry]:
  """Llama 3.2 Vision's tiled tower (mllama_vit.MllamaViT): its tables as they are, gates (1,) -> ()."""
  out = [Entry(hf + "patch_embedding.weight", f"{root}/patch_embed/kernel", "conv"),
         Entry(hf + "class_embedding", f"{root}/class_embedding"),
         Entry(hf + "gated_positional_embedding.embedding", f"{root}/pos_embedding"),
         Entry(hf + "gated_positional_embedding.gate", f"{root}/pos_gate", "flat"),
         Entry(hf + "gated_positional_embedding.tile_embedding.weight", f"{root}/tile_pos_embedding")]
  for x in ("pre", "post"):
    out += [Entry(hf + f"{x}_tile_positional_embedding.embedding.weight", f"{root}/{x}_tile_embedding"),
            Entry(hf + f"{x}_tile_positional_embedding.gate", f"{root}/{x}_tile_gate", "flat")]
    out += _layer_norm(hf + f"layernorm_{x}", f"{root}/ln_{x}")
  layers = [(f"{hf}transformer.layers.{i}.", f"{root}/block_{i}/") for i in range(depth)]
  layers += [(f"{hf}global_transformer.layers.{i}.", f"{root}/global_{i}/") for i in range(global_depth)]
  for t, o in layers:
    out += _layer_norm(t + "input_layernorm", o + "ln_attn") + _layer_norm(t + "post_attention_layernorm",
                                                                           o + "ln_mlp")
    out += [Entry(t + f"self_attn.{x}_proj.weight", o + f"attn/{x}/kernel", "linear") for x in "qkv"]
    out += [Entry(t + "self_attn.o_proj.weight", o + "attn/o/kernel", "linear", n_in=2)]
    out += _dense(t + "mlp.fc1", o + "mlp_in") + _dense(t + "mlp.fc2", o + "mlp_out")
    if "global" in o:
      out += [Entry(t + "gate_attn", o + "gate_attn", "flat"), Entry(t + "gate_ffn", o + "gate_mlp", "flat")]
  return out


def mllama_decoder(cross_layers: tuple[int, ...], total: int) -> list[Entry]:
  """Llama 3.2 Vision's text model: HF layer j is cross block k (the k-th of cross_layers) or decoder
  block j - (cross layers before j); untied head."""
  out, blocks = [], 0
  for j in range(total):
    t = f"text.layers.{j}."
    if j not in cross_layers:
      out += [Entry(e.hf.replace("text.layers.0.", t), e.ours.replace("block_0/", f"block_{blocks}/"), e.kind,
                    e.n_in) for e in decoder(1, True) if ".layers.0." in e.hf]
      blocks += 1
      continue
    o = f"cross/block_{cross_layers.index(j)}/"
    out += [Entry(t + "input_layernorm.weight", o + "norm_attn/scale"),
            Entry(t + "post_attention_layernorm.weight", o + "norm_mlp/scale"),
            Entry(t + "cross_attn.o_proj.weight", o + "o/kernel", "linear", n_in=2),
            Entry(t + "cross_attn.q_norm.weight", o + "q_norm/scale"),
            Entry(t + "cross_attn.k_norm.weight", o + "k_norm/scale"),
            Entry(t + "cross_attn_attn_gate", o + "attn_gate", "flat"),
            Entry(t + "cross_attn_mlp_gate", o + "mlp_gate", "flat")]
    out += [Entry(t + f"cross_attn.{x}_proj.weight", o + f"{x}/kernel", "linear") for x in "qkv"]
    out += [Entry(t + f"mlp.{x}_proj.weight", o + f"{x}/kernel", "linear") for x in ("gate", "up", "down")]
  return [Entry("text.embed_tokens.weight", "decoder/embedder/embedding"), *out,
          Entry("text.norm.weight", "decoder/final_norm/scale"),
          Entry("lm_head.weight", "decoder/head/kernel", "linear")]


def qwen2_vl(depth: int, vision_depth: int, tied: bool) -> list[Entry]:
  """Qwen2-VL: the native tower (native_vit; q/k/v packed as row thirds of attn.qkv), the merger
  (connectors.Merger) and the Qwen2 decoder (q/k/v biases)."""
  out = [Entry("vision.patch_embed.proj.weight", "encoder/patch_embed/kernel", "out_first")]
  for i in range(vision_depth):
    t, o = f"vision.blocks.{i}.", f"encoder/block_{i}/"
    out += _layer_norm(t + "norm1", o + "ln_attn") + _layer_norm(t + "norm2", o + "ln_mlp")
    for j, x in enumerate("qkv"):
      out += [Entry(t + "attn.qkv.weight", o + f"attn/{x}/kernel", "linear", part=(j, 3)),
              Entry(t + "attn.qkv.bias", o + f"attn/{x}/bias", "flat", part=(j, 3))]
    out += _dense(t + "attn.proj", o + "attn/o", n_in=2)
    out += _dense(t + "mlp.fc1", o + "mlp_in") + _dense(t + "mlp.fc2", o + "mlp_out")
  out += _layer_norm("vision.merger.ln_q", "connector/ln_q")
  out += _dense("vision.merger.mlp.0", "connector/fc1") + _dense("vision.merger.mlp.2", "connector/fc2")
  biases = [Entry(f"text.layers.{i}.self_attn.{x}_proj.bias", f"decoder/block_{i}/attn/{x}/bias", "flat")
            for i in range(depth) for x in "qkv"]
  return out + decoder(depth, tied) + biases


def map_head(hf: str = "vision.head.") -> list[Entry]:
  """SigLIP's attention-pooling head (siglip.MAPHead); torch MHA packs q, k, v as row thirds."""
  out = [Entry(hf + "probe", "map_head/probe")]
  for i, x in enumerate("qkv"):
    out += [Entry(hf + "attention.in_proj_weight", f"map_head/attn/{x}/kernel", "linear", part=(i, 3)),
            Entry(hf + "attention.in_proj_bias", f"map_head/attn/{x}/bias", "flat", part=(i, 3))]
  out += _dense(hf + "attention.out_proj", "map_head/attn/o", n_in=2)
  out += _layer_norm(hf + "layernorm", "map_head/ln_mlp")
  return out + _dense(hf + "mlp.fc1", "map_head/mlp_in") + _dense(hf + "mlp.fc2", "map_head/mlp_out")


def siglip_text(depth: int) -> list[Entry]:
  """SigLIP's text tower (siglip.TextEncoder): blocks as the vision tower's."""
  blocks = [e for e in encoder(depth, False, root="text", hf="text.") if ".layers." in e.hf]
  return [Entry("text.embeddings.token_embedding.weight", "text/embedder/embedding"),
          Entry("text.embeddings.position_embedding.weight", "text/pos_embedding"),
          *blocks, *_layer_norm("text.final_layer_norm", "text/ln_final"),
          *_dense("text.head", "text/head")]


def connector(kind: str) -> list[Entry]:
  if kind == "linear":  # PaliGemma
    return _dense("projector.linear", "connector/proj")
  return _dense("projector.linear_1", "connector/fc1") + _dense("projector.linear_2", "connector/fc2")


def mapping(arch: str, hf: dict, model_cfg) -> tuple[str, list[Entry], re.Pattern | None]:
  """(layout, entries, skipped): `skipped` matches the canonical names of file tensors that are
  knowingly not converted (HF does not use them either, or they duplicate a converted one)."""
  enc, dec = model_cfg.get("encoder"), model_cfg.get("decoder")
  vision = hf.get("vision_config", hf)
  if arch == "SiglipModel":
    text = siglip_text(model_cfg.text.depth) + [Entry("logit_scale", "logit_scale", "flat"),
                                                Entry("logit_bias", "logit_bias", "flat")]
    return "siglip", encoder(enc.depth, True) + map_head() + text, None
  if arch == "SiglipVisionModel":
    head = map_head() if vision.get("vision_use_head", True) else []
    return "vision", encoder(enc.depth, True) + head, None
  if arch == "MllamaForConditionalGeneration":
    cross = tuple(model_cfg.family_options.cross.layers)
    entries = mllama_encoder(enc.depth, enc.global_depth) + _dense("projector", "connector/proj")
    return "vlm", entries + mllama_decoder(cross, dec.depth + len(cross)), None
  if arch == "Qwen2VLForConditionalGeneration":
    skip = r"lm_head\.weight" if dec.tie_embeddings else None
    return "qwen2_vl", qwen2_vl(dec.depth, enc.depth, dec.tie_embeddings), skip and re.compile(skip)
  skip = [r"text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq"]  # a buffer in old checkpoints
  if dec.tie_embeddings:
    skip.append(r"lm_head\.weight")  # some files keep a copy of the tied embedding
  if arch in ("GemmaForCausalLM", "LlamaForCausalLM"):
    return "lm", decoder(dec.depth, dec.tie_embeddings), re.compile("|".join(skip))
  layers = vision.get("num_hidden_layers", enc.depth)
  skip.append(r"vision\.head\..*")  # a MAP head the VLMs do not use (vision_use_head)
  if enc.depth < layers:  # LLaVA: the layers after vision_feature_layer, and the post-LN
    skip.append(r"vision\.encoder\.layers\.(%s)\..*" % "|".join(map(str, range(enc.depth, layers))))
  if not enc.final_norm:
    skip.append(r"vision\.post_layernorm\..*")
  entries = encoder(enc.depth, enc.final_norm) + connector(model_cfg.connector)
  if arch == "LlavaNextForConditionalGeneration":
    entries.append(Entry("image_newline", "image_newline"))
  return "vlm", entries + decoder(dec.depth, dec.tie_embeddings), re.compile("|".join(skip))

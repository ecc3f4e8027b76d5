"""A Hugging Face config.json -> an mm_jax config (configs/shapes_tiny.py's schema, model.* from HF).

  GemmaForCausalLM, LlamaForCausalLM   family "lm": the decoder alone
  PaliGemmaForConditionalGeneration    "unified": SigLIP encoder with its post-LN, linear connector,
                                       Gemma decoder; image first, prefix-LM attention
  LlavaForConditionalGeneration        "unified": SigLIP encoder cut at vision_feature_layer (no
                                       post-LN), MLP connector, Llama decoder; image after BOS, causal
  SiglipModel                          "siglip" (configs/siglip_shapes.py's schema): encoder, MAP head,
                                       text tower, logit scale and bias
  SiglipVisionModel                    "unified" whose init.parts reads only encoder/ (see __init__)
  LlavaNextForConditionalGeneration    "anyres": LLaVA's parts, a base view plus pinpoint tiles, unpadded,
                                       a learned newline per row
  MllamaForConditionalGeneration       "cross" (Llama 3.2 Vision): the tiled tower (mllama_vit), linear
                                       connector, Llama decoder with cross blocks at its
                                       cross_attention_layers; data.image_size is one tile
  Qwen2VLForConditionalGeneration      "native": the native-resolution tower (2D RoPE, packed images),
                                       merger connector, Qwen2 decoder (q/k/v biases, M-RoPE sections)

A field absent from config.json takes the default of its HF config class, as from_pretrained does.
A value our modules do not compute the same way is a UserError naming the field; shapes are checked
later against the weights' headers.
"""

import ml_collections as mlc

from mm_jax.config import files as config_files
from mm_jax.errors import UserError

_GEMMA = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576, num_hidden_layers=28,
              num_attention_heads=16, num_key_value_heads=16, head_dim=256,
              hidden_act="gelu_pytorch_tanh", rms_norm_eps=1e-6, tie_word_embeddings=True,
              attention_bias=False, use_bidirectional_attention=None, max_position_embeddings=8192)
_LLAMA = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
              num_attention_heads=32, num_key_value_heads=None, head_dim=None, hidden_act="silu",
              rms_norm_eps=1e-6, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
              max_position_embeddings=2048)
_SIGLIP_VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, num_channels=3, image_size=224, patch_size=16,
                      hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6, vision_use_head=True)
_SIGLIP_TEXT = dict(vocab_size=32000, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                    num_attention_heads=12, max_position_embeddings=64, hidden_act="gelu_pytorch_tanh",
                    layer_norm_eps=1e-6, projection_size=None)
_MLLAMA_VISION = dict(hidden_size=1280, hidden_act="gelu", num_hidden_layers=32, num_global_layers=8,
                      attention_heads=16, num_channels=3, intermediate_size=5120, vision_output_dim=7680,
                      image_size=448, patch_size=14, norm_eps=1e-5, max_num_tiles=4,
                      intermediate_layers_indices=[3, 7, 15, 23, 30],
                      supported_aspect_ratios=[[1, 1], [1, 2], [1, 3], [1, 4], [2, 1], [2, 2], [3, 1],
                                               [4, 1]])
_MLLAMA_TEXT = dict(vocab_size=128256, hidden_size=4096, hidden_act="silu", num_hidden_layers=40,
                    num_attention_heads=32, num_key_value_heads=8, intermediate_size=14336,
                    rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=False,
                    cross_attention_layers=[3, 8, 13, 18, 23, 28, 33, 38], attention_bias=False,
                    mlp_bias=False, rope_theta=500000.0)  # MllamaTextConfig.default_theta
_QWEN2_VL_VISION = dict(depth=32, embed_dim=1280, hidden_size=3584, hidden_act="quick_gelu", mlp_ratio=4,
                        num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2,
                        temporal_patch_size=2)
_QWEN2_VL_TEXT = dict(vocab_size=152064, hidden_size=8192, intermediate_size=29568, num_hidden_layers=80,
                      num_attention_heads=64, num_key_value_heads=8, hidden_act="silu", rms_norm_eps=1e-5,
                      max_position_embeddings=32768, use_sliding_window=False, tie_word_embeddings=False,
                      attention_bias=False, mlp_bias=False, head_dim=None,
                      rope_theta=1000000.0)  # Qwen2VLTextConfig.default_theta
TEXT_DEFAULTS = {"gemma": _GEMMA, "llama": _LLAMA}
_VISION = {"siglip_vision_model": _SIGLIP_VISION}


def base_config(name: str) -> mlc.ConfigDict:
  """configs/<name>.py's get_config(): the schema and the training defaults an import starts from."""
  return config_files.get_config(name)


class Fields:
  """One (sub)config of config.json: `f["key"]` is its value or the HF default; `where` names it."""

  def __init__(self, raw: dict, defaults: dict, where: str = ""):
    self.raw, self.defaults, self.where = raw, defaults, where

  def __getitem__(self, key):
    return self.raw[key] if self.raw.get(key) is not None else self.defaults.get(key)

  def sub(self, key: str, defaults_by_type: dict, default_type: str) -> "Fields":
    """The sub-config `key`, of its model_type (`default_type` if absent, as HF's class default)."""
    raw = self.raw.get(key)
    if not isinstance(raw, dict):
      raise UserError(f"config.json has no {self.where}{key}; it is needed to build the model")
    raw = dict(raw, model_type=raw.get("model_type") or default_type)
    kind = raw["model_type"]
    if kind not in defaults_by_type:
      self.unsupported(f"{key}.model_type", kind, ", ".join(sorted(defaults_by_type)))
    return Fields(raw, defaults_by_type[kind], f"{self.where}{key}.")

  def unsupported(self, key: str, value, supported: str):
    raise UserError(f"config.json: {self.where}{key}={value!r} is not supported by mm_jax.convert "
                    f"(supported: {supported})")

  def require(self, key: str, allowed: tuple):
    if self[key] not in allowed:
      self.unsupported(key, self[key], " or ".join(repr(a) for a in allowed))
    return self[key]


def _rope(t: Fields) -> dict:
  """decoder.rope_* from rope_parameters (transformers 5) or rope_theta + rope_scaling (older)."""
  params = t.raw.get("rope_parameters") or t.raw.get("rope_scaling") or {}
  kind = params.get("rope_type", params.get("type", "default"))
  if params.get("partial_rotary_factor", 1.0) != 1.0:
    t.unsupported("rope_parameters.partial_rotary_factor", params["partial_rotary_factor"], "1.0")
  out = dict(rope_theta=float(params.get("rope_theta", t["rope_theta"] or 10_000.0)))
  if kind == "default":
    return dict(out, rope_type="default")
  if kind != "llama3":
    t.unsupported("rope_parameters.rope_type", kind, "'default', 'llama3'")
  return dict(out, rope_type="llama3", rope_factor=float(params["factor"]),
              rope_low_freq_factor=float(params["low_freq_factor"]),
              rope_high_freq_factor=float(params["high_freq_factor"]),
              rope_original_max_len=int(params.get("original_max_position_embeddings",
                                                   t["max_position_embeddings"])))


def decoder(t: Fields, tied: bool) -> dict:
  """model.decoder from a Gemma or Llama text config."""
  kind = t["model_type"]
  if kind == "gemma":
    # "gelu" in Gemma configs means the tanh approximation (HF rewrites it so; transformers 5 reads
    # hidden_act only, an old hidden_activation field is ignored there too).
    t.require("hidden_act", ("gelu", "gelu_pytorch_tanh"))
    act = "gelu_tanh"
  else:
    act = {"silu": "silu"}[t.require("hidden_act", ("silu",))]
    t.require("mlp_bias", (False,))
  t.require("attention_bias", (False,))
  heads = t["num_attention_heads"]
  return dict(vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
              num_heads=heads, num_kv_heads=t["num_key_value_heads"] or heads,
              head_dim=t["head_dim"] or t["hidden_size"] // heads, mlp_dim=t["intermediate_size"],
              norm=kind, norm_eps=float(t["rms_norm_eps"]), mlp_act=act,
              embed_scale=kind == "gemma", tie_embeddings=bool(tied), **_rope(t))


def encoder(v: Fields, depth: int, final_norm: bool) -> dict:
  """model.encoder from a SigLIP vision config (`depth` of its layers, with or without the post-LN)."""
  v.require("hidden_act", ("gelu_pytorch_tanh",))
  v.require("num_channels", (3,))
  image, patch = v["image_size"], v["patch_size"]
  if not isinstance(image, int) or not isinstance(patch, int) or image % patch:
    v.unsupported("image_size", image, f"a square size (one int) divisible by patch_size={patch}")
  return dict(patch_size=patch, width=v["hidden_size"], depth=depth,
              num_heads=v["num_attention_heads"], mlp_dim=v["intermediate_size"],
              norm_eps=float(v["layer_norm_eps"]), final_norm=final_norm)


def siglip_text(t: Fields, image_width: int) -> dict:
  """model.text (siglip.TextEncoder) from a SigLIP text config."""
  t.require("hidden_act", ("gelu_pytorch_tanh",))
  if (t["projection_size"] or t["hidden_size"]) != image_width:
    t.unsupported("projection_size", t["projection_size"], f"{image_width}, the vision hidden_size")
  return dict(vocab_size=t["vocab_size"], width=t["hidden_size"], depth=t["num_hidden_layers"],
              num_heads=t["num_attention_heads"], mlp_dim=t["intermediate_size"],
              max_len=t["max_position_embeddings"], norm_eps=float(t["layer_norm_eps"]))


def mllama(top: Fields, c: mlc.ConfigDict) -> Fields:
  """model.* of Llama 3.2 Vision (config.json's MllamaConfig); returns its vision config."""
  v = top.sub("vision_config", {"mllama_vision_model": _MLLAMA_VISION}, "mllama_vision_model")
  t = top.sub("text_config", {"mllama_text_model": _MLLAMA_TEXT}, "mllama_text_model")
  v.require("hidden_act", ("gelu",))
  v.require("num_channels", (3,))
  image, patch, width = v["image_size"], v["patch_size"], v["hidden_size"]
  if not isinstance(image, int) or not isinstance(patch, int) or image % patch:
    v.unsupported("image_size", image, f"a square size (one int) divisible by patch_size={patch}")
  inter = tuple(int(i) for i in v["intermediate_layers_indices"])
  if v["vision_output_dim"] != width * (1 + len(inter)):
    v.unsupported("vision_output_dim", v["vision_output_dim"], f"{width * (1 + len(inter))}, hidden_size "
                  "x (1 + intermediate layers)")
  c.encoder = mlc.ConfigDict(dict(
      patch_size=patch, width=width, depth=v["num_hidden_layers"], global_depth=v["num_global_layers"],
      num_heads=v["attention_heads"], mlp_dim=v["intermediate_size"], image_size=image,
      max_num_tiles=v["max_num_tiles"], aspect_ratios=tuple(map(tuple, v["supported_aspect_ratios"])),
      intermediate_layers=inter, norm_eps=float(v["norm_eps"])))
  layers, total = tuple(int(j) for j in t["cross_attention_layers"]), t["num_hidden_layers"]
  if any(not 0 <= j < total for j in layers):
    t.unsupported("cross_attention_layers", list(layers), f"indices below num_hidden_layers={total}")
  dec = decoder(Fields(dict(t.raw, model_type="llama"), t.defaults, t.where), tied=t["tie_word_embeddings"])
  if dec["tie_embeddings"]:
    t.unsupported("tie_word_embeddings", True, "false")
  c.decoder.update(dec, depth=total - len(layers), embed_rows=t["vocab_size"] + 8)  # + <|image|> and 7
  c.family, c.connector, c.prefix_attention = "cross", "linear", False
  c.family_options.cross.update(dict(layers=layers, unseen_rows="hf", image_groups="consecutive",
                                     encoder="mllama", every=1))
  return v


def qwen2_vl(top: Fields, c: mlc.ConfigDict) -> None:
  """model.* of Qwen2-VL (config.json's Qwen2VLConfig; a hub file with the text fields at the top
  level and rope_scaling {"type": "mrope"} reads the same)."""
  v = top.sub("vision_config", {"qwen2_vl_vision": _QWEN2_VL_VISION, "qwen2_vl": _QWEN2_VL_VISION},
              "qwen2_vl_vision")
  raw_text = top.raw.get("text_config") if isinstance(top.raw.get("text_config"), dict) else top.raw
  t = Fields(raw_text, _QWEN2_VL_TEXT, "text_config." if raw_text is not top.raw else "")
  v.require("hidden_act", ("quick_gelu",))
  v.require("in_channels", (3,))
  if t["use_sliding_window"]:
    t.unsupported("use_sliding_window", True, "false")
  rope = dict(t.raw.get("rope_parameters") or t.raw.get("rope_scaling") or {})
  sections = tuple(int(x) for x in rope.pop("mrope_section", (16, 24, 24)))
  if rope.get("rope_type", rope.get("type", "default")) in ("mrope", "default"):
    rope["rope_type"] = "default"
  dec = decoder(Fields(dict(t.raw, model_type="llama", attention_bias=False, rope_parameters=rope,
                            rope_scaling=None), t.defaults, t.where),
                tied=top.raw.get("tie_word_embeddings") or t["tie_word_embeddings"])
  if sum(sections) != dec["head_dim"] // 2:
    t.unsupported("rope_parameters.mrope_section", list(sections), f"sections summing to head_dim / 2 = "
                  f"{dec['head_dim'] // 2}")
  width, merge = v["embed_dim"], v["spatial_merge_size"]
  if v["hidden_size"] != dec["width"]:
    v.unsupported("hidden_size", v["hidden_size"], f"{dec['width']}, the text hidden_size")
  vrope = (v.raw.get("rope_parameters") or {})
  c.encoder = mlc.ConfigDict(dict(
      patch_size=v["patch_size"], temporal_patch=v["temporal_patch_size"], merge=merge, width=width,
      depth=v["depth"], num_heads=v["num_heads"], mlp_dim=int(width * v["mlp_ratio"]),
      rope_theta=float(vrope.get("rope_theta", 10_000.0))))
  c.decoder.update(dec, qkv_bias=True, rope_sections=sections)
  c.family, c.connector, c.prefix_attention, c.image_position = "native", "merger", False, 0
  c.connector_options.merger.merge = merge
  c.family_options.native.placeholder_ids = (int(top.raw.get("image_token_id", 151655)),
                                             int(top.raw.get("video_token_id", 151656)))


def anyres(top: Fields, c: mlc.ConfigDict, v: Fields) -> None:
  """LLaVA-NeXT over the LLaVA fields: the anyres family, its pinpoints and placeholder."""
  size = v["image_size"]
  pins = tuple(tuple(int(x) for x in p) for p in (top.raw.get("image_grid_pinpoints")
                                                   or [[336, 672], [672, 336], [672, 672], [1008, 336],
                                                       [336, 1008]]))
  if any(h % size or w % size for h, w in pins):
    top.unsupported("image_grid_pinpoints", [list(p) for p in pins], f"multiples of image_size={size}")
  c.family = "anyres"
  c.family_options.anyres.placeholder_ids = (int(top.raw.get("image_token_index", 32000)),)
  c.family_options.anyres.pinpoints = pins


def derive(hf: dict) -> tuple[str, mlc.ConfigDict]:
  """(architecture, config): configs/shapes_tiny.py's (siglip_shapes.py's for SiglipModel) with model.*
  and data.image_size from `hf`."""
  archs = hf.get("architectures") or [None]
  arch = archs[0]
  top = Fields(hf, {})
  base = base_config("siglip_shapes" if arch == "SiglipModel" else "shapes_tiny")
  c = base.model
  if arch in ("GemmaForCausalLM", "LlamaForCausalLM"):
    want = "gemma" if arch.startswith("Gemma") else "llama"
    top.require("model_type", (want,))
    t = Fields(hf, TEXT_DEFAULTS[want])
    if t["use_bidirectional_attention"]:
      t.unsupported("use_bidirectional_attention", True, "false (a causal LM)")
    c.family, c.image_position, c.prefix_attention = "lm", 0, False
    c.decoder.update(decoder(t, t["tie_word_embeddings"]))
  elif arch == "PaliGemmaForConditionalGeneration":
    v = top.sub("vision_config", _VISION, "siglip_vision_model")
    t = top.sub("text_config", {"gemma": _GEMMA}, "gemma")
    c.family, c.image_position, c.prefix_attention, c.connector = "unified", 0, True, "linear"
    c.encoder.update(encoder(v, v["num_hidden_layers"], final_norm=True))
    c.decoder.update(decoder(t, hf.get("tie_word_embeddings", True)))
  elif arch in ("LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration"):
    v = top.sub("vision_config", _VISION, "clip_vision_model")
    t = top.sub("text_config", {"llama": _LLAMA}, "llama")
    top.require("vision_feature_select_strategy", ("full",))  # "default" drops a CLS SigLIP lacks
    top.require("projector_hidden_act", ("gelu",))
    if hf.get("multimodal_projector_bias", True) is not True:
      top.unsupported("multimodal_projector_bias", hf["multimodal_projector_bias"], "true")
    layers, k = v["num_hidden_layers"], hf.get("vision_feature_layer", -2)
    if not isinstance(k, int) or not -layers - 1 <= k <= layers:
      top.unsupported("vision_feature_layer", k, f"one int in [{-layers - 1}, {layers}]")
    # hidden_states[k] (k < 0 counts from the end of L + 1 states): the first k layers, no post-LN.
    depth = k if k >= 0 else layers + 1 + k
    c.family, c.image_position, c.prefix_attention, c.connector = "unified", 1, False, "mlp"
    c.encoder.update(encoder(v, depth, final_norm=False))
    c.decoder.update(decoder(t, hf.get("tie_word_embeddings") or t["tie_word_embeddings"]))
    n = (v["image_size"] // v["patch_size"]) ** 2
    if arch == "LlavaNextForConditionalGeneration":
      anyres(top, c, v)
    elif hf.get("image_seq_length", n) != n:
      top.unsupported("image_seq_length", hf["image_seq_length"], f"{n}, the number of patches")
  elif arch == "MllamaForConditionalGeneration":
    v = mllama(top, c)
  elif arch == "Qwen2VLForConditionalGeneration":
    qwen2_vl(top, c)
  elif arch == "SiglipModel":
    v = top.sub("vision_config", _VISION, "siglip_vision_model")
    t = top.sub("text_config", {"siglip_text_model": _SIGLIP_TEXT}, "siglip_text_model")
    v.require("vision_use_head", (True,))  # the image embedding is the MAP head's output
    c.encoder.update(encoder(v, v["num_hidden_layers"], final_norm=True))
    c.text.update(siglip_text(t, v["hidden_size"]))
    base.data.text_len = c.text.max_len  # HF pads to max_length and pools the last position
  elif arch == "SiglipVisionModel":
    top.require("model_type", ("siglip_vision_model",))
    v = Fields(hf, _SIGLIP_VISION)
    c.family, c.image_position, c.prefix_attention = "unified", 0, True
    c.encoder.update(encoder(v, v["num_hidden_layers"], final_norm=True))
  else:
    top.unsupported("architectures[0]", arch, ", ".join(ARCHITECTURES))
  if c.family not in ("lm", "native"):  # native: each image keeps its own size
    base.data.image_size = v["image_size"]
  return arch, base


ARCHITECTURES = ("GemmaForCausalLM", "LlamaForCausalLM", "PaliGemmaForConditionalGeneration",
                 "LlavaForConditionalGeneration", "LlavaNextForConditionalGeneration",
                 "MllamaForConditionalGeneration", "Qwen2VLForConditionalGeneration",
                 "SiglipModel", "SiglipVisionModel")

"""Image encoders by name: what turns an image into the patch features a connector reads.

  ENCODERS["vit"].build(model_cfg) -> vit.ViT from model.encoder;  ENCODERS["patches"]: Fuyu's raw patches;
  ENCODERS["mllama"]: Llama 3.2 Vision's tiled tower (the cross family's model.family_options.cross.encoder)
  ENCODERS["native"]: Qwen2-VL's native-resolution tower (the native family's: packed patch grids)
Each entry also checks model.encoder's fields against the image side it will see (check).
"""
import dataclasses
from typing import Callable

import ml_collections as mlc

from mm_jax.config import fields
from mm_jax.errors import UserError
from mm_jax.models import family
from mm_jax.models.mllama_vit import MllamaViT
from mm_jax.models.native_vit import NativeViT
from mm_jax.models.vit import RawPatches, ViT


@dataclasses.dataclass(frozen=True)
class Encoder:
  """build(model_cfg) -> module with num_patches(image_shape); check(config, side, what): its fields."""
  build: Callable[[mlc.ConfigDict], object]
  check: Callable


def _whole_patches(config, side: int, what: str) -> None:
  patch = fields.integer(config, "model.encoder.patch_size", 1)
  if patch and (side % patch or side < patch):  # else the conv drops the rest of the image silently
    raise UserError(f"{what} is not a multiple of model.encoder.patch_size={patch}; set "
                    f"--config.data.image_size (or the patch size) so that the image is whole patches")


def _check_vit(config, side: int, what: str) -> None:
  for field in ("width", "num_heads", "mlp_dim"):
    fields.integer(config, f"model.encoder.{field}", 1)
  fields.integer(config, "model.encoder.depth", 0)  # 0: patch embedding only (LLaVA's vision_feature_layer=0)
  fields.number(config, "model.encoder.norm_eps", 0, lo_open=True)
  fields.heads("encoder", config.model.encoder.width, config.model.encoder.num_heads)
  _whole_patches(config, side, what)


def _vit(model_cfg: mlc.ConfigDict) -> ViT:
  """SigLIP-style ViT from model.encoder (vit.ViT's fields)."""
  return family.make(ViT, dict(model_cfg.encoder), "encoder", **family.dtypes(model_cfg))


def _patches(model_cfg: mlc.ConfigDict) -> RawPatches:
  """Fuyu's raw pixel patches of model.encoder.patch_size; no parameters."""
  return RawPatches(model_cfg.encoder.patch_size)  # the encoder's other fields are unused


_VIT_ONLY = {"final_norm": True, "scan": False}


def _own_fields(model_cfg: mlc.ConfigDict, kind: str, drop=_VIT_ONLY) -> dict:
  """model.encoder without configs/base.py's ViT-only fields (which the `kind` tower lacks)."""
  fields_ = {k: tuple(map(tuple, v)) if k == "aspect_ratios" else v
             for k, v in dict(model_cfg.encoder).items()}
  for name, default in drop.items():
    if fields_.pop(name, default) != default:
      raise UserError(f"model.encoder.{name} does not apply to the {kind} encoder; leave it at {default}")
  return fields_


def _mllama(model_cfg: mlc.ConfigDict) -> MllamaViT:
  """Llama 3.2 Vision's tiled tower from model.encoder (mllama_vit.MllamaViT's fields)."""
  return family.make(MllamaViT, _own_fields(model_cfg, "mllama"), "encoder", **family.dtypes(model_cfg))


def _check_mllama(config, side: int, what: str) -> None:
  _check_vit(config, side, what)
  enc = config.model.encoder
  if (1, 1) not in [tuple(a) for a in enc.get("aspect_ratios", ((1, 1),))]:
    raise UserError("model.encoder.aspect_ratios must hold (1, 1): the aspect ratio of a one-tile image")
  bad = [i for i in enc.get("intermediate_layers", ()) if not 0 <= i < enc.depth]
  if bad:
    raise UserError(f"model.encoder.intermediate_layers {bad} are not layers of the tower (depth "
                    f"{enc.depth}); set --config.model.encoder.intermediate_layers")
  if config.model.encoder.get("image_size") != side:
    raise UserError(f"{what} must equal model.encoder.image_size={config.model.encoder.get('image_size')} "
                    "(one tile: the tower's tables are per tile); set --config.data.image_size to it")


def _native(model_cfg: mlc.ConfigDict) -> NativeViT:
  """Qwen2-VL's native-resolution tower from model.encoder (native_vit.NativeViT's fields)."""
  return family.make(NativeViT, _own_fields(model_cfg, "native", {"final_norm": True}),
                     "encoder", **family.dtypes(model_cfg))


def _check_native(config, side=None, what=None) -> None:
  """Any image size (data/native_images.py rounds it); the width splits into 2D RoPE quarters."""
  del side, what
  enc = config.model.encoder
  for field in ("patch_size", "width", "depth", "num_heads", "mlp_dim"):
    fields.integer(config, f"model.encoder.{field}", 1)
  fields.heads("encoder", enc.width, enc.num_heads)
  if (enc.width // enc.num_heads) % 4:
    raise UserError(f"model.encoder.width / num_heads = {enc.width // enc.num_heads} must be a multiple "
                    "of 4: 2D RoPE gives a quarter of each head to rows, a quarter to columns")


ENCODERS = {"vit": Encoder(_vit, _check_vit), "patches": Encoder(_patches, _whole_patches),
            "mllama": Encoder(_mllama, _check_mllama), "native": Encoder(_native, _check_native)}


def check_image(config, encoder: str, side: int | None = None, what: str | None = None) -> None:
  """ENCODERS[encoder]'s checks of model.encoder for images of `side` (default data.image_size)."""
  size = config.data.image_size
  ENCODERS[encoder].check(config, size if side is None else side,
                          what or f"data.image_size={size}")

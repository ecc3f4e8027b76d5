r"""AnyRes tiling (LLaVA-NeXT): a large image as a base view plus a grid of tiles, and where each of its
tokens comes from.

  tiles_Tx{S}x{S}x3, grid = tiles(image_HxWx3, AnyRes(size=336, pinpoints=...))   # base first
  src_K = token_sources(image_HxW, grid, side=24)    # index into the T x side^2 features; -1: newline
The arithmetic is HF's LlavaNextImageProcessorPil and LlavaNextModel.pack_image_features (transformers
5.23), written here for numpy (tests/test_parity_llava_next.py holds them equal): the pinpoint that
keeps the most of the image's pixels (ties: the least padding), the image resized into it keeping its
aspect (PIL bicubic) and centred on black, cut into size x size tiles row by row; the base view is the
whole image resized to size x size. Tokens: the base view's side^2 features, then the tiles' features
laid out as one (rows * side) x (cols * side) map with the padding's rows or columns cut off
(unpadding) and a learned newline after each row.
"""
import dataclasses
import math

import numpy as np

from mm_jax.data import images
from mm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class AnyRes:
  """size: the tile side in pixels (the encoder's image size); pinpoints: the (height, width) canvases."""
  size: int = 336
  pinpoints: tuple[tuple[int, int], ...] = ((336, 672), (672, 336), (672, 672), (1008, 336), (336, 1008))
  mean: tuple[float, ...] = images.OPENAI_CLIP_MEAN
  std: tuple[float, ...] = images.OPENAI_CLIP_STD

  def __post_init__(self):
    bad = [p for p in self.pinpoints if p[0] % self.size or p[1] % self.size]
    if bad:
      raise UserError(f"anyres pinpoints {bad} are not whole tiles of {self.size} pixels; use multiples "
                      "of the tile size")


def best_resolution(height: int, width: int, pinpoints) -> tuple[int, int]:
  """The pinpoint (h, w) showing the most of the image's pixels once it is scaled into it; ties: the
  least wasted canvas."""
  best, best_eff, best_waste = None, 0, math.inf
  for h, w in pinpoints:
    scale = min(w / width, h / height)
    eff = min(int(width * scale) * int(height * scale), width * height)
    waste = w * h - eff
    if eff > best_eff or (eff == best_eff and waste < best_waste):
      best, best_eff, best_waste = (h, w), eff, waste
  return best


def _fit(height: int, width: int, target: tuple[int, int]) -> tuple[int, int]:
  """The size of the image scaled into `target`, aspect kept (get_patch_output_size)."""
  th, tw = target
  if tw / width < th / height:
    return min(math.ceil(height * tw / width), th), tw
  return th, min(math.ceil(width * th / height), tw)


def tiles(image_HxWx3: np.ndarray, opts: AnyRes) -> tuple[np.ndarray, tuple[int, int]]:
  """uint8 RGB -> (normalised tiles (1 + rows * cols) x size x size x 3, the base view first; the grid
  (rows, cols))."""
  image_HxWx3 = images.checked(image_HxWx3)
  h, w = image_HxWx3.shape[:2]
  canvas_h, canvas_w = best_resolution(h, w, opts.pinpoints)
  new_h, new_w = _fit(h, w, (canvas_h, canvas_w))
  top, left = (canvas_h - new_h) // 2, (canvas_w - new_w) // 2
  canvas = np.zeros((canvas_h, canvas_w, 3), np.uint8)
  canvas[top:top + new_h, left:left + new_w] = images.resize(image_HxWx3, new_h, new_w)
  s = opts.size
  rows, cols = canvas_h // s, canvas_w // s
  crops = canvas.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, 3)
  views = np.concatenate([images.resize(image_HxWx3, s, s)[None], crops])
  return images.normalize(views, opts.mean, opts.std), (rows, cols)


def token_sources(image_hw: tuple[int, int], grid: tuple[int, int], side: int) -> np.ndarray:
  """For each of the image's tokens, in order, its feature's index in the (1 + rows * cols) x side^2
  features of its tiles, or -1 for the newline (module docstring)."""
  (h, w), (rows, cols), n = image_hw, grid, side * side
  r_BxC = np.arange(rows * side)[:, None]
  c_BxC = np.arange(cols * side)[None, :]
  src = (1 + (r_BxC // side) * cols + c_BxC // side) * n + (r_BxC % side) * side + c_BxC % side
  cur_h, cur_w = rows * side, cols * side
  if w / h > cur_w / cur_h:  # wider than the map: rows of padding above and below
    new_h = int(round(h * (cur_w / w), 7))
    pad = (cur_h - new_h) // 2
    src = src[pad:cur_h - pad]
  else:
    new_w = int(round(w * (cur_h / h), 7))
    pad = (cur_w - new_w) // 2
    src = src[:, pad:cur_w - pad]
  src = np.concatenate([src, np.full((len(src), 1), -1)], axis=1)
  return np.concatenate([np.arange(n), src.reshape(-1)]).astype(np.int32)


def num_tokens(image_hw: tuple[int, int], opts: AnyRes, side: int) -> int:
  """The image's tokens in the decoder's sequence (its placeholders)."""
  h, w = image_hw
  canvas = best_resolution(h, w, opts.pinpoints)
  return len(token_sources(image_hw, (canvas[0] // opts.size, canvas[1] // opts.size), side))

r"""Images (and video frames) at their own resolution, as the native family reads them (Qwen2-VL's rules).

  h, w = smart_resize(height, width, opts)                 # multiples of patch * merge, pixel bounds
  patches_NxF, grid = image_patches(image_HxWx3, opts)     # grid = (t, h, w) in patches
  ids_Nx3 = patch_ids(grid, opts.merge, first_block=1)     # (attention block, row, column)
  n = num_tokens(grid, opts.merge)                          # the placeholders the text holds for it
  ids = image_tokens(grid, opts.merge, placeholder, breaks)  # ... with Pixtral's row breaks if asked
  positions_Lx3 = mrope_positions(length, spans, opts.merge)

The arithmetic is HF's Qwen2VLImageProcessorPil's (transformers 5.23) and Qwen2VLModel.get_rope_index's,
written here for numpy (tests/test_parity_qwen2_vl.py holds them equal): the size rounds to multiples of
patch * merge within [min_pixels, max_pixels] keeping the aspect (Python's round, half to even), a
PIL bicubic resize, x / 255 normalised by the CLIP mean / std, and a still image repeated to
temporal_patch frames. Patches are listed merge window by merge window (the four patches of a 2 x 2
window consecutive: what the merger folds), each flattened in (C, T, p, p) order.
"""
import dataclasses
import math

import numpy as np

from mm_jax.data import images
from mm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class NativeImages:
  """The native image rules (Qwen2-VL's defaults). max_aspect: HF refuses a longer / shorter ratio
  above 200."""
  patch_size: int = 14
  temporal_patch: int = 2
  merge: int = 2
  min_pixels: int = 56 * 56
  max_pixels: int = 28 * 28 * 1280
  mean: tuple[float, ...] = images.OPENAI_CLIP_MEAN
  std: tuple[float, ...] = images.OPENAI_CLIP_STD
  max_aspect: float = 200.0

  @property
  def factor(self) -> int:
    return self.patch_size * self.merge


def smart_resize(height: int, width: int, opts: NativeImages) -> tuple[int, int]:
  """The (height, width) an image of that size is resized to: both multiples of opts.factor, the
  area within [min_pixels, max_pixels] (scaled down or up to fit, aspect kept as near as it goes)."""
  f = opts.factor
  if min(height, width) < 1:
    raise UserError(f"an image of {width}x{height} pixels has no area; drop it from the data")
  if max(height, width) / min(height, width) > opts.max_aspect:
    raise UserError(f"an image of {width}x{height} pixels is more than {opts.max_aspect:g} times as long "
                    "as it is wide; crop it, or split it into several images")
  h, w = round(height / f) * f, round(width / f) * f
  if h * w > opts.max_pixels:
    beta = math.sqrt(height * width / opts.max_pixels)
    h, w = max(f, math.floor(height / beta / f) * f), max(f, math.floor(width / beta / f) * f)
  elif h * w < opts.min_pixels:
    beta = math.sqrt(opts.min_pixels / (height * width))
    h, w = math.ceil(height * beta / f) * f, math.ceil(width * beta / f) * f
  return h, w


def patchify(frames_TxHxWxC: np.ndarray, opts: NativeImages) -> tuple[np.ndarray, tuple[int, int, int]]:
  """Normalised frames (T a multiple of temporal_patch, H and W of patch * merge) -> (patches NxF in
  merge-window order, grid (t, h, w) in patches)."""
  t, h, w, c = frames_TxHxWxC.shape
  p, m, tp = opts.patch_size, opts.merge, opts.temporal_patch
  gt, gh, gw = t // tp, h // p, w // p
  x = frames_TxHxWxC.transpose(0, 3, 1, 2).reshape(gt, tp, c, gh // m, m, p, gw // m, m, p)
  # -> (gt, gh/m, gw/m, m, m | c, tp, p, p): windows, then the patches of a window, then one patch
  x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
  return np.ascontiguousarray(x.reshape(gt * gh * gw, c * tp * p * p), np.float32), (gt, gh, gw)


def image_patches(image_HxWx3: np.ndarray, opts: NativeImages) -> tuple[np.ndarray, tuple[int, int, int]]:
  """A uint8 RGB image -> (patches NxF, grid (1, h, w)): resized by smart_resize, normalised, its one
  frame repeated to temporal_patch frames (a still image is a tubelet of copies, as HF)."""
  image_HxWx3 = images.checked(image_HxWx3)
  h, w = smart_resize(*image_HxWx3.shape[:2], opts)
  x_HxWx3 = images.normalize(images.resize(image_HxWx3, h, w), opts.mean, opts.std)
  return patchify(np.repeat(x_HxWx3[None], opts.temporal_patch, axis=0), opts)


def num_tokens(grid: tuple[int, int, int], merge: int, breaks: bool = False) -> int:
  """Tokens of one image or video in the decoder's sequence: t * h * w / merge^2 (breaks: and one
  row-break token per row of merged tokens, Pixtral's layout)."""
  t, h, w = grid
  return t * (h // merge) * (w // merge + breaks)


def image_tokens(grid: tuple[int, int, int], merge: int, placeholder: int, breaks: tuple[int, ...] = ()
                 ) -> list[int]:
  """The ids one image or video stands as in the text: a placeholder per merged token (the merger's
  row-major order); breaks = (row_break, image_end): each row of merged tokens followed by row_break,
  the very last by image_end (PixtralProcessor's layout; a video's every time step has its rows)."""
  t, h, w = grid[0], grid[1] // merge, grid[2] // merge
  if not breaks:
    return [placeholder] * (t * h * w)
  out = ([placeholder] * w + [breaks[0]]) * (t * h)
  out[-1] = breaks[1]
  return out


def patch_ids(grid: tuple[int, int, int], merge: int, first_block: int = 1) -> np.ndarray:
  """(block, row, column) of each patch in patchify's order: block first_block + the tubelet index
  (HF attends within one time step of a video), row / column in the patch grid."""
  t, h, w = grid
  rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
  window = lambda a: a.reshape(h // merge, merge, w // merge, merge).transpose(0, 2, 1, 3).reshape(-1)
  rc_Nx2 = np.stack([window(rows), window(cols)], axis=-1)
  blocks = np.repeat(first_block + np.arange(t), h * w)
  return np.concatenate([blocks[:, None], np.tile(rc_Nx2, (t, 1))], axis=1).astype(np.int32)


def mrope_positions(length: int, spans, merge: int, breaks: bool = False) -> np.ndarray:
  """M-RoPE positions Lx3 (t, h, w) of one example of `length` tokens whose images and videos sit at
  spans [(start, grid), ...] (their placeholders, in order): a text token's index on all three axes,
  counting on from the last; an image's tokens start + (time step, row, column) of their merged grid;
  the text after it starts max(h, w) / merge later (transformers 5.23's get_rope_index). breaks: a row's
  break token is the column after its last (the image end the last row's), the grid one column wider."""
  out, pos, at = np.zeros((length, 3), np.int64), 0, 0
  for start, grid in list(spans) + [(length, None)]:
    out[at:start] = pos + np.arange(start - at)[:, None]
    pos += start - at
    if grid is None:
      break
    t, h, w = grid[0], grid[1] // merge, grid[2] // merge + breaks
    tt, hh, ww = np.meshgrid(np.arange(t), np.arange(h), np.arange(w), indexing="ij")
    n = t * h * w
    out[start:start + n] = pos + np.stack([tt, hh, ww], axis=-1).reshape(-1, 3)
    pos, at = pos + max(h, w), start + n
  return out


def spans(tokens_L, placeholder_ids, grids, merge: int, breaks: bool = False) -> list:
  """[(start, grid)] of the placeholder runs of a token row (each id's run one image or video, in
  order of `grids`; breaks: with their row breaks): for rows built elsewhere (HF's processor output)."""
  tokens, grids, out, i = np.asarray(tokens_L), list(grids), [], 0
  ph = np.isin(tokens, np.asarray(placeholder_ids, tokens.dtype))
  while i < len(tokens):
    if ph[i]:
      n = num_tokens(grids[len(out)], merge, breaks)
      out.append((i, grids[len(out)]))
      i += n
    else:
      i += 1
  return out

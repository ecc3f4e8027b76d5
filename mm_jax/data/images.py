r"""Image bytes -> uint8 RGB, and the models' image preprocessing, equal to the HF image processors.

  image_HxWx3 = decode(data, max_pixels=config.data.max_image_pixels)   # or ImageError
  w, h = image_size(data)                                             # the header only
  x_SxSx3 = preprocess(config.data.image_processor, image_HxWx3, config.data.image_size)
  x_SxSx3 = PROCESSORS["siglip"](image_HxWx3, 224)                    # the same, unchecked name

decode reads what PIL reads (PNG, JPEG, GIF's first frame, WebP, BMP, ...). Its RGB is the one HF
models are fed: the EXIF orientation is applied (PIL.ImageOps.exif_transpose, as
transformers.image_utils.load_image does; the processors themselves do not), then the mode is converted
as image_transforms.convert_to_rgb does to a PIL image: an image with an alpha band or a "transparency"
entry (RGBA, LA, PA, P or L with a transparent colour) is alpha-composited onto white, any other mode
(L, P, 1, CMYK, YCbCr, I, ...) goes through PIL's convert("RGB"). (load_image's own convert("RGB")
drops alpha instead; a processor given the opened PIL image composites, which is what we follow.)
A decompression bomb is refused from the header, before any pixel is decoded.

The processors, float32 [S, S, 3] channels last (S = data.image_size):
  plain       bilinear PIL resize only if the size differs, then x / 127.5 - 1 (the pipeline's own)
  siglip      SiglipImageProcessor: resize to (S, S) bicubic, x * (1/255), (x - 0.5) / 0.5
  clip        CLIPImageProcessor: shortest edge -> S (bicubic, other edge int(S * long / short)),
              center crop S x S, x * (1/255), normalise with OPENAI_CLIP_MEAN / _STD
  clip_pad    LLaVA's image_aspect_ratio="pad" (LlavaImageProcessor do_pad=True): pad to square with
              tuple(int(m * 255) for m in OPENAI_CLIP_MEAN) = (122, 116, 104), the image centred, then clip
  siglip_pad  the same padding with the SigLIP mean (127, 127, 127), then siglip
They match the PIL backend of transformers 5 (SiglipImageProcessorPil, CLIPImageProcessorPil,
LlavaImageProcessorPil) bit for bit. In transformers 5.23 a checkpoint's "SiglipImageProcessor" /
"CLIPImageProcessor" (AutoImageProcessor, or the class imported by that name) is the torchvision backend
when torchvision is installed and falls back to the PIL one (with a warning) when it is not; the
torchvision resize (antialiased bicubic on tensors) differs from PIL's by up to 2 steps of 1/255, so
`backend="pil"` is the reference these functions reproduce.
"""
import io
import re
import struct
from typing import Callable

import numpy as np
from PIL import Image, ImageOps

from mm_jax.errors import UserError

# transformers.utils.constants
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
RESCALE = 1 / 255  # the processors' default rescale_factor


class ImageError(UserError):
  """Image bytes that cannot be used: reason and fix, on one line (records can wrap them per record)."""

  def __init__(self, reason: str, fix: str):
    self.reason, self.fix = reason, fix
    super().__init__(f"{reason}; {fix}")


# ----------------------------------------------------------------------------------------- decoding

def image_size(data: bytes) -> tuple[int, int]:
  """(width, height) from the header; nothing is decoded."""
  return _open(data).size


def decode(data: bytes, max_pixels: int) -> np.ndarray:
  """Encoded image bytes -> uint8 [H, W, 3] RGB, upright (EXIF) and converted as HF converts it.

  Raises ImageError when the header says more than max_pixels pixels (checked before decoding) or when
  PIL cannot read the bytes."""
  image = _open(data)
  w, h = image.size
  if w * h > max_pixels:
    raise ImageError(f"image of {w}x{h} = {w * h} pixels is over data.max_image_pixels={max_pixels} "
                     "(a decompression bomb?)",
                     "raise --config.data.max_image_pixels if such images are expected")
  try:
    image.load()
    ImageOps.exif_transpose(image, in_place=True)
    rgb = convert_to_rgb(image)
  except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error... on bad data
    raise _unreadable(e) from e
  return np.asarray(rgb, np.uint8)


def convert_to_rgb(image: Image.Image) -> Image.Image:
  """transformers.image_transforms.convert_to_rgb on a PIL image: transparency onto white."""
  if "A" in image.getbands() or image.info.get("transparency") is not None:
    image = image.convert("RGBA")
    white = Image.new("RGBA", image.size, (255, 255, 255, 255))
    return Image.alpha_composite(white, image).convert("RGB")
  return image.convert("RGB")


def _open(data: bytes) -> Image.Image:
  """The lazily opened image (header read, no pixels): our max_pixels, not PIL's global limit, decides."""
  # PIL may warn (DecompressionBombWarning) past its MAX_IMAGE_PIXELS; not silenced here, since
  # warnings.catch_warnings is not thread-safe and grain reads in threads.
  try:
    return Image.open(io.BytesIO(data))
  except Image.DecompressionBombError:
    pass  # over 2 * PIL.Image.MAX_IMAGE_PIXELS: identify it below without PIL's check
  except Exception as e:
    raise _unreadable(e) from e
  # Image.open's own loop over the format plugins, less its size check.
  Image.init()
  for fmt in Image.ID:
    factory, accept = Image.OPEN[fmt]
    if accept is None or accept(data[:16]) is True:
      try:
        return factory(io.BytesIO(data), "")
      except (SyntaxError, IndexError, TypeError, struct.error):
        continue
  raise _unreadable(Image.UnidentifiedImageError("cannot identify image file"))


def _unreadable(e: BaseException) -> ImageError:
  said = " ".join(re.sub(r"<[^<>]* at 0x[0-9a-f]+>", "", str(e)).split())[:200] or type(e).__name__
  return ImageError(f"image bytes cannot be decoded (PIL: {said})",
                    "re-encode the image as PNG or JPEG, or drop the record")


# ------------------------------------------------------------------------------------ preprocessing

def plain(image_HxWx3: np.ndarray, size: int) -> np.ndarray:
  """The pipeline's original preprocessing, same arithmetic: bilinear resize if needed, x / 127.5 - 1."""
  image_HxWx3 = checked(image_HxWx3)
  if image_HxWx3.shape[:2] != (size, size):
    image_HxWx3 = np.asarray(Image.fromarray(image_HxWx3).resize((size, size), Image.BILINEAR))
  return image_HxWx3.astype(np.float32) / 127.5 - 1.0


def siglip(image_HxWx3: np.ndarray, size: int) -> np.ndarray:
  """SiglipImageProcessor: (size, size) bicubic, rescale, normalise with 0.5 / 0.5."""
  x_SxSx3 = resize(checked(image_HxWx3), size, size)
  return normalize(x_SxSx3, SIGLIP_MEAN, SIGLIP_STD)


def clip(image_HxWx3: np.ndarray, size: int, crop: int | None = None) -> np.ndarray:
  """CLIPImageProcessor: shortest edge -> size (bicubic), center crop crop x crop (default size),
  rescale, normalise with the OpenAI CLIP mean / std."""
  image_HxWx3 = checked(image_HxWx3)
  h, w = shortest_edge_size(*image_HxWx3.shape[:2], size)
  x_CxCx3 = center_crop(resize(image_HxWx3, h, w), crop or size)
  return normalize(x_CxCx3, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)


def shortest_edge_size(height: int, width: int, size: int) -> tuple[int, int]:
  """image_transforms.get_resize_output_image_size(size, default_to_square=False): (new_h, new_w),
  the long edge truncated, not rounded."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_long, new_short) if width <= height else (new_short, new_long)


def center_crop(image_HxWx3: np.ndarray, crop: int) -> np.ndarray:
  """image_transforms.center_crop to (crop, crop); an image smaller than the crop is zero-padded."""
  h, w = image_HxWx3.shape[:2]
  top, left = (h - crop) // 2, (w - crop) // 2
  if top >= 0 and left >= 0:
    return image_HxWx3[top:top + crop, left:left + crop]
  # HF pastes into a zero canvas of max(crop, size) at ceil offsets, then crops the shifted window.
  new_h, new_w = max(crop, h), max(crop, w)
  pad_top, pad_left = -(-(new_h - h) // 2), -(-(new_w - w) // 2)
  canvas = np.zeros((new_h, new_w) + image_HxWx3.shape[2:], image_HxWx3.dtype)
  canvas[pad_top:pad_top + h, pad_left:pad_left + w] = image_HxWx3
  top, left = top + pad_top, left + pad_left
  return canvas[max(0, top):min(new_h, top + crop), max(0, left):min(new_w, left + crop)]


def pad_to_square(image_HxWx3: np.ndarray, mean: tuple[float, ...]) -> np.ndarray:
  """LLaVA's expand2square (= LlavaImageProcessor.pad_to_square): the image centred on a square of
  colour tuple(int(m * 255) for m in mean), offset (long - short) // 2."""
  image_HxWx3 = checked(image_HxWx3)
  h, w = image_HxWx3.shape[:2]
  if h == w:
    return image_HxWx3
  n = max(h, w)
  out_NxNx3 = np.empty((n, n, 3), np.uint8)
  out_NxNx3[:] = [int(m * 255) for m in mean]
  top, left = (n - h) // 2, (n - w) // 2
  out_NxNx3[top:top + h, left:left + w] = image_HxWx3
  return out_NxNx3


def resize(image_HxWx3: np.ndarray, height: int, width: int) -> np.ndarray:
  # image_transforms.resize: PIL, BICUBIC (the processors' resample), reducing_gap None, uint8 out
  return np.asarray(Image.fromarray(image_HxWx3).resize((width, height), Image.BICUBIC))


def normalize(x_HxWx3: np.ndarray, mean, std) -> np.ndarray:
  # image_transforms.rescale (in float64, then float32), then normalize in float32
  x_HxWx3 = (x_HxWx3.astype(np.float64) * RESCALE).astype(np.float32)
  return (x_HxWx3 - np.array(mean, np.float32)) / np.array(std, np.float32)


def checked(image: np.ndarray) -> np.ndarray:
  if not (isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3
          and image.shape[2] == 3 and image.shape[0] and image.shape[1]):
    what = f"{image.dtype} {list(image.shape)}" if isinstance(image, np.ndarray) else type(image).__name__
    raise ValueError(f"expected a uint8 [H, W, 3] RGB image, got {what}; decode it with images.decode")
  return image


# --------------------------------------------------------------------------------------- registry

def siglip_pad(image_HxWx3: np.ndarray, size: int) -> np.ndarray:
  """siglip on the image padded to square with the SigLIP mean colour."""
  return siglip(pad_to_square(image_HxWx3, SIGLIP_MEAN), size)


def clip_pad(image_HxWx3: np.ndarray, size: int) -> np.ndarray:
  """LLaVA-1.5's image_aspect_ratio="pad": clip on the image padded with the CLIP mean colour."""
  return clip(pad_to_square(image_HxWx3, OPENAI_CLIP_MEAN), size)


# config.data.image_processor -> fn(uint8 [H, W, 3], S = config.data.image_size) -> float32 [S, S, 3]
PROCESSORS: dict[str, Callable[[np.ndarray, int], np.ndarray]] = {
    "plain": plain, "siglip": siglip, "siglip_pad": siglip_pad, "clip": clip, "clip_pad": clip_pad}


def preprocess(name: str, image_HxWx3: np.ndarray, size: int) -> np.ndarray:
  """PROCESSORS[name](image_HxWx3, size), the name checked (name: config.data.image_processor)."""
  if name not in PROCESSORS:
    raise UserError(f"data.image_processor={name!r} is unknown; set --config.data.image_processor to "
                    f"one of {', '.join(PROCESSORS)}")
  return PROCESSORS[name](image_HxWx3, size)

"""images.decode and the image processors equal transformers' (its PIL backend) on images built here.

  .venv/bin/python -m pytest tests/test_images.py -q
"""
import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageFile
import pytest
import transformers
from transformers import CLIPImageProcessorPil, LlavaImageProcessorPil, SiglipImageProcessorPil
from transformers.image_transforms import convert_to_rgb as hf_convert_to_rgb
from transformers.image_utils import load_image as hf_load_image

from mm_jax.data import images
from mm_jax.errors import UserError

TOL = 1e-5
SIZES = [(17, 33), (64, 64), (300, 200), (1, 1), (5, 3)]  # (w, h)
# (mode, format): every mode PIL writes to that format; CMYK goes to JPEG (PNG has none)
FILES = [("RGB", "PNG"), ("RGBA", "PNG"), ("L", "PNG"), ("P", "PNG"), ("P+transparency", "PNG"),
         ("LA", "PNG"), ("1", "PNG"), ("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG")]


def _pixels(w: int, h: int, seed: int = 0) -> np.ndarray:
  """uint8 [h, w, 4]: smooth gradients plus noise, alpha 0 (transparent), 255 and in between."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:h, 0:w]
  base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256,
                   rng.choice([0, 0, 255, 37, 128], size=(h, w))], -1)
  noise = rng.integers(-40, 40, size=(h, w, 4)) * np.array([1, 1, 1, 0])
  return np.clip(base + noise, 0, 255).astype(np.uint8)


def _image(mode: str, w: int, h: int) -> Image.Image:
  rgba = Image.fromarray(_pixels(w, h), "RGBA")
  if mode == "P+transparency":
    p = rgba.convert("RGB").convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    p.info["transparency"] = 3
    return p
  if mode == "LA":
    return rgba.convert("LA")
  return rgba if mode == "RGBA" else rgba.convert("RGB").convert(mode)


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  if fmt == "PNG" and "transparency" in image.info:
    kwargs["transparency"] = image.info["transparency"]
  image.save(buf, fmt, **kwargs)
  return buf.getvalue()


def _file(mode: str, fmt: str, w: int, h: int) -> bytes:
  return _encode(_image(mode, w, h), fmt)


def _hf(processor, data: bytes) -> np.ndarray:
  """What the HF processor makes of the opened file (PIL image in, as a user passes it), HxWx3."""
  out = processor(images=Image.open(io.BytesIO(data)), return_tensors="np")["pixel_values"][0]
  return np.transpose(out, (1, 2, 0))


def _hf_processors(s: int) -> dict:
  square, edge, crop = {"height": s, "width": s}, {"shortest_edge": s}, {"height": s, "width": s}
  half = [0.5, 0.5, 0.5]
  return {
      "siglip": SiglipImageProcessorPil(size=square),
      "clip": CLIPImageProcessorPil(size=edge, crop_size=crop),
      "clip_pad": LlavaImageProcessorPil(do_pad=True, size=edge, crop_size=crop),
      "siglip_pad": LlavaImageProcessorPil(do_pad=True, size=square, do_center_crop=False,
                                           image_mean=half, image_std=half),
  }


def _one_line(e: BaseException) -> str:
  msg = str(e)
  assert "\n" not in msg and msg
  return msg


# --- decoding ---------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,fmt", FILES)
@pytest.mark.parametrize("w,h", SIZES)
def test_decode_equals_convert_to_rgb(mode, fmt, w, h):
  data = _file(mode, fmt, w, h)
  ours = images.decode(data, max_pixels=10**6)
  theirs = hf_convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True)
  assert ours.dtype == np.uint8 and ours.shape == (h, w, 3)
  np.testing.assert_array_equal(ours, theirs)
  assert images.image_size(data) == (w, h)


def test_rgba_is_composited_on_white():
  rgba = _pixels(40, 30)
  rgba[0, 0] = [10, 20, 30, 0]  # fully transparent: white, whatever its colour
  rgba[0, 1] = [10, 20, 30, 255]
  data = _encode(Image.fromarray(rgba, "RGBA"), "PNG")
  ours = images.decode(data, max_pixels=10**6)
  assert ours[0, 0].tolist() == [255, 255, 255] and ours[0, 1].tolist() == [10, 20, 30]
  np.testing.assert_array_equal(ours, hf_convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True))
  # HF's array path rounds a float blend, PIL's alpha_composite is integer: at most one step apart
  from_array = hf_convert_to_rgb(rgba, return_numpy=True, input_data_format="channels_last")
  assert np.abs(ours.astype(int) - from_array).max() <= 1


@pytest.mark.parametrize("fmt,kwargs", [("GIF", {}), ("WEBP", {"lossless": True}), ("BMP", {}),
                                        ("WEBP", {"quality": 80})])
def test_other_formats(fmt, kwargs):
  image = _image("RGBA" if fmt == "WEBP" else "RGB", 33, 17)
  data = _encode(image, fmt, **kwargs)
  ours = images.decode(data, max_pixels=10**6)
  np.testing.assert_array_equal(ours, hf_convert_to_rgb(Image.open(io.BytesIO(data)), return_numpy=True))
  assert ours.shape == (17, 33, 3)


def test_gif_first_frame():
  frames = [Image.new("RGB", (8, 6), c) for c in [(200, 0, 0), (0, 200, 0)]]
  buf = io.BytesIO()
  frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
  ours = images.decode(buf.getvalue(), max_pixels=10**6)
  assert ours.shape == (6, 8, 3) and ours[0, 0].tolist() == [200, 0, 0]


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_exif_orientation_is_applied_as_load_image_does(orientation):
  exif = Image.Exif()
  exif[0x0112] = orientation
  data = _encode(_image("RGB", 40, 24), "JPEG", exif=exif.tobytes())
  ours = images.decode(data, max_pixels=10**6)
  np.testing.assert_array_equal(ours, np.asarray(hf_load_image(Image.open(io.BytesIO(data)))))
  assert ours.shape == ((40, 24, 3) if orientation in (6, 8) else (24, 40, 3))


# --- refusing ---------------------------------------------------------------------------------

def _png_header(w: int, h: int) -> bytes:
  """A 1x1 1-bit PNG whose IHDR says w x h (CRC fixed): PIL opens it lazily, nothing is allocated."""
  data = _encode(Image.new("1", (1, 1)), "PNG")
  assert data[12:16] == b"IHDR"
  ihdr = b"IHDR" + struct.pack(">II", w, h) + data[24:29]
  return data[:12] + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + data[33:]


def _no_decoding(monkeypatch):
  def refuse(self, *args, **kwargs):
    raise AssertionError("pixels were decoded")
  monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


@pytest.mark.parametrize("w,h,limit", [(100000, 100000, 50_000_000),  # over PIL's own limit too
                                       (9000, 9000, 1_000_000)])       # only over ours
def test_bomb_refused_from_the_header(monkeypatch, w, h, limit):
  data = _png_header(w, h)
  assert images.image_size(data) == (w, h)
  _no_decoding(monkeypatch)
  with pytest.raises(images.ImageError) as e:
    images.decode(data, max_pixels=limit)
  msg = _one_line(e.value)
  assert f"{w}x{h}" in msg and str(limit) in msg and "data.max_image_pixels" in msg
  assert isinstance(e.value, UserError)


def test_our_limit_not_pils_decides(monkeypatch):
  monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL would refuse 64x64 (> 2 * 100)
  data = _file("RGB", "PNG", 64, 64)
  with pytest.raises(Image.DecompressionBombError):
    Image.open(io.BytesIO(data))
  np.testing.assert_array_equal(images.decode(data, max_pixels=64 * 64),
                                np.asarray(Image.fromarray(_pixels(64, 64)).convert("RGB")))
  with pytest.raises(images.ImageError, match="64x64"):
    images.decode(data, max_pixels=64 * 64 - 1)


@pytest.mark.parametrize("data", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\0" * 40,
                                  _file("RGB", "PNG", 64, 64)[:200], _file("RGB", "JPEG", 64, 64)[:300]],
                         ids=["empty", "garbage", "png-magic-only", "truncated-png", "truncated-jpeg"])
def test_unreadable_bytes_one_line(data):
  with pytest.raises(images.ImageError) as e:
    images.decode(data, max_pixels=10**6)
  msg = _one_line(e.value)
  assert "PIL: " in msg and " at 0x" not in msg and e.value.reason and e.value.fix


# --- preprocessing ----------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["siglip", "clip", "clip_pad", "siglip_pad"])
@pytest.mark.parametrize("mode,fmt", FILES)
@pytest.mark.parametrize("w,h", SIZES)
def test_processors_equal_hf(name, mode, fmt, w, h):
  s = 33
  data = _file(mode, fmt, w, h)
  ours = images.preprocess(name, images.decode(data, max_pixels=10**6), s)
  theirs = _hf(_hf_processors(s)[name], data)
  assert ours.dtype == np.float32 and ours.shape == theirs.shape == (s, s, 3)
  assert np.abs(ours - theirs).max() <= TOL


@pytest.mark.parametrize("name", ["siglip", "clip", "clip_pad", "siglip_pad"])
@pytest.mark.parametrize("w,h", [(300, 200), (200, 301), (640, 480), (224, 224)])
def test_processors_equal_hf_at_224(name, w, h):
  data = _file("RGB", "JPEG", w, h)
  ours = images.PROCESSORS[name](images.decode(data, max_pixels=10**6), 224)
  assert np.abs(ours - _hf(_hf_processors(224)[name], data)).max() <= TOL


def test_clip_edge_rounding_and_crop_padding():
  # int(s * long / short) truncates: 200x301 at 224 -> 224 x 337 (337.12), 300x200 -> 336 x 224
  assert images.shortest_edge_size(301, 200, 224) == (337, 224)
  assert images.shortest_edge_size(200, 300, 224) == (224, 336)
  data = _file("RGB", "PNG", 30, 20)  # a crop larger than the resized image: HF zero-pads it
  hf = CLIPImageProcessorPil(size={"shortest_edge": 20}, crop_size={"height": 25, "width": 25})
  ours = images.clip(images.decode(data, max_pixels=10**6), 20, crop=25)
  assert ours.shape == (25, 25, 3) and np.abs(ours - _hf(hf, data)).max() <= TOL


def test_pad_to_square_colour_and_offset():
  image = np.zeros((2, 5, 3), np.uint8)
  out = images.pad_to_square(image, images.OPENAI_CLIP_MEAN)
  assert out.shape == (5, 5, 3) and out[0, 0].tolist() == [122, 116, 104]
  assert (out[1:3] == 0).all() and (out[3:] == [122, 116, 104]).all()  # offset (5 - 2) // 2 = 1
  assert images.pad_to_square(image[:, :2], images.SIGLIP_MEAN) is not None


@pytest.mark.parametrize("w,h", [(32, 32), (17, 33), (300, 200)])
def test_plain_keeps_the_pipelines_numbers(w, h):
  image = _pixels(w, h)[..., :3].copy()
  # the pipeline's arithmetic before the processors existed
  want = image if (h, w) == (32, 32) else np.asarray(
      Image.fromarray(image).resize((32, 32), Image.BILINEAR))
  want = want.astype(np.float32) / 127.5 - 1.0
  got = images.preprocess("plain", image, 32)
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, want)


def test_bad_arguments():
  with pytest.raises(UserError, match="data.image_processor"):
    images.preprocess("nope", np.zeros((4, 4, 3), np.uint8), 4)
  for bad in [np.zeros((4, 4, 3), np.float32), np.zeros((4, 4), np.uint8), np.zeros((0, 4, 3), np.uint8)]:
    with pytest.raises(ValueError, match="uint8 \\[H, W, 3\\]") as e:
      images.siglip(bad, 4)
    _one_line(e.value)


def test_registry_names():
  assert set(images.PROCESSORS) == {"plain", "siglip", "siglip_pad", "clip", "clip_pad"}


def test_torchvision_backend_is_close():
  """Where torchvision is installed, transformers' default (torchvision) processors differ from the
  PIL ones (and so from ours) by antialiased bicubic on tensors: measured at most 2 of 1/255 steps."""
  pytest.importorskip("torchvision")
  fast = {"siglip": transformers.SiglipImageProcessor(size={"height": 224, "width": 224}),
          "clip": transformers.CLIPImageProcessor(size={"shortest_edge": 224},
                                                  crop_size={"height": 224, "width": 224})}
  for name, processor in fast.items():
    assert processor.backend == "torchvision"
    for w, h in [(300, 200), (64, 64), (17, 33)]:
      data = _file("RGB", "JPEG", w, h)
      ours = images.PROCESSORS[name](images.decode(data, max_pixels=10**6), 224)
      std = 0.5 if name == "siglip" else min(images.OPENAI_CLIP_STD)
      assert np.abs(ours - _hf(processor, data)).max() <= 3 / 255 / std

"""data/video.py: a video told from an image by its bytes, and the first-frame probe prepare checks with."""
import io

import numpy as np
from PIL import Image
import pytest

from mm_jax.data import shapes_video, video


def _image(fmt: str) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(buf, format=fmt)
  return buf.getvalue()


def test_videos_are_told_from_images_by_their_bytes():
  clip = shapes_video.mp4(np.zeros((4, 64, 64, 3), np.uint8))
  assert video.is_video(clip) and video.is_video(np.zeros((2, 8, 8, 3), np.uint8))
  assert video.is_video(b"RIFF\x00\x00\x00\x00AVI LIST") and video.is_video(b"\x1aE\xdf\xa3\x9fB\x86")
  for fmt in ("PNG", "JPEG", "WEBP"):  # WebP is RIFF too, AVIF / HEIC are ISO files too
    assert not video.is_video(_image(fmt)), fmt
  assert not video.is_video(b"\x00\x00\x00\x1cftypavif") and not video.is_video(np.zeros((8, 8, 3)))


def test_probe_gives_the_frame_size_or_says_why_not():
  assert video.probe(shapes_video.mp4(np.zeros((4, 64, 64, 3), np.uint8))) == (64, 64)
  with pytest.raises(ValueError, match="InvalidDataError") as e:
    video.probe(b"\x00\x00\x00\x18ftypisom" + b"junk" * 20)
  assert "\n" not in str(e.value)

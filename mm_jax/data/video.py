r"""Video for the native family: frames from a file (PyAV) or an array, sampled, cut into tubelet patches.

  frames_TxHxWx3, fps = read(path_or_bytes)                  # every frame, uint8 RGB (PyAV decodes)
  idx = sample_indices(len(frames), fps, VideoSampling(fps=2.0), temporal_patch=2)
  patches_NxF, grid = video_patches(frames[idx], VIDEO)      # grid = (t, h, w): t = frames / 2

Sampling is Qwen2-VL's video processor's (transformers 5.23 sample_frames): a fixed count rounded to a
multiple of temporal_patch, or fps frames per second of the video clipped to [min_frames, max_frames]
and to the frames there are, then uniform indices. Each frame is resized as an image
(native_images.smart_resize with the video bounds, PIL bicubic), normalised, the frame count padded to a
multiple of temporal_patch with copies of the last, and two consecutive frames make one tubelet
(temporal_patch); its patches are attention block `first_block + t` and M-RoPE time step t. (HF's video
processor resizes with torchvision, antialiased on tensors: up to 2/255 from PIL, see data/images.py;
the parity tests feed both models the same patches.)
"""
import dataclasses
import io
import math
import os

import av
import numpy as np

from mm_jax.data import images
from mm_jax.data.native_images import NativeImages, patchify, smart_resize
from mm_jax.errors import UserError

VIDEO = NativeImages(min_pixels=128 * 28 * 28, max_pixels=28 * 28 * 768)  # Qwen2VLVideoProcessor's bounds


@dataclasses.dataclass(frozen=True)
class VideoSampling:
  """num_frames > 0: that many frames (rounded to temporal_patch); else fps frames per second."""
  num_frames: int = 0
  fps: float = 2.0
  min_frames: int = 4
  max_frames: int = 768


_STILL_BRANDS = (b"avif", b"avis", b"heic", b"heix", b"mif1", b"msf1")  # ISO files that are images


def is_video(x) -> bool:
  """Frames (a T x H x W x 3 array) or a video file's bytes, told by their first bytes: mp4 / mov
  ("ftyp" at 4, not an image brand), webm / mkv (EBML), avi (RIFF "AVI ")."""
  if isinstance(x, np.ndarray):
    return x.ndim == 4
  b = bytes(x[:12]) if isinstance(x, (bytes, np.bytes_)) else b""
  return ((b[4:8] == b"ftyp" and b[8:12] not in _STILL_BRANDS) or b.startswith(b"\x1aE\xdf\xa3")
          or (b[:4] == b"RIFF" and b[8:12] == b"AVI "))


def probe(data: bytes) -> tuple[int, int]:
  """(width, height) of a video file's first video stream, its first frame decoded (a check that
  does not decode the whole file); a ValueError says why PyAV cannot read it."""
  try:
    with av.open(io.BytesIO(data)) as c:
      if not c.streams.video:
        raise ValueError("it has no video stream")
      stream = c.streams.video[0]
      for _ in c.decode(video=0):
        return stream.codec_context.width, stream.codec_context.height
  except (av.error.FFmpegError, UnicodeDecodeError) as e:
    raise ValueError(" ".join(f"{type(e).__name__}: {e}".split())[:120]) from None
  raise ValueError("it holds no frames")


def read(source) -> tuple[np.ndarray, float]:
  """(every frame as uint8 T x H x W x 3, the stream's frames per second) of a video file (a path or its
  bytes); a file PyAV cannot decode, or one without a video stream or frames, is a UserError."""
  name = source if isinstance(source, (str, os.PathLike)) else "the video bytes"
  try:
    with av.open(source if isinstance(source, (str, os.PathLike)) else io.BytesIO(source)) as c:
      if not c.streams.video:
        raise UserError(f"{name} has no video stream; give a video file (mp4, webm, ...)")
      stream = c.streams.video[0]
      fps = float(stream.average_rate or stream.guessed_rate or 0)
      frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
  except (av.error.FFmpegError, UnicodeDecodeError) as e:
    raise UserError(f"{name} cannot be decoded as a video ({type(e).__name__}: {e}); re-encode it "
                    "(e.g. ffmpeg -i IN -c:v libx264 OUT.mp4)") from None
  if not frames:
    raise UserError(f"{name} holds no frames; drop it from the data")
  return np.stack(frames), fps


def sample_indices(total: int, video_fps: float, s: VideoSampling, temporal_patch: int) -> np.ndarray:
  """The frames to keep, of `total` at video_fps (module docstring); fewer frames than asked is a
  UserError."""
  if s.num_frames > 0:
    n = round(s.num_frames / temporal_patch) * temporal_patch
  else:
    if video_fps <= 0:
      raise UserError("the video has no frame rate to sample by fps; set a frame count "
                      "(VideoSampling.num_frames)")
    top = math.floor(min(s.max_frames, total) / temporal_patch) * temporal_patch
    n = min(max(total / video_fps * s.fps, s.min_frames), top, total)
    n = math.floor(n / temporal_patch) * temporal_patch
  if n > total or n < 1:
    raise UserError(f"the video has {total} frames but {n} were asked; ask for at most {total} frames "
                    "(num_frames) or a lower fps")
  return np.arange(0, total, total / n).astype(np.int64)[:n]


def video_patches(frames_TxHxWx3: np.ndarray, opts: NativeImages = VIDEO
                  ) -> tuple[np.ndarray, tuple[int, int, int]]:
  """uint8 frames -> (patches NxF in merge-window order per tubelet, grid (t, h, w))."""
  if frames_TxHxWx3.ndim != 4 or not len(frames_TxHxWx3):
    raise UserError(f"a video is T x H x W x 3 frames, got an array of shape {list(frames_TxHxWx3.shape)}")
  h, w = smart_resize(*frames_TxHxWx3.shape[1:3], opts)
  x = np.stack([images.normalize(images.resize(images.checked(f), h, w), opts.mean, opts.std)
                for f in frames_TxHxWx3])
  if pad := -len(x) % opts.temporal_patch:
    x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)])
  return patchify(x, opts)

r"""Video: the generated `shapes_video` clips (4 frames of 64 x 64, a shape moving, another appearing
late) read by the native family as tubelets of 2 frames with temporal M-RoPE positions, or as their
middle frame alone.

  python -m mm_jax.train --config=configs/shapes_video.py:video --workdir=workdirs/video
  python -m mm_jax.eval  --config=configs/shapes_video.py:video --workdir=workdirs/video

Variants (`--config=configs/shapes_video.py:VARIANT`), equal steps and batch:
  video   every frame: 2 tubelets x 16 patches (patch 16, temporal patch 2), 8 tokens
  middle  the middle frame only, as a still image (4 tokens): what one frame can tell
  test    (with one of the above) a very small dataset, for the test suite.
Measured at 3000 steps on shapes_video 1.4.0 (test EM, experiments/README.md "Images at their own
resolution, and video"; `python experiments/resolution.py --runs=video,middle --steps=3000`, ~21 / 18
min on 2 cores): video 0.8717 (motion 0.957, appear 0.787), middle 0.4183 (motion 0.247: chance,
appear 0.59).
"""
import ml_collections as mlc

from mm_jax.config import files


def get_config(arg: str = "video") -> mlc.ConfigDict:
  variants = [v for v in arg.split(",") if v]
  c = files.get_config("shapes_native", "native")
  c.data.name = "shapes_video"
  c.data.num_train, c.data.num_validation, c.data.num_test = 4000, 100, 300
  c.data.text_len = 28  # the caption prompt and a 3-shape caption
  c.data.caption_ratio = 1.0  # captions name what moves and what appears: dense supervision
  c.model.encoder.temporal_patch = 2
  c.data.native.update(dict(min_pixels=32 * 32, max_pixels=64 * 64, video_min_pixels=64 * 64,
                            video_max_pixels=64 * 64, video_frames=4, patch_buckets=(16, 32)))
  for v in variants:
    if v == "middle":
      c.data.native.still_frame = True
    elif v == "test":
      c.total_steps, c.global_batch_size, c.log_every, c.checkpoint_every = 4, 8, 2, 2
      c.data.num_train, c.data.num_validation, c.data.num_test = 32, 8, 8
      c.eval.batch_size = 8
    elif v != "video":
      raise ValueError(f"unknown variant {v!r} of shapes_video; known: video, middle, test")
  return c

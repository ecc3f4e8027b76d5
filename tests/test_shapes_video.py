"""The generated shapes_video clips: stored as mp4, read back by PyAV; the mover really moves the way
its answer says, the late shape is absent at first, the caption says both, the middle frame does not
tell the way; and configs/shapes_video.py's rows are videos of 2 tubelets (the middle-frame baseline:
one still image)."""
import numpy as np
import pytest

from conftest import load_config
from mm_jax import data
from mm_jax.data import pipeline, shapes, shapes_video, video


@pytest.fixture(scope="module")
def video_config(tmp_path_factory):
  config = load_config("video,test", "shapes_video")
  config.data.data_dir = str(tmp_path_factory.mktemp("video_data"))
  pipeline.open_source(config, "train")
  return config


def _centre(frame, color):
  mask = np.abs(frame.astype(int) - np.array(shapes.COLORS[color])).sum(-1) < 60
  ys, xs = np.nonzero(mask)
  return xs.mean(), ys.mean()


def test_clips_show_what_their_answers_say():
  for i in range(10):
    rng = np.random.default_rng([5, i])
    background, objs, qa = shapes_video.random_clip(rng)
    frames, fps = video.read(shapes_video.mp4(shapes_video.frames(background, objs)))
    assert frames.shape == (shapes_video.FRAMES, 64, 64, 3) and fps == shapes_video.FPS
    color = objs[0][1]
    (x0, y0), (x1, y1) = _centre(frames[0], color), _centre(frames[-1], color)
    dx, dy = shapes_video.DIRECTIONS[qa[0][1]]
    assert (x1 - x0) * dx + (y1 - y0) * dy > 15  # moved MOVE * 3 = 24 px that way (codec blur aside)
    late = objs[1]
    assert qa[1][1] == late[0] and late[5] >= shapes_video.FRAMES // 2
    caption = shapes_video._caption(objs, qa[0][1])  # pylint: disable=protected-access
    assert caption.startswith(f"{color} {objs[0][0]} moves {qa[0][1]}, {late[1]} {late[0]} appears")


def test_the_middle_frame_does_not_tell_the_direction():
  """Where the mover is in the middle frame (the baseline's one image) is drawn the same for every
  direction: the motion questions need more than one frame."""
  where = {d: set() for d in shapes_video.DIRECTIONS}
  for i in range(400):
    _, objs, qa = shapes_video.random_clip(np.random.default_rng([6, i]))
    _, _, x0, y0, (dx, dy), _ = objs[0]
    t = shapes_video.FRAMES // 2
    where[qa[0][1]] |= {("x", x0 + dx * shapes_video.MOVE * t), ("y", y0 + dy * shapes_video.MOVE * t)}
  assert len({frozenset(v) for v in where.values()}) == 1 and len(where["up"]) > 10, where


def test_rows_are_videos_or_their_middle_frame(video_config):
  tok, src = data.open_split(video_config, "train")
  source = data.get("shapes_video")
  row = pipeline.row_layout(video_config, tok)
  ex = row.train(source.conversation(src[0], 0))
  assert len(ex["patches"]) == 2 * 16 and sorted(set(ex["patch_ids"][:, 0])) == [1, 2]
  t = ex["positions"][ex["text"] == 0, 0]  # the video's tokens: 2 time steps of 2 x 2 merged tokens
  assert sorted(set((t - t.min()).tolist())) == [0, 1] and len(t) == 8
  video_config.data.native.still_frame = True
  still = pipeline.row_layout(video_config, tok).train(source.conversation(src[0], 0))
  video_config.data.native.still_frame = False
  assert len(still["patches"]) == 16 and int((still["text"] == 0).sum()) == 4

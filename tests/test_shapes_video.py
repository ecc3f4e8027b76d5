"""The generated shapes_video clips: stored as mp4, read back by PyAV; the mover really moves the way
its answer says, the late shape is absent at first, the caption says both, the middle frame does not
tell the way; and configs/shapes_video.py's rows are videos of 2 tubelets (the middle-frame baseline:
one still image), or one time step with the tubelets pooled."""
import copy

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, make_run
from mm_jax import data
from mm_jax.config import validate
from mm_jax.data import pipeline, shapes, shapes_video, video
from mm_jax.errors import UserError
from mm_jax.models import native
from mm_jax.train import sharding


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


def test_temporal_pool_averages_a_video_s_tubelets_into_one_time_step(video_config):
  """family_options.native.temporal_pool=2: the clip's 2 tubelets stand as one time step of 4 tokens,
  each the mean of its 2 (token_dest); a train step runs on such a batch; 0 is refused in one line."""
  config = copy.deepcopy(video_config)
  config.model.family_options = {"native": {"temporal_pool": 2}}
  tok, src = data.open_split(config, "train")
  row = pipeline.row_layout(config, tok)
  ex = row.train(data.get("shapes_video").conversation(src[0], 0))
  assert len(ex["patches"]) == 32 and ex["token_dest"].tolist() == [0, 1, 2, 3] * 2
  t = ex["positions"][ex["text"] == 0]
  assert len(t) == 4 and len(set(t[:, 0].tolist())) == 1
  tokens = jnp.arange(2 * 8 * 3, dtype=jnp.float32).reshape(2, 8, 3)
  dest = jnp.asarray([[0, 1, 2, 3, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 8, 8]])  # row 2: an image, padding
  pooled = native.pool_tokens(tokens, dest)
  np.testing.assert_allclose(pooled[0, :4], (tokens[0, :4] + tokens[0, 4:]) / 2)
  np.testing.assert_allclose(pooled[1, :6], tokens[1, :6])
  config.global_batch_size = 2
  mm, tx = make_run(config, jax.devices()[:1], tok.vocab_size)
  batch = row.collate([ex, row.train(data.get("shapes_video").conversation(src[1], 0))])
  assert batch["token_dest"].shape == (2, 8)
  _, metrics = mm.make_train_step(tx)(mm.init_train_state(tx, seed=0), sharding.to_global(batch, mm.mesh))
  assert np.isfinite(float(metrics["loss"]))
  config.model.family_options = {"native": {"temporal_pool": 0}}
  with pytest.raises(UserError, match="temporal_pool=0 must be an integer >= 1"):
    validate.check_fields(config)

r"""Rows of the native family: every image (or video) at its own size, its patches packed, its tokens
placeholders in the text, M-RoPE positions; batches padded to a few patch-count buckets.

  row = NativeRow(config, tokenizer)
  ex = row.train(conv)          # text, masks, patches PxF, patch_ids Px3, positions Lx3 (unpadded P)
  batch = row.collate([ex, ...])  # text etc. padded to row.length, patches to the smallest bucket
                                  # of data.native.patch_buckets that holds the batch's longest

A conversation's image part is a still image (encoded bytes, or uint8 H x W x 3) or a video (a video
file's bytes, or uint8 T x H x W x 3 frames). Each becomes data/native_images.py's (or data/video.py's)
patches; its N tokens are N copies of model.family_options.native.placeholder_ids[0] (a video's of
[-1]); with family_options.native.row_break_ids, each row of them ends in a row break and the last in
an image end (Pixtral). Row length L = data.text_len + the largest bucket / merge^2 (the most image
tokens a row holds; twice that with row breaks, one per merged token at most). With
family_options.native.temporal_pool = k > 1 a video stands as the tokens of ceil(t / k) time steps,
each the mean of k tubelets' (the model pools them: token_dest says where each merged token goes).
One compiled train step per bucket: the batch's patch count is the only shape that varies. (With several
processes each makes only its share of a batch, so every batch takes the largest bucket there.)
"""
import numpy as np

from mm_jax.data import images, native_images, video
from mm_jax.data.rows import PlaceholderRows, TooLong, _pad, expanded
from mm_jax.errors import UserError

is_video = video.is_video


def options(config) -> tuple[native_images.NativeImages, native_images.NativeImages, video.VideoSampling]:
  """(image rules, video rules, video sampling) of config.data.native and the encoder's patch fields."""
  n, enc = config.data.native, config.model.encoder
  grid = dict(patch_size=enc.patch_size, temporal_patch=enc.get("temporal_patch", 2),
              merge=enc.get("merge", 2))
  still = native_images.NativeImages(min_pixels=n.min_pixels, max_pixels=n.max_pixels, **grid)
  moving = native_images.NativeImages(min_pixels=n.video_min_pixels, max_pixels=n.video_max_pixels, **grid)
  return still, moving, video.VideoSampling(num_frames=n.video_frames, fps=n.video_fps)


def row_length(config, breaks: bool) -> int:
  """data.text_len + the largest bucket's merged tokens (twice that with row breaks: one per token at
  most): NativeRow.length, and the model's example inputs."""
  tokens = buckets(config)[-1] // config.model.encoder.get("merge", 2) ** 2
  return config.data.text_len + tokens * (1 + breaks)


def buckets(config) -> tuple[int, ...]:
  """data.native.patch_buckets, sorted; each a multiple of merge^2 (whole merge windows)."""
  m2 = config.model.encoder.get("merge", 2) ** 2
  out = tuple(sorted(int(b) for b in config.data.native.patch_buckets))
  if not out or any(b < m2 or b % m2 for b in out):
    raise UserError(f"data.native.patch_buckets {out} must be positive multiples of merge^2 = {m2}; "
                    f"set --config.data.native.patch_buckets")
  return out


class NativeRow(PlaceholderRows):
  """Builds native rows for one config (module docstring)."""

  def __init__(self, config, tokenizer, placeholder_ids: tuple[int, ...],
               row_break_ids: tuple[int, ...] = (), temporal_pool: int = 1):
    d = config.data
    self._tok, self._template = tokenizer, d.chat_template
    self.still, self.moving, self.sampling = options(config)
    self.buckets = buckets(config)
    self.max_images, self.text_len = d.max_images, d.text_len
    self.max_pixels, self.blind = d.max_image_pixels, d.blind
    self.image_id, self.video_id = placeholder_ids[0], placeholder_ids[-1]
    self.min_side, self.still_frame = d.native.min_side, d.native.still_frame
    self.breaks, self.pool = tuple(row_break_ids), temporal_pool
    if temporal_pool > 1:
      self.eval_keys = self.eval_keys + ("token_dest",)
    self.length = row_length(config, bool(self.breaks))
    self.features = 3 * self.still.temporal_patch * self.still.patch_size ** 2

  def _small(self, h: int, w: int, what: str) -> None:
    if min(h, w) < self.min_side:
      raise ValueError(f"{what} is {w}x{h} pixels, a side under data.native.min_side={self.min_side}; "
                       "drop it, or lower --config.data.native.min_side")

  def _media(self, x) -> tuple[np.ndarray, tuple[int, int, int], bool]:
    """(patches, grid, is a video) of one image part."""
    if is_video(x):
      frames, fps = (x, 0.0) if isinstance(x, np.ndarray) else video.read(bytes(x))
      self._small(*frames.shape[1:3], "a video")
      if self.still_frame:  # the single-frame baseline: the middle frame, as an image
        patches, grid = native_images.image_patches(frames[len(frames) // 2], self.moving)
        return patches, grid, False
      keep = video.sample_indices(len(frames), fps, self.sampling, self.moving.temporal_patch)
      patches, grid = video.video_patches(frames[keep], self.moving)
      return patches, grid, True
    if isinstance(x, (bytes, np.bytes_)):
      x = images.decode(bytes(x), self.max_pixels)
    self._small(*x.shape[:2], "an image")
    patches, grid = native_images.image_patches(x, self.still)
    return (np.zeros_like(patches) if self.blind else patches), grid, False

  def _example(self, conv, r) -> dict:
    if conv.num_images > self.max_images:
      raise TooLong("image slots", conv.num_images, self.max_images, "max_images")
    spans, patches, patch_ids, dest = [], [], [], []
    blocks = [1]  # attention blocks: images, and videos' time steps

    def place(m: int, at: int) -> list[int]:
      x, grid, moving = self._media(conv.images[m])
      patches.append(x)
      patch_ids.append(native_images.patch_ids(grid, self.still.merge, blocks[0]))
      blocks[0] += grid[0]
      k = self.pool if moving else 1
      first = sum(native_images.num_tokens(g, self.still.merge) for _, g in spans)
      per_step = native_images.num_tokens((1, *grid[1:]), self.still.merge)
      steps = np.arange(grid[0] * per_step) // per_step  # each merged token's time step
      dest.append(first + steps // k * per_step + np.arange(len(steps)) % per_step)
      grid = (-(-grid[0] // k), *grid[1:])  # the tokens' grid: time steps pooled
      spans.append((at, grid))
      return native_images.image_tokens(grid, self.still.merge, self.video_id if moving else self.image_id,
                                        self.breaks)

    ids, mask_ar, loss = expanded(r, place)
    text_tokens = len(ids) - sum(native_images.num_tokens(g, self.still.merge, bool(self.breaks))
                                 for _, g in spans)
    if text_tokens > self.text_len:
      raise TooLong("text tokens", text_tokens, self.text_len, "text_len")
    n_patches = sum(len(x) for x in patches)
    if n_patches > self.buckets[-1]:
      raise TooLong("patches", n_patches, self.buckets[-1], "native.patch_buckets")
    return dict(text=np.asarray(ids, np.int32), mask_ar=np.asarray(mask_ar, np.int32),
                mask_loss=np.asarray(loss, np.int32),
                positions=native_images.mrope_positions(len(ids), spans, self.still.merge,
                                                        bool(self.breaks)).astype(np.int32),
                patches=(np.concatenate(patches) if patches else np.zeros((0, self.features), np.float32)),
                patch_ids=(np.concatenate(patch_ids) if patch_ids else np.zeros((0, 3), np.int32)),
                **({"token_dest": np.concatenate(dest or [np.zeros(0)]).astype(np.int32)} if self.pool > 1
                   else {}))

  eval_keys = ("patches", "patch_ids", "positions", "text", "mask_input")

  def blank(self, ids: list[int]) -> dict:
    """An example of `ids` alone, no image (eval's padding rows)."""
    n = len(ids)
    return dict(text=np.asarray(ids, np.int32), mask_ar=np.zeros([n], np.int32),
                mask_loss=np.zeros([n], np.int32),
                positions=np.broadcast_to(np.arange(n, dtype=np.int32)[:, None], (n, 3)).copy(),
                patches=np.zeros((0, self.features), np.float32), patch_ids=np.zeros((0, 3), np.int32),
                **({"token_dest": np.zeros(0, np.int32)} if self.pool > 1 else {}))

  def bucket(self, n_patches: int) -> int:
    return next(b for b in self.buckets if b >= n_patches)

  def pad(self, ex: dict, n_patches: int | None = None) -> dict:
    """One example in a row of self.length, its patches padded to n_patches (default: the largest
    bucket, one shape for every eval batch)."""
    n, length = len(ex["text"]), self.length
    p = self.buckets[-1] if n_patches is None else n_patches
    segment = np.zeros([length], np.int32)
    segment[:n] = 1
    out = {k: _pad(ex[k], length) for k in ("text", "mask_ar", "mask_loss")}
    out["mask_ar"][n:] = 1
    positions = np.zeros([length, 3], np.int32)
    positions[:n] = ex["positions"]
    positions[n:] = (ex["positions"].max() + 1 if n else 0) + np.arange(length - n)[:, None]
    patches = np.zeros([p, self.features], np.float32)
    patches[:len(ex["patches"])] = ex["patches"]
    patch_ids = np.zeros([p, 3], np.int32)
    patch_ids[:len(ex["patch_ids"])] = ex["patch_ids"]
    extra = {"skipped": ex["skipped"]} if "skipped" in ex else {}  # data.bad_records=skip's mark
    if "token_dest" in ex:  # padding's merged tokens go nowhere (dest N: segment_sum drops it)
      n_tokens = p // self.still.merge ** 2
      extra["token_dest"] = np.full([n_tokens], n_tokens, np.int32)
      extra["token_dest"][:len(ex["token_dest"])] = ex["token_dest"]
    return dict(out, mask_input=segment.copy(), segment=segment, positions=positions, patches=patches,
                patch_ids=patch_ids, **extra)

  def collate(self, examples: list[dict], largest: bool = False) -> dict:
    """Unpadded examples -> one batch, patches padded to the bucket of the longest (largest: to the
    largest bucket, the one shape every process's share of a global batch agrees on)."""
    p = self.buckets[-1] if largest else self.bucket(max(len(ex["patches"]) for ex in examples))
    rows = [self.pad(ex, p) for ex in examples]
    return {k: np.stack([r[k] for r in rows]) for k in rows[0]}

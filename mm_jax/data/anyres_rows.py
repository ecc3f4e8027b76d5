r"""Rows of the anyres family: each image a base view plus the tiles of its pinpoint canvas, its tokens
placeholders in the text, and where each token's feature comes from.

  row = AnyResRow(config, tokenizer, placeholder_ids, pinpoints, (max_tiles, max_tokens))
  ex = row.train(conv)       # text, masks, tiles Tx S x S x 3, token_src K (data/anyres.py)
  batch_row = row.pad(ex)    # tiles to max_tiles, token_src to max_tokens, text to row.length

An image of any size costs 1 + rows * cols tiles and its unpadded token count (data/anyres.py); a row
holds at most data.max_images images on the largest pinpoint, so every batch has one shape. Tiles are
normalised as data.image_processor says: CLIP's mean / std for "clip" (LLaVA-NeXT's), else 0.5 / 0.5.
"""
import numpy as np

from mm_jax.data import anyres, images
from mm_jax.data.rows import PlaceholderRows, TooLong, _pad, expanded


class AnyResRow(PlaceholderRows):
  """Builds anyres rows for one config (module docstring)."""

  def __init__(self, config, tokenizer, placeholder_ids, pinpoints, limits: tuple[int, int]):
    d = config.data
    self._tok, self._template = tokenizer, d.chat_template
    clip = d.image_processor.startswith("clip")
    mean, std = (images.OPENAI_CLIP_MEAN, images.OPENAI_CLIP_STD) if clip else (images.SIGLIP_MEAN,
                                                                               images.SIGLIP_STD)
    self.opts = anyres.AnyRes(size=d.image_size, pinpoints=tuple(map(tuple, pinpoints)), mean=mean, std=std)
    self.side = d.image_size // config.model.encoder.patch_size
    self.max_tiles, self.max_tokens = limits
    self.max_images, self.text_len, self.max_pixels, self.blind = d.max_images, d.text_len, d.max_image_pixels, d.blind
    self.image_id = placeholder_ids[0]
    self.length = d.text_len + self.max_tokens

  def _example(self, conv, r) -> dict:
    if conv.num_images > self.max_images:
      raise TooLong("image slots", conv.num_images, self.max_images, "max_images")
    tiles, src = [], []

    def place(m: int, at: int) -> list[int]:
      del at
      x = conv.images[m]
      if isinstance(x, (bytes, np.bytes_)):
        x = images.decode(bytes(x), self.max_pixels)
      views, grid = anyres.tiles(x, self.opts)
      s = anyres.token_sources(x.shape[:2], grid, self.side)
      offset = sum(len(t) for t in tiles) * self.side ** 2  # the tiles of the row's earlier images
      src.append(np.where(s < 0, -1, s + offset))
      tiles.append(np.zeros_like(views) if self.blind else views)
      return [self.image_id] * len(s)

    ids, mask_ar, loss = expanded(r, place)
    n_image = sum(len(s) for s in src)
    if len(ids) - n_image > self.text_len:
      raise TooLong("text tokens", len(ids) - n_image, self.text_len, "text_len")
    s = self.opts.size
    return dict(text=np.asarray(ids, np.int32), mask_ar=np.asarray(mask_ar, np.int32),
                mask_loss=np.asarray(loss, np.int32),
                tiles=np.concatenate(tiles) if tiles else np.zeros((0, s, s, 3), np.float32),
                token_src=np.concatenate(src).astype(np.int32) if src else np.zeros((0,), np.int32))

  eval_keys = ("tiles", "token_src", "text", "mask_input")

  def blank(self, ids: list[int]) -> dict:
    """An example of `ids` alone, no image (eval's padding rows)."""
    n, s = len(ids), self.opts.size
    return dict(text=np.asarray(ids, np.int32), mask_ar=np.zeros([n], np.int32),
                mask_loss=np.zeros([n], np.int32), tiles=np.zeros((0, s, s, 3), np.float32),
                token_src=np.zeros((0,), np.int32))

  def pad(self, ex: dict) -> dict:
    """One example in a row of self.length, tiles and token sources padded to the row's limits."""
    n, length, s = len(ex["text"]), self.length, self.opts.size
    segment = np.zeros([length], np.int32)
    segment[:n] = 1
    out = {k: _pad(ex[k], length) for k in ("text", "mask_ar", "mask_loss")}
    out["mask_ar"][n:] = 1
    tiles = np.zeros([self.max_tiles, s, s, 3], np.float32)
    tiles[:len(ex["tiles"])] = ex["tiles"]
    src = np.zeros([self.max_tokens], np.int32)
    src[:len(ex["token_src"])] = ex["token_src"]
    extra = {"skipped": ex["skipped"]} if "skipped" in ex else {}
    return dict(out, mask_input=segment.copy(), segment=segment,
                positions=np.arange(length, dtype=np.int32), tiles=tiles, token_src=src, **extra)

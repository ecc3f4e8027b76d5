r"""A conversation -> the arrays of one row of the decoder's input, and packed rows -> the model's keys.

  row = Row(config, tokenizer, in_sequence=True, tokens_per_image=16)
  example = row.train(conv)        # unpadded: text, mask_ar, mask_loss, image, image_pos (relative)
  batch_row = row.pad(example)     # one example per row, padded to row.length
  prompt = row.prompt(conv)        # the conversation before its last answer, and that answer

The conversation is rendered by its chat template (data.chat_template, data/chat.py): one placeholder
token per image. Families that put image tokens in the sequence (unified, fuyu, hybrid's thumbnail) get
N = tokens_per_image slots in its place, image_pos the first of them; the cross family gets none, and
image_pos is the first token that sees the image (keep_placeholder, Llama 3.2 Vision's form: the
placeholder stays in the text as an ordinary token, and sees the image from itself on). A row holds
data.max_images image slots; the empty ones have image_pos = the row length (never placed, never seen).

Row length L: data.text_len text tokens plus, in-sequence, max_images x N image slots. Keys of a row,
as the vqa task's model takes them (models/vlm.py):
  image [M, S, S, 3] float32, text/mask_ar/mask_loss/mask_input/segment/positions [L] int32,
  image_pos [M] int32. segment: the example of each token (1, 2, ... packed; 0 padding).
"""
import numpy as np

from mm_jax.data import chat, images
from mm_jax.data import tokenizer as tokenizer_lib
from mm_jax.data.conversation import Conversation


def row_length(data_cfg, tokens_per_image: int) -> int:
  """L: data.text_len text tokens plus max_images x the image tokens one image puts in the sequence."""
  return data_cfg.text_len + data_cfg.max_images * tokens_per_image


class TooLong(ValueError):
  """An example that does not fit the row: needs `n` of `budget` (text tokens or image slots)."""

  def __init__(self, what: str, n: int, budget: int, field: str):
    self.n, self.budget, self.field = n, budget, field
    super().__init__(f"needs {n} {what} but --config.data.{field} allows {budget}")


class Row:
  """Builds rows for one model layout (in_sequence, tokens_per_image) and one config's data fields."""

  def __init__(self, config, tokenizer, *, in_sequence: bool, tokens_per_image: int,
               keep_placeholder: bool = False):
    d = config.data
    self._tok, self._template = tokenizer, d.chat_template
    self.in_sequence, self.n, self.keep_placeholder = in_sequence, tokens_per_image, keep_placeholder
    self.max_images, self.size, self.blind = d.max_images, d.image_size, d.blind
    self.processor, self.max_pixels = d.image_processor, d.max_image_pixels
    self.text_len = d.text_len
    self.length = row_length(d, tokens_per_image if in_sequence else 0)

  # --- one example, unpadded ---

  def train(self, conv: Conversation) -> dict:
    """The example's tokens, masks and images, unpadded (packing concatenates several)."""
    return self._example(conv, chat.render(self._template, self._tok, conv))

  def prompt(self, conv: Conversation) -> tuple[dict, str]:
    """(the example of the conversation up to its last answer, ending in the generation prompt; that
    answer): what the evaluator decodes from and scores against."""
    before, answer = conv.until_last_answer()
    rendered = chat.render(self._template, self._tok, conv, generation=True)
    return self._example(before, rendered), answer

  def _example(self, conv: Conversation, r) -> dict:
    if conv.num_images > self.max_images:
      raise TooLong("image slots", conv.num_images, self.max_images, "max_images")
    ids, mask_ar, loss, image_pos = [], [], [], [0] * conv.num_images
    for i, token in enumerate(r.ids):
      m = r.image[i]
      if m >= 0:  # the image's placeholder: N slots in the sequence, or none (cross-attended)
        image_pos[m] = len(ids)
      if m >= 0 and not self.keep_placeholder:
        k = self.n if self.in_sequence else 0
        ids += [tokenizer_lib.PAD_ID] * k
        mask_ar += [0 if r.prefix[i] else 1] * k
        loss += [0] * k
        continue
      ids.append(token)
      mask_ar.append(0 if r.prefix[i] else 1)
      loss.append(int(r.loss[i]))
    text_tokens = len(ids) - (conv.num_images * self.n if self.in_sequence else 0)
    if text_tokens > self.text_len:
      raise TooLong("text tokens", text_tokens, self.text_len, "text_len")
    order = conv.image_order()
    pixels = [self._pixels(conv.images[m]) for m in order]
    return dict(text=np.asarray(ids, np.int32), mask_ar=np.asarray(mask_ar, np.int32),
                mask_loss=np.asarray(loss, np.int32),
                image=np.stack(pixels) if pixels else np.zeros([0, self.size, self.size, 3], np.float32),
                image_pos=np.asarray([image_pos[m] for m in order], np.int32))

  def _pixels(self, image) -> np.ndarray:
    if self.blind:
      return np.zeros([self.size, self.size, 3], np.float32)
    if isinstance(image, (bytes, np.bytes_)):
      image = images.decode(bytes(image), self.max_pixels)
    return images.preprocess(self.processor, image, self.size)

  # --- rows ---

  def pad(self, ex: dict) -> dict:
    """One example in a row of self.length, image slots filled to max_images."""
    n, length = len(ex["text"]), self.length
    segment = np.zeros([length], np.int32)
    segment[:n] = 1
    out = {k: _pad(ex[k], length) for k in ("text", "mask_ar", "mask_loss")}
    out["mask_ar"][n:] = 1  # padding: causal, as before packing
    out.update(mask_input=segment.copy(), segment=segment, positions=np.arange(length, dtype=np.int32),
               **self._image_slots(ex["image"], ex["image_pos"]))
    return out

  def _image_slots(self, image_MxSxSx3, image_pos_M) -> dict:
    m = len(image_pos_M)
    image = np.zeros([self.max_images, self.size, self.size, 3], np.float32)
    image[:m] = image_MxSxSx3
    pos = np.full([self.max_images], self.length, np.int32)
    pos[:m] = image_pos_M
    return dict(image=image, image_pos=pos)

  def packed(self, p: dict) -> dict:
    """A row of grain's FirstFitPackIterDataset (keys text, text_segment_ids, text_positions, image,
    image_segment_ids, image_pos relative to its example, ...) -> the model's keys."""
    segment, length = p["text_segment_ids"].astype(np.int32), self.length
    starts = {s: int(np.argmax(segment == s)) for s in np.unique(segment) if s}
    img_seg = p["image_segment_ids"]
    pos = np.full([self.max_images], length, np.int32)
    for j, s in enumerate(img_seg):
      if s:
        pos[j] = starts[int(s)] + p["image_pos"][j]
    mask_ar = np.where(segment > 0, p["mask_ar"], 1).astype(np.int32)
    return dict(text=p["text"], mask_ar=mask_ar, mask_loss=p["mask_loss"],
                mask_input=(segment > 0).astype(np.int32), segment=segment,
                positions=p["text_positions"].astype(np.int32), image=p["image"].astype(np.float32),
                image_pos=pos)

  def lengths(self) -> dict:
    """grain packing's length_struct for train() examples."""
    return dict(text=self.length, mask_ar=self.length, mask_loss=self.length, image=self.max_images,
                image_pos=self.max_images)


class PlaceholderRows:
  """What the rows of families whose image tokens replace placeholders share (native_rows, anyres_rows):
  train / prompt render the conversation (self._template, self._tok) and call self._example."""

  def train(self, conv: Conversation) -> dict:
    return self._example(conv, chat.render(self._template, self._tok, conv))

  def prompt(self, conv: Conversation) -> tuple[dict, str]:
    before, answer = conv.until_last_answer()
    return self._example(before, chat.render(self._template, self._tok, conv, generation=True)), answer


def expanded(r, place) -> tuple[list[int], list[int], list[int]]:
  """(ids, mask_ar, mask_loss) of a rendered conversation with image m's placeholder replaced by
  place(m, its position) -> its token ids (no loss on them; in the prefix where the placeholder was)."""
  ids, mask_ar, loss = [], [], []
  for i, token in enumerate(r.ids):
    m = r.image[i]
    new = [token] if m < 0 else place(m, len(ids))
    ids += new
    mask_ar += [0 if r.prefix[i] else 1] * len(new)
    loss += [int(r.loss[i]) if m < 0 else 0] * len(new)
  return ids, mask_ar, loss


def _pad(x: np.ndarray, length: int) -> np.ndarray:
  out = np.zeros([length], np.int32)
  out[:len(x)] = x
  return out

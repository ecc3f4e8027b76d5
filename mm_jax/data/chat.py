r"""Chat templates: a Conversation -> token ids with loss, prefix and image marks, as the families we import
format their chats.

  chat.check("gemma", tok)                     # UserError naming a special token the tokenizer lacks
  r = chat.render("gemma", tok, conv)          # training: r.ids, r.loss, r.prefix, r.image
  p = chat.render("gemma", tok, conv, generation=True)  # up to the last answer + the generation prompt
  chat.stop_id("gemma", tok)                   # the token that ends an answer: <end_of_turn>

Each image is ONE placeholder id in `ids` (r.image[i] = m on the placeholder of Image(m), -1 elsewhere),
where the conversation places it; the caller expands it to the model's image tokens or removes it.
r.loss marks the assistant turns' content and their end-of-turn token; r.prefix the bidirectional block
of a prefix-LM (plain, paligemma), all False for the causal templates.

The templates, rendered in Python; their ids equal transformers' (tests/test_chat.py) for:
  plain      our small-data layout: [images] bos question answer eos (question answer eos)..., each text
             its own encode; the placeholder is <image>, or unk where the tokenizer has none
  paligemma  PaliGemmaProcessor: <image>s bos prefix "\n" | suffix eos
  gemma      Gemma 3 (google/gemma-3-*-it chat_template): <start_of_turn>user\n...<end_of_turn>\n, images
             as <start_of_image>, a system turn prefixed to the first user turn, text trimmed
  llama3     Llama 3.2 Vision (meta-llama/Llama-3.2-11B-Vision-Instruct): header tokens, <|image|>, the
             dated system block when there are no images (date fixed to the template's "26 Jul 2024")
  llava      llava-hf/llava-1.5-7b-hf's "USER: <image>\n... ASSISTANT:", each answer ending in eos as in
             LLaVA-1.5's training conversations (the hf template ends answers with " " and no eos)
Where the reference moves a turn's images to its start (llava) or all prefix images first (paligemma),
conversations that already place them there render the same.
"""
import dataclasses
from typing import Callable

from mm_jax.data.conversation import Conversation, Image, Turn
from mm_jax.errors import UserError

LLAMA3_DATE = "26 Jul 2024"  # the Llama 3.2 template's own default; a rendered example never depends on today


@dataclasses.dataclass
class Rendered:
  ids: list[int]
  loss: list[bool]     # trained on: the assistant turns' content and their end-of-turn token
  prefix: list[bool]   # the bidirectional block of a prefix-LM; all False for causal templates
  image: list[int]     # m on the placeholder of Image(m), -1 on text


@dataclasses.dataclass(frozen=True)
class _Seg:
  text: str            # the text, or a special token's string
  special: bool
  id: int = -1         # a special token's id
  loss: bool = False
  prefix: bool = False
  image: int = -1


class _Doc:
  """Chunks of segments. A chunk is tokenized as one string, as transformers tokenizes a rendered template
  (text after a special token gets no dummy prefix); separate chunks are separate encodes."""

  def __init__(self, tok):
    self.tok, self.chunks = tok, [[]]

  def chunk(self) -> "_Doc":
    if self.chunks[-1]:
      self.chunks.append([])
    return self

  def text(self, text: str, loss=False, prefix=False) -> None:
    if text:
      self.chunks[-1].append(_Seg(text, False, loss=loss, prefix=prefix))

  def token(self, token: str, loss=False, prefix=False, image=-1) -> None:
    i = self.tok.token_to_id(token)
    if i is None:
      raise ValueError(f"the tokenizer has no {token!r}")
    self.chunks[-1].append(_Seg(token, True, i, loss, prefix, image))

  def id(self, i: int | None, what: str, loss=False, prefix=False, image=-1) -> None:
    if i is None:
      raise ValueError(f"the tokenizer has no {what} token")
    self.chunks[-1].append(_Seg(self.tok.pieces([i])[0], True, i, loss, prefix, image))


def _tokenize(tok, chunks) -> Rendered:
  out = Rendered([], [], [], [])

  def add(i, loss, prefix, image):
    out.ids.append(int(i))
    out.loss.append(bool(loss))
    out.prefix.append(bool(prefix))
    out.image.append(image)

  for chunk in chunks:
    if all(s.special for s in chunk):
      for s in chunk:
        add(s.id, s.loss, s.prefix, s.image)
      continue
    text, specials, segs = "", [], []
    for s in chunk:
      segs.append((len(text), len(text) + len(s.text), s))
      if s.special:
        specials.append(segs[-1][:2])
      text += s.text
    ids, spans = tok.encode_chat(text, specials)
    flags = [None] * len(text)
    for start, end, s in segs:
      flags[start:end] = [s] * (end - start)
    image = {(start, end): s.image for start, end, s in segs if s.special}
    for i, (start, end) in zip(ids, spans):
      covered = flags[start:max(end, start + 1)]  # an empty span (a byte-fallback piece) takes the next char
      add(i, any(s.loss for s in covered), any(s.prefix for s in covered), image.get((start, end), -1))
  return out


def _runs(parts):
  """A turn's parts with consecutive texts joined: str or Image, in order."""
  out = []
  for p in parts:
    if isinstance(p, str) and out and isinstance(out[-1], str):
      out[-1] += p
    elif isinstance(p, Image) or p:
      out.append(p)
  return out


def _first_answer(turns) -> int:
  return next((i for i, t in enumerate(turns) if t.role == "assistant"), len(turns))


# --- the templates: (doc, turns, train, generation prompt wanted) -> segments in doc ---

def _plain(doc: _Doc, turns: tuple[Turn, ...], train: bool) -> None:
  tok, answer = doc.tok, _first_answer(turns)
  image = tok.token_to_id("<image>")
  image = tok.unk_id if image is None else image
  bos = False  # placed before the first text of the prefix, else at the prefix's end
  for i, turn in enumerate(turns):
    pre, loss = i < answer, train and turn.role == "assistant"
    for p in _runs(turn.parts):
      if isinstance(p, Image):
        doc.chunk().id(image, "<image> or unk", prefix=pre, image=p.index)
        continue
      if not bos:
        doc.chunk().id(tok.bos_id, "bos", prefix=True)
        bos = True
      doc.chunk().text(p, loss, pre)  # its own encode, as the question and the answer always were
    if i + 1 == answer and not bos:
      doc.chunk().id(tok.bos_id, "bos", prefix=True)
      bos = True
    if turn.role == "assistant":
      doc.chunk().id(tok.eos_id, "eos", loss=loss)
  if not bos:
    doc.chunk().id(tok.bos_id, "bos", prefix=True)


def _paligemma(doc: _Doc, turns: tuple[Turn, ...], train: bool) -> None:
  tok, answer = doc.tok, _first_answer(turns)
  before = turns[:answer]
  for m in (p.index for t in before for p in t.parts if isinstance(p, Image)):
    doc.token("<image>", prefix=True, image=m)
  doc.id(tok.bos_id, "bos", prefix=True)
  doc.text("\n".join(t.text for t in before if t.text) + "\n", prefix=True)
  for turn in turns[answer:]:
    loss = train and turn.role == "assistant"
    doc.chunk()
    for p in _runs(turn.parts):
      if isinstance(p, Image):
        doc.token("<image>", image=p.index)
      else:
        doc.text(p, loss)
    if turn.role == "assistant":
      doc.id(tok.eos_id, "eos", loss=loss)
    else:
      doc.text("\n")


def _gemma(doc: _Doc, turns: tuple[Turn, ...], train: bool, prompt: bool) -> None:
  system = None
  if turns and turns[0].role == "system":
    _text_only(turns[0], "gemma")
    system, turns = turns[0].text, turns[1:]
  doc.id(doc.tok.bos_id, "bos")
  for i, turn in enumerate(turns):
    if (turn.role == "user") != (i % 2 == 0):
      raise ValueError(f"chat template 'gemma' needs user and assistant turns alternating, user first, "
                       f"after an optional system turn; turn {i} is {turn.role!r}")
    loss = train and turn.role == "assistant"
    doc.token("<start_of_turn>")
    role = "model" if turn.role == "assistant" else turn.role
    doc.text(role + "\n" + (system + "\n\n" if i == 0 and system is not None else ""))
    for p in turn.parts:
      if isinstance(p, Image):
        doc.token("<start_of_image>", image=p.index)
      else:
        doc.text(p.strip(), loss)  # jinja's trim, item by item
    doc.token("<end_of_turn>", loss=loss)
    doc.text("\n")
  if prompt:
    doc.token("<start_of_turn>")
    doc.text("model\n")


def _llama3(doc: _Doc, turns: tuple[Turn, ...], train: bool, prompt: bool) -> None:
  system = ""
  if turns and turns[0].role == "system":
    _text_only(turns[0], "llama3")
    system, turns = turns[0].text.strip(), turns[1:]
  images = any(isinstance(p, Image) for t in turns for p in t.parts)
  if images and system:
    raise ValueError("chat template 'llama3' (Llama 3.2 Vision's) does not take a system turn in a "
                     "conversation with images; drop the system turn")
  doc.id(doc.tok.bos_id, "bos")

  def header(role):
    doc.token("<|start_header_id|>")
    doc.text(role)
    doc.token("<|end_header_id|>")
    doc.text("\n\n")

  if not images:
    header("system")
    doc.text(f"Cutting Knowledge Date: December 2023\nToday Date: {LLAMA3_DATE}\n\n{system}")
    doc.token("<|eot_id|>")
  for turn in turns:
    loss = train and turn.role == "assistant"
    header(turn.role)
    for p in turn.parts:
      if isinstance(p, Image):
        doc.token("<|image|>", image=p.index)
      else:
        doc.text(p, loss)
    doc.token("<|eot_id|>", loss=loss)
  if prompt:
    header("assistant")


def _llava(doc: _Doc, turns: tuple[Turn, ...], train: bool, prompt: bool) -> None:
  doc.id(doc.tok.bos_id, "bos")  # the processor's, outside the template: "USER" keeps its "▁"
  doc.chunk()
  for turn in turns:
    loss = train and turn.role == "assistant"
    if turn.role != "system":
      doc.text(turn.role.upper() + ": ")
    for p in _runs(turn.parts):
      if isinstance(p, Image):
        doc.token("<image>", image=p.index)
        doc.text("\n")
      elif turn.role == "assistant":
        doc.text(p, loss)
      else:
        doc.text(p + " ")
    if turn.role == "assistant":
      doc.id(doc.tok.eos_id, "eos", loss=loss)
  if prompt:
    doc.text("ASSISTANT:")


def _text_only(turn: Turn, name: str) -> None:
  if any(isinstance(p, Image) for p in turn.parts):
    raise ValueError(f"chat template {name!r} takes no images in the system turn; move them to a user turn")


@dataclasses.dataclass(frozen=True)
class Template:
  doc: str                      # one line, for --help
  tokens: tuple[str, ...]       # the special tokens it writes, besides bos and eos
  stop: str                     # the token that ends an answer ("eos": the tokenizer's)
  build: Callable               # (doc, turns, train, prompt) -> None


TEMPLATES = {
    "plain": Template("[images] bos question answer eos ...: our small-data layout, prefix-LM", (),
                      "eos", lambda d, t, train, _: _plain(d, t, train)),
    "paligemma": Template("PaliGemma: <image>s bos prefix \\n, suffix eos; prefix-LM", ("<image>",), "eos",
                          lambda d, t, train, _: _paligemma(d, t, train)),
    "gemma": Template("Gemma 3: <start_of_turn>user ... <end_of_turn>, images as <start_of_image>",
                      ("<start_of_turn>", "<end_of_turn>", "<start_of_image>"), "<end_of_turn>", _gemma),
    "llama3": Template("Llama 3.2 Vision: <|start_header_id|>user<|end_header_id|> ... <|eot_id|>, <|image|>",
                       ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|image|>"),
                       "<|eot_id|>", _llama3),
    "llava": Template("LLaVA-1.5: USER: <image>\\n... ASSISTANT: ...</s>", ("<image>",), "eos", _llava),
}


def _get(name: str) -> Template:
  if name not in TEMPLATES:
    raise UserError(f"unknown chat template {name!r}; set --config.data.chat_template to one of "
                    f"{', '.join(TEMPLATES)}")
  return TEMPLATES[name]


def render(template_name: str, tokenizer, conversation, *, generation: bool = False) -> Rendered:
  """The conversation's ids and marks under the template. generation=True: up to (not including) its last
  assistant turn, ending in the generation prompt, loss all False. Raises ValueError (one line) where the
  conversation does not fit the template or its text holds a special token."""
  template, conv = _get(template_name), conversation
  if generation:
    conv, _ = conversation.until_last_answer()
  doc = _Doc(tokenizer)
  template.build(doc, conv.turns, not generation, generation)
  out = _tokenize(tokenizer, doc.chunks)
  placed = [m for m in out.image if m >= 0]
  if placed != conv.image_order():
    raise ValueError(f"chat template {template_name!r} placed images {placed} of {conv.image_order()}")
  return out


def stop_id(template_name: str, tokenizer) -> int | None:
  """The id that ends an answer under the template: where generation stops."""
  stop = _get(template_name).stop
  return tokenizer.eos_id if stop == "eos" else tokenizer.token_to_id(stop)


def check(template_name: str, tokenizer) -> None:
  """Raises UserError (one line: the missing token and the fix) if the tokenizer lacks what the template
  writes."""
  template = _get(template_name)
  fix = ("use the model's own tokenizer (its tokenizer.json or .model holds it) or set "
         f"--config.data.chat_template to a template the tokenizer has tokens for ({', '.join(TEMPLATES)})")
  for what in ("bos", "eos") if template.stop == "eos" else ("bos",):
    if getattr(tokenizer, f"{what}_id") is None:
      raise UserError(f"chat template {template_name!r} needs a {what} token, which the tokenizer lacks; "
                      f"name it ({what}_token) in the tokenizer_config.json beside the tokenizer.json, or {fix}")
  for token in template.tokens:
    if tokenizer.token_to_id(token) is None:
      raise UserError(f"chat template {template_name!r} needs the special token {token!r}, which the "
                      f"tokenizer lacks; {fix}")
  if template_name == "plain" and tokenizer.token_to_id("<image>") is None and tokenizer.unk_id is None:
    raise UserError("chat template 'plain' places images as <image> or the unk token, and the tokenizer has "
                    f"neither; {fix}")
  trial = Conversation((Turn("user", (Image(0), "hi")), Turn("assistant", ("ok",))), images=(b"",))
  try:
    render(template_name, tokenizer, trial)
    render(template_name, tokenizer, trial, generation=True)
  except ValueError as e:
    raise UserError(f"chat template {template_name!r} cannot render with this tokenizer: {e}; {fix}") from e

r"""Input formats of `python -m mm_jax.data.prepare`: one JSON record -> a Conversation of image paths.

  for line, raw in formats.read_records("train.jsonl"):    # a .json list or JSONL (UserError if empty)
    fmt = formats.get("llava")                           # or formats.detect(first_record)
    conv = fmt.parse(json.loads(raw))                    # images = the record's image paths

A format is a module with parse(record) -> Conversation (checked; a one-line ValueError naming the
field, the problem and the fix otherwise) and detect(record) -> bool. A new format: its module and its
line in FORMATS. Placeholders: each "<image>" in a text is the next image, in its place; one "\n" right
after it is dropped (the data writes "<image>\n" before the question), nothing else moves.
"""
import json

from etils import epath

from mm_jax.data.conversation import Image, Part
from mm_jax.errors import UserError

PLACEHOLDER = "<image>"


def text_parts(text: str, first: int) -> list[Part]:
  """The parts of `text`: its "<image>" placeholders as Image(first), Image(first + 1), ..."""
  parts, pieces = [], text.split(PLACEHOLDER)
  for k, piece in enumerate(pieces):
    if k:
      parts.append(Image(first + k - 1))
      piece = piece[1:] if piece.startswith("\n") else piece
    if piece:
      parts.append(piece)
  return parts


def check_count(placeholders: int, images: int, field: str) -> None:
  if placeholders != images:
    raise ValueError(f"the text has {placeholders} {PLACEHOLDER} placeholders but {field} has "
                     f"{images} images; make them match (one {PLACEHOLDER} per image)")


def field_type(value, name: str, want: type) -> None:
  if not isinstance(value, want):
    kind = {str: "a string", list: "a list", dict: "an object"}[want]
    raise ValueError(f"{name} is {_json_type(value)}, not {kind}; fix the record")


def _json_type(value) -> str:
  if value is None:
    return "null"
  return {str: "a string", list: "a list", dict: "an object", bool: "a boolean",
          int: "a number", float: "a number"}.get(type(value), type(value).__name__)


def read_records(path: str) -> list[tuple[int, object]]:
  """(line, record) of every record of a file: JSONL (record = the line's bytes, parsed later, in the
  workers; blank lines are no records) or one JSON list (record = the parsed element; the list is
  parsed here, so a syntax error stops the import whatever --bad_records says)."""
  try:
    data = epath.Path(path).read_bytes()
  except FileNotFoundError:
    raise UserError(f"--input {path}: no such file; give an existing .json or .jsonl file") from None
  except OSError as e:
    raise UserError(f"--input {path} cannot be read ({e.strerror or e}); check the path") from None
  if data.lstrip()[:1] == b"[":
    records = _json_list(path, data)
  else:
    records = [(i + 1, line) for i, line in enumerate(data.split(b"\n")) if line.strip()]
  if not records:
    raise UserError(f"{path}:1 has no records (the file is empty); give a .json list or JSONL file "
                    "with at least one record")
  return records


def _json_list(path: str, data: bytes) -> list[tuple[int, object]]:
  try:
    text = data.decode("utf-8")
  except UnicodeDecodeError as e:
    line = data[:e.start].count(b"\n") + 1
    raise UserError(f"{path}:{line} is not UTF-8 text; fix the file's encoding") from None
  decoder, records = json.JSONDecoder(), []
  pos, line, counted = text.index("[") + 1, 1, 0
  while True:
    pos = _skip_space(text, pos)
    if pos < len(text) and text[pos] == "]" and not records:
      break
    line += text.count("\n", counted, pos)
    counted = pos
    try:
      record, pos = decoder.raw_decode(text, pos)
    except json.JSONDecodeError as e:
      raise UserError(f"{path}:{e.lineno} is not valid JSON ({e.msg}, column {e.colno}); fix the file "
                      "(a broken JSON list cannot be read past it)") from None
    records.append((line, record))
    pos = _skip_space(text, pos)
    if pos < len(text) and text[pos] == ",":
      pos += 1
    elif pos < len(text) and text[pos] == "]":
      break
    else:
      lineno = text.count("\n", 0, pos) + 1
      raise UserError(f"{path}:{lineno} is not valid JSON (expected ',' or ']' after a record); "
                      "fix the file")
  if text[pos + 1:].strip():
    lineno = text.count("\n", 0, pos + 1) + 1
    raise UserError(f"{path}:{lineno} has text after the JSON list's ']'; fix the file")
  return records


def _skip_space(text: str, pos: int) -> int:
  while pos < len(text) and text[pos] in " \t\r\n":
    pos += 1
  return pos


def parse_json(raw) -> dict:
  """A record as read_records gives it -> its dict (ValueError: malformed JSON, or not an object)."""
  if not isinstance(raw, (bytes, str)):
    record = raw
  else:
    try:
      record = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
      raise ValueError(f"the line is not valid JSON ({msg}); fix it (one JSON object a line)") from None
  if not isinstance(record, dict):
    raise ValueError(f"the record is {_json_type(record)}, not a JSON object; fix it")
  return record


# The formats use the helpers above, so they are imported once those are defined.
# pylint: disable=g-import-not-at-top,wrong-import-position
from mm_jax.data.formats import llava, messages  # isort: skip
# pylint: enable=g-import-not-at-top,wrong-import-position

FORMATS = {"llava": llava, "messages": messages}


def get(name: str):
  if name not in FORMATS:
    raise UserError(f"--format={name} is unknown; use one of {', '.join(FORMATS)} (or leave it out "
                    "to detect it from the first record)")
  return FORMATS[name]


def detect(record, where: str) -> str:
  """The name of the format that `record` (the first of the input) is in."""
  try:
    record = parse_json(record)
  except ValueError as e:
    raise UserError(f"{where} {e}") from None
  for name, fmt in FORMATS.items():
    if fmt.detect(record):
      return name
  keys = ", ".join(sorted(record)) or "none"
  raise UserError(f"{where} is in no known format (its keys: {keys}); give records with "
                  "'conversations' (llava) or 'messages' (messages), or name one with --format")

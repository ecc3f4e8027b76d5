"""The input formats of mm_jax.data.prepare: records -> Conversations of image paths, and their errors."""
import json

import pytest

from mm_jax.data import export, formats
from mm_jax.data.conversation import Conversation, Image, Turn
from mm_jax.data.formats import llava, messages
from mm_jax.errors import UserError


def _llava(*turns, **record):
  return {"conversations": [{"from": f, "value": v} for f, v in turns], **record}


def test_llava_placeholder_in_place_and_its_newline_dropped():
  conv = llava.parse(_llava(("human", "<image>\nWhat color?"), ("gpt", "red"), id=7, image="a.png"))
  assert conv.turns == (Turn("user", (Image(0), "What color?")), Turn("assistant", ("red",)))
  assert conv.images == ("a.png",) and conv.id == "7"
  conv = llava.parse(_llava(("system", "Be brief."), ("human", "Left <image> right <image>\nsame?"),
                            ("gpt", "no"), image=["l.png", "r.png"]))
  assert conv.turns[0] == Turn("system", ("Be brief.",))
  assert conv.turns[1].parts == ("Left ", Image(0), " right ", Image(1), "same?")
  assert conv.images == ("l.png", "r.png")


def test_llava_images_without_placeholder_go_first_in_the_first_human_turn():
  conv = llava.parse(_llava(("system", "s"), ("human", "Compare."), ("gpt", "same"),
                            images=["a.png", "b.png"]))
  assert conv.turns[1].parts == (Image(0), Image(1), "Compare.")
  assert llava.parse(_llava(("human", "hi"), ("gpt", "hello"))).images == ()  # text only


@pytest.mark.parametrize("record,message", [
    (_llava(("human", "<image><image>"), ("gpt", "x"), image="a.png"),
     "the text has 2 <image> placeholders but 'image' has 1 images"),
    (_llava(("human", "<image>"), ("gpt", "x")), "the text has 1 <image> placeholders but 'image' has 0"),
    (_llava(("human", "x"), ("bot", "y")), "conversations[1].from is 'bot', an unknown role"),
    (_llava(("human", "x"), ("human", "y")), "no assistant turn"),
    (_llava(("gpt", "x"), image="a.png"), "no human turn"),
    (_llava(("human", "x"), ("gpt", "y"), image="a", images=["b"]), "both 'image' and 'images'"),
    (_llava(("human", "x"), ("gpt", "y"), image="a", video="b.mp4"), "both 'image' and 'video'"),
    (_llava(("human", 3), ("gpt", "y")), "conversations[0].value is a number, not a string"),
    (_llava(("human", "x"), ("gpt", "y"), image=[""]), "image[0] is '', not a file path"),
    ({"image": "a.png"}, "no 'conversations'"),
])
def test_llava_errors_name_the_field_and_the_problem(record, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")) as e:
    llava.parse(record)
  assert "\n" not in str(e.value) and ";" in str(e.value)  # one line: the problem; the fix


def test_videos_are_llava_video_s_key_and_messages_video_parts():
  conv = llava.parse(_llava(("human", "<image>\nwhich way?"), ("gpt", "left"), video="v/1.mp4"))
  assert conv.turns[0].parts == (Image(0), "which way?") and conv.images == ("v/1.mp4",)
  conv = messages.parse({"images": ["a.png"], "messages": [
      {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "image"},
                                   {"type": "text", "text": "same?"}]},
      {"role": "assistant", "content": "no"}]})
  assert conv.turns[0].parts == (Image(0), Image(1), "same?") and conv.images == ("v.mp4", "a.png")


def test_messages_placeholders_and_parts_take_the_listed_images_in_order():
  conv = messages.parse({"messages": [
      {"role": "user", "content": "<image>What color?"}, {"role": "assistant", "content": "red"}],
      "images": ["a.png"]})
  assert conv.turns[0].parts == (Image(0), "What color?") and conv.images == ("a.png",)
  conv = messages.parse({"id": "x", "images": ["a.png", "b.png"], "messages": [
      {"role": "system", "content": "s"},
      {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "vs"},
                                   {"type": "image", "image": "own.png"}]},
      {"role": "assistant", "content": "<image>\nthis one"}]})
  assert conv.turns[1].parts == (Image(0), "vs", Image(1))
  assert conv.turns[2].parts == (Image(2), "this one")
  assert conv.images == ("a.png", "own.png", "b.png") and conv.id == "x"


@pytest.mark.parametrize("record,message", [
    ({"messages": [{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
      "images": ["a", "b"]}, "the text has 1 <image> placeholders but 'images' has 2 images"),
    ({"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "image"}]},
                   {"role": "assistant", "content": "x"}], "images": ["a"]},
     "the text has 2 <image> placeholders but 'images' has 1 images"),
    ({"messages": [{"role": "human", "content": "x"}, {"role": "assistant", "content": "x"}]},
     "messages[0].role is 'human', an unknown role"),
    ({"messages": [{"role": "user", "content": "x"}]}, "no assistant turn"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "<image>x"}]},
                   {"role": "assistant", "content": "y"}], "images": ["a"]}, "holds <image>"),
    ({"messages": [{"role": "user", "content": [{"type": "video"}]},
                   {"role": "assistant", "content": "y"}]}, "content[0].video is None, not a video path"),
    ({"messages": [{"role": "user", "content": [{"type": "audio"}]},
                   {"role": "assistant", "content": "y"}]}, "type is 'audio'"),
    ({"messages": [{"role": "user", "content": None}, {"role": "assistant", "content": "y"}]},
     "messages[0].content is null"),
])
def test_messages_errors_name_the_field_and_the_problem(record, message):
  with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
    messages.parse(record)


def test_the_exported_records_parse_back_to_the_conversation():
  conv = Conversation(turns=(Turn("user", (Image(0), Image(1), "which has more red?")),
                             Turn("assistant", ("the left",)), Turn("user", ("why?",)),
                             Turn("assistant", ("more",))), images=("a.png", "b.png"), id="t/1/x")
  assert llava.parse(json.loads(json.dumps(export.llava_record(conv)))) == conv
  for parts in (False, True):
    assert messages.parse(json.loads(json.dumps(export.messages_record(conv, parts)))) == conv


def test_read_records_jsonl_and_json_list_with_their_lines(tmp_path):
  (tmp_path / "a.jsonl").write_text('{"a": 1}\n\n{"a": 2}\n')
  assert formats.read_records(str(tmp_path / "a.jsonl")) == [(1, b'{"a": 1}'), (3, b'{"a": 2}')]
  (tmp_path / "a.json").write_text('[\n  {"a": 1},\n  {"a":\n 2}\n]\n')
  assert formats.read_records(str(tmp_path / "a.json")) == [(2, {"a": 1}), (3, {"a": 2})]
  (tmp_path / "bad.json").write_text('[\n  {"a": 1},\n  {"a" 2}\n]\n')
  with pytest.raises(UserError, match=r"bad.json:3 is not valid JSON"):
    formats.read_records(str(tmp_path / "bad.json"))
  for text in ("", "\n\n", "[]"):
    (tmp_path / "empty.jsonl").write_text(text)
    with pytest.raises(UserError, match="has no records"):
      formats.read_records(str(tmp_path / "empty.jsonl"))
  with pytest.raises(ValueError, match="not valid JSON"):
    formats.parse_json(b'{"a": ')
  with pytest.raises(ValueError, match="a list, not a JSON object"):
    formats.parse_json(b"[1]")


def test_detect_and_get():
  assert formats.detect(b'{"conversations": []}', "f:1") == "llava"
  assert formats.detect({"messages": []}, "f:1") == "messages"
  with pytest.raises(UserError, match=r"f:1 is in no known format \(its keys: text\)"):
    formats.detect({"text": "x"}, "f:1")
  with pytest.raises(UserError, match="--format=sharegpt is unknown; use one of llava, messages"):
    formats.get("sharegpt")

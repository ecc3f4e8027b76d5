"""mm_jax.predict: prompts with images placed by <image> or first, the bad inputs through the command
(each one line naming it), and the trained shapes default answering colour questions about PNGs this
test draws (not from the dataset)."""
import json
import subprocess
import sys

import pytest
from PIL import Image, ImageDraw

from conftest import REPO
from mm_jax.data import shapes
from mm_jax.data.conversation import Image as ImagePart
from mm_jax.errors import UserError
from mm_jax import predict
from test_prepare import bomb_png



def _draw(path, shape: str, color: str, quadrant: int, size: int = 20):
  """One shape on a grey background, in the quadrant's middle, drawn here with PIL."""
  img = Image.new("RGB", (64, 64), (222, 220, 215))
  x, y = 32 * (quadrant % 2) + (32 - size) // 2, 32 * (quadrant // 2) + (32 - size) // 2
  box, fill = (x, y, x + size - 1, y + size - 1), shapes.COLORS[color]
  draw = ImageDraw.Draw(img)
  if shape == "circle":
    draw.ellipse(box, fill=fill)
  elif shape == "square":
    draw.rectangle(box, fill=fill)
  else:
    draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) / 2, box[1])], fill=fill)
  img.save(path)
  return str(path)


def test_images_go_where_the_prompt_puts_them(tmp_path):
  a, b = _draw(tmp_path / "a.png", "circle", "red", 0), _draw(tmp_path / "b.png", "square", "blue", 1)
  first = predict.conversation(dict(id="0", prompt="which?", images=[a, b]), 10**6)
  assert first.turns[0].parts == (ImagePart(0), ImagePart(1), "which?")
  placed = predict.conversation(dict(id="0", prompt="first <image> then <image>?", images=[a, b]), 10**6)
  assert placed.turns[0].parts == ("first ", ImagePart(0), " then ", ImagePart(1), "?")
  assert [t.role for t in placed.turns] == ["user", "assistant"]
  with pytest.raises(UserError, match="2 <image> but 1 images"):
    predict.conversation(dict(id="0", prompt="<image> and <image>", images=[a]), 10**6)


def _predict(*args, cwd=REPO):
  return subprocess.run([sys.executable, "-m", "mm_jax.predict", *args], cwd=cwd, capture_output=True,
                        text=True, check=False)


@pytest.fixture(scope="module")
def trained(trained_default):
  """The session's trained default (conftest.trained_default)."""
  return trained_default[0]


@pytest.mark.slow  # the session's trained default (~2 min, once for predict and lmms-eval)
def test_the_trained_default_answers_colour_questions_about_drawn_images(trained, tmp_path):
  cases = [(s, c, q) for q, (s, c) in enumerate(zip(shapes.SHAPES * 2, shapes.COLORS))]
  lines = [dict(id=f"{c}_{s}", prompt=f"what color is the {s}?",
                image=_draw(tmp_path / f"{c}_{s}.png", s, c, q % 4)) for s, c, q in cases]
  (tmp_path / "q.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
  out = _predict(f"--workdir={trained / 'run'}", f"--input={tmp_path / 'q.jsonl'}", "--json")
  assert out.returncode == 0, out.stderr[-2000:]
  got = {r["id"]: r["prediction"] for r in map(json.loads, out.stdout.splitlines())}
  assert got == {f"{c}_{s}": c for s, c, _ in cases}
  assert out.stderr.strip() == "", out.stderr  # results only: no library notices
  one = _predict(f"--workdir={trained / 'run'}", "--prompt=what color is the circle?",
                 f"--image={_draw(tmp_path / 'one.png', 'circle', 'orange', 3)}")
  assert one.stdout.strip() == "orange", one.stderr[-2000:]
  sampled = [_predict(f"--workdir={trained / 'run'}", f"--input={tmp_path / 'q.jsonl'}", "--temperature=1.5",
                      "--top_k=5", f"--seed={s}").stdout for s in (3, 3)]
  assert sampled[0] == sampled[1] and len(sampled[0].splitlines()) == len(cases)


@pytest.mark.slow  # each case one command
def test_bad_inputs_are_one_line_naming_them(trained, tmp_path):
  run = str(trained / "run")
  good = _draw(tmp_path / "good.png", "circle", "red", 0)
  (tmp_path / "bad.png").write_bytes(b"not an image")
  (tmp_path / "bomb.png").write_bytes(bomb_png())
  (tmp_path / "lines.jsonl").write_text('{"prompt": "what?", "image": "good.png"}\n{"image": "x"}\n')
  cases = {
      "missing image": ([f"--workdir={run}", "--prompt=q", f"--image={tmp_path / 'nope.png'}"],
                        "nope.png does not exist"),
      "unreadable image": ([f"--workdir={run}", "--prompt=q", f"--image={tmp_path / 'bad.png'}"],
                           "bad.png: image bytes cannot be decoded"),
      "over the pixel limit": ([f"--workdir={run}", "--prompt=q", f"--image={tmp_path / 'bomb.png'}"],
                               "over data.max_image_pixels"),
      "no checkpoint": ([f"--workdir={tmp_path / 'empty'}", "--prompt=q", f"--image={good}"],
                        "no checkpoint in"),
      "bad jsonl line": ([f"--workdir={run}", f"--input={tmp_path / 'lines.jsonl'}"], "line 2"),
      "bad sampling": ([f"--workdir={run}", "--prompt=q", f"--image={good}", "--top_p=0"], "--top_p"),
  }
  for name, (args, said) in cases.items():
    out = _predict(*args)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 1 and len(lines) == 1 and said in lines[0], (name, out.stderr[-1500:])
    assert lines[0].startswith("mm_jax.predict: error: "), name

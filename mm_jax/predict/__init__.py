r"""Ask a trained model about your own images, from its workdir.

  python -m mm_jax.predict --workdir=W --image=cat.png [--image=dog.jpg] --prompt="which is bigger?"
  python -m mm_jax.predict --workdir=W --input=questions.jsonl [--json]
      [--step=N] [--temperature=0.7 --top_k=40 --top_p=0.9 --seed=0] [--max_new=32]

The newest checkpoint (or --step) on the current devices, with the config it was trained with (stored
in the checkpoint), its tokenizer, chat template and image processor. Each image takes one `<image>` in
the prompt; a prompt without them gets the images first. --input: one JSON object per line,
{"prompt": str, "image": path | [paths], "id": optional}, image paths relative to the file's folder.
Prints each answer (with --json: one JSON line with id, prompt, images, prediction). Greedy unless
--temperature > 0; the same --seed gives the same answers. Every image is read and checked before the
model is loaded.
"""
import json
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.experimental import multihost_utils

from mm_jax import data
from mm_jax.data import chat, images, pipeline, rows
from mm_jax.data.conversation import Conversation, Image, Turn
from mm_jax.errors import UserError
from mm_jax.eval import decode as decoding
from mm_jax.eval.evaluate import restore_params, stored_config
from mm_jax.eval.sample import Sampling
from mm_jax.train import sharding
from mm_jax.train.state import ModelOnMesh

PLACEHOLDER = "<image>"

def questions(prompt: str | None, image_paths, input_path: str | None) -> list[dict]:
  """[{id, prompt, images: [paths]}] from --prompt/--image or --input."""
  if bool(input_path) == (prompt is not None):
    raise UserError("give --prompt (with --image=PATH for each image) or --input=FILE.jsonl, not both")
  if prompt is not None:
    return [dict(id="0", prompt=prompt, images=list(image_paths))]
  if not os.path.isfile(input_path):
    raise UserError(f"--input={input_path} does not exist; give a JSONL file of "
                    '{"prompt": ..., "image": path | [paths]} lines')
  root, out = os.path.dirname(os.path.abspath(input_path)), []
  with open(input_path, encoding="utf-8") as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        d = json.loads(line)
        prompt, paths = d["prompt"], d.get("image", [])
      except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise UserError(f"--input={input_path} line {n}: not a JSON object with a \"prompt\" "
                        f"({type(e).__name__}); write one {{\"prompt\", \"image\"}} object per line") from None
      paths = [paths] if isinstance(paths, str) else list(paths)
      out.append(dict(id=str(d.get("id", n)), prompt=prompt, images=[os.path.join(root, p) for p in paths],
                      where=f"--input={input_path} line {n}"))
  if not out:
    raise UserError(f"--input={input_path} holds no questions; write one JSON object per line")
  return out


def conversation(q: dict, max_pixels: int) -> Conversation:
  """The question as a conversation (user turn, then the assistant's turn to fill), images checked;
  q["images"]: paths, or encoded images (bytes)."""
  where = q.get("where", "--image")
  blobs = []
  for i, path in enumerate(q["images"]):
    if isinstance(path, bytes):  # an encoded image already in memory (mm_jax.eval.lmms)
      blob, path = path, f"image {i}"
    elif not os.path.isfile(path):
      raise UserError(f"{where}: image file {path} does not exist; give the path of a PNG or JPEG file")
    else:
      with open(path, "rb") as f:
        blob = f.read()
    try:
      images.decode(blob, max_pixels)
    except images.ImageError as e:
      raise UserError(f"{where}: {path}: {e}") from None
    blobs.append(blob)
  pieces = q["prompt"].split(PLACEHOLDER)
  if len(pieces) == 1:
    parts = [*map(Image, range(len(blobs))), q["prompt"]]
  elif len(pieces) - 1 == len(blobs):
    parts = [pieces[0]] + [x for i, text in enumerate(pieces[1:]) for x in (Image(i), text)]
  else:
    raise UserError(f"{where}: the prompt has {len(pieces) - 1} {PLACEHOLDER} but {len(blobs)} images "
                    f"are given; give one --image per {PLACEHOLDER}, or no {PLACEHOLDER} at all")
  return Conversation(turns=(Turn("user", tuple(p for p in parts if p != "")), Turn("assistant", ("",))),
                      images=tuple(blobs), id=q["id"])


class Loaded(NamedTuple):
  """A workdir's checkpoint loaded once (load): answers many questions without reloading (predict,
  mm_jax.eval.lmms)."""
  config: mlc.ConfigDict  # the config it was trained with
  step: int
  tokenizer: Any
  row: rows.Row           # conversations -> the model's rows
  mm: ModelOnMesh
  params: Any
  stop: int | None        # the chat template's end-of-answer token


def load(workdir: str, step: int | None) -> Loaded:
  """The newest checkpoint (or `step`) on the current devices, with its config, tokenizer and rows."""
  config, step = stored_config(workdir, step)
  if config.model.family == "siglip":
    raise UserError(f"{workdir} holds a siglip model, which outputs no text; predict needs a model of "
                    "a family that answers (unified, cross, hybrid, fuyu, lm)")
  tokenizer = data.load_tokenizer(config)
  mesh = sharding.make_mesh(config.mesh)
  mm = ModelOnMesh.create(config, tokenizer.vocab_size, mesh)
  _, params = restore_params(workdir, mm, step)
  return Loaded(config, step, tokenizer, pipeline.row_layout(config, tokenizer), mm, params,
                chat.stop_id(config.data.chat_template, tokenizer))


def batches(m: Loaded, items: list[dict]):
  """(start, n, arrays) over `items` (dicts of numpy arrays, the same keys and shapes) in batches of
  eval.batch_size rounded to the mesh's split, the last padded with copies of its first row: start its
  first row's index, n its real rows, arrays this process's block of it as global arrays."""
  mesh = m.mm.mesh
  dp = sharding.data_parallel_size(mesh)  # rows per batch: the questions, rounded up to the mesh's split
  b = min(m.config.eval.batch_size, -(-len(items) // dp) * dp)
  sharding.check_batch(b, mesh, field="eval.batch_size")
  share = b // jax.process_count()  # every process built the whole batch and feeds its own block
  mine = slice(jax.process_index() * share, (jax.process_index() + 1) * share)
  for start in range(0, len(items), b):
    chunk = items[start:start + b]
    padded = chunk + [chunk[0]] * (b - len(chunk))
    batch = {k: np.stack([r[k] for r in padded])[mine] for k in chunk[0]}
    yield start, len(chunk), sharding.to_global(batch, mesh)


def answer(m: Loaded, examples: list[dict], sampling: Sampling, seed: int, max_new: int | None) -> list[str]:
  """The answer to each example (Row.prompt's, unpadded); question i samples with fold_in(seed, i)."""
  max_new = max_new or m.config.model.max_answer_len
  batch_sh = sharding.batch_sharding(m.mm.mesh)
  stop = m.stop
  run = jax.jit(lambda p, image, text, mask, plen, pos, key: decoding.decode(
      m.mm.model, p, image, text, mask, plen, max_new, image_pos=pos, sampling=sampling, key=key,
      stop_ids=() if stop is None else (stop,)),
      in_shardings=(m.mm.param_shardings, *([batch_sh] * 5), None), out_shardings=batch_sh)
  keys = ("image", "text", "mask_input", "image_pos")
  items = [dict({k: v for k, v in m.row.pad(ex).items() if k in keys},
                prefix_len=np.int32(len(ex["text"]))) for ex in examples]
  answers = []
  for start, n, arrays in batches(m, items):
    b = arrays["text"].shape[0]
    # each question's key by its index in the input: its answer does not depend on the batching
    key = jax.vmap(lambda i: jax.random.fold_in(jax.random.key(seed), i))(jnp.arange(start, start + b))
    with m.mm.context():
      tokens = run(m.params, *(arrays[k] for k in ("image", "text", "mask_input", "prefix_len", "image_pos")),
                   key)
    for ids in np.asarray(multihost_utils.process_allgather(tokens, tiled=True))[:n]:
      ids = ids.tolist()
      answers.append(m.tokenizer.decode(ids[:ids.index(stop)] if stop in ids else ids).strip())
  return answers


def predict(workdir: str, qs: list[dict], step: int | None, sampling: Sampling, seed: int,
            max_new: int | None) -> list[dict]:
  config, _ = stored_config(workdir, step)
  convs = [conversation(q, config.data.max_image_pixels) for q in qs]  # checked before the model loads
  m = load(workdir, step)
  examples = []
  for q, conv in zip(qs, convs):
    try:
      ex, _ = m.row.prompt(conv)
    except ValueError as e:
      raise UserError(f"{q.get('where', '--prompt')}: {e}") from None
    examples.append(ex)
  answers = answer(m, examples, sampling, seed, max_new)
  return [dict(id=q["id"], prompt=q["prompt"], images=q["images"], prediction=a, step=m.step)
          for q, a in zip(qs, answers)]

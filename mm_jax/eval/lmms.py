r"""lmms-eval's model `mm_jax`: a trained workdir runs the field's benchmarks (lmms-eval tasks).

  pip install torch==2.13.0 && pip install -e '.[lmms]' && pip install --no-deps lmms-eval==0.7.3
  python -m mm_jax.eval.lmms --config=configs/shapes_tiny.py --out=DIR [--split=test]
  HF_DATASETS_OFFLINE=1 HF_HUB_OFFLINE=1 python -m lmms_eval --model mm_jax \
      --model_args workdir=W[,step=N,seed=0] --tasks mm_jax_shapes_test --include_path DIR

lmms-eval goes in without its requirements: they pin a protobuf below ours (pyproject.toml's `lmms`
extra holds what it imports). It finds the model by this package's entry point (group
lmms_eval.models). The second command writes a split's questions, exactly those mm_jax.eval scores, as
a local task (DIR/<split>.jsonl, DIR/images/*.png, DIR/mm_jax_<data.name>_<split>.yaml) scored by
lmms-eval's own exact_match, which like mm_jax's compares the stripped strings: its accuracy is
mm_jax.eval's.

The model is loaded once (mm_jax.predict.load). generate_until: predict's decoding, greedy unless the
gen_kwargs sample, at most max_new_tokens (else model.max_answer_len) tokens, cut at the chat template's
stop token and at the task's `until` strings; images (doc_to_visual's) where the prompt's <image>s are,
else before it. loglikelihood: (-sum log p(continuation tokens | context, images), whether greedy
decoding gives them), from the training forward on the conversation whose answer is the continuation.
The sign: lmms-eval 0.7.3 ranks multiple_choice by argmin, as its own models return their loss.
"""
import dataclasses
import io
import itertools
import json
import os

NAME = "mm_jax"
MODULE = "mm_jax.eval.lmms"  # not __name__: the yaml and the entry point name it also under -m


def manifest():
  """The entry point's payload: lmms-eval imports MmJax when a run names --model mm_jax. Defined before
  lmms_eval is imported, since that import loads the entry points, this one included."""
  from lmms_eval.models.registry_v2 import ModelManifest  # pylint: disable=g-import-not-at-top
  return ModelManifest(model_id=NAME, simple_class_path=f"{MODULE}.MmJax")


# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from lmms_eval.api.model import lmms
from lmms_eval.api.registry import register_model
from PIL import Image as PILImage

from mm_jax import data, predict as predicting
from mm_jax.data.conversation import Image, Turn
from mm_jax.errors import UserError
from mm_jax.eval.sample import Sampling
from mm_jax.tasks import TASKS, forward
from mm_jax.train import sharding
# pylint: enable=g-import-not-at-top,wrong-import-position


@register_model(NAME)
class MmJax(lmms):
  """A workdir's newest checkpoint (or `step`) as a simple lmms-eval model (context + visuals)."""

  def __init__(self, workdir: str, step: int | None = None, seed: int = 0, batch_size=None, **_):
    super().__init__()  # lmms-eval also passes device and max_batch_size: jax places the model itself
    self._m = m = predicting.load(str(workdir), step)
    if str(batch_size).isdigit() and int(batch_size) > 1:  # lmms-eval's default 1: keep eval.batch_size
      m.config.eval.batch_size = int(batch_size)
    self._seed = int(seed)
    self._inputs = TASKS[m.mm.model.task].inputs
    batch_sh = sharding.batch_sharding(m.mm.mesh)

    def scores(params, batch):  # log p of each next token, and whether it is the argmax
      logits_BxLxV = forward(m.mm.model, params, batch)[:, :-1].astype(jnp.float32)
      target_BxL = batch["text"][:, 1:]
      logp_BxL = jnp.take_along_axis(jax.nn.log_softmax(logits_BxLxV), target_BxL[..., None], -1)[..., 0]
      return logp_BxL, jnp.argmax(logits_BxLxV, -1) == target_BxL

    self._scores = jax.jit(scores, in_shardings=(m.mm.param_shardings, {k: batch_sh for k in self._inputs}),
                           out_shardings=batch_sh)

  def _conversation(self, context: str, visuals, where: str):
    """predict's conversation of the prompt and images (PIL, re-encoded losslessly as PNG)."""
    blobs = []
    for v in _flat(visuals):
      if not isinstance(v, PILImage.Image):
        raise UserError(f"{where}: a visual of type {type(v).__name__}, but the mm_jax model reads "
                        "images only; pick an image task")
      buf = io.BytesIO()
      v.convert("RGB").save(buf, format="PNG")
      blobs.append(buf.getvalue())
    return predicting.conversation(dict(id=where, prompt=context, images=blobs, where=where),
                                   self._m.config.data.max_image_pixels)

  def _requests(self, requests):
    """(args, doc, where) of each request; args[-3:] are (doc_id, task, split)."""
    for r in requests:
      doc_id, task, split = r.args[-3:]
      yield r.args, self.task_dict[task][split][doc_id], f"{task}/{split}/{doc_id}"

  def _generate(self, items) -> list[str]:
    """(context, visuals, gen_kwargs, where) -> answers: one decoding run per distinct gen_kwargs."""
    groups, out = {}, [""] * len(items)
    for i, (_, _, kw, _) in enumerate(items):
      groups.setdefault(json.dumps({k: v for k, v in kw.items() if k != "until"}, sort_keys=True,
                                   default=str), []).append(i)
    for group in groups.values():
      kw = items[group[0]][2]
      temperature = 0.0 if kw.get("do_sample") is False else float(kw.get("temperature") or 0)
      try:
        sampling = Sampling(temperature, int(kw.get("top_k") or 0), float(kw.get("top_p") or 1.0))
      except ValueError as e:
        raise UserError(f"{e}; fix the task's generation_kwargs (or --gen_kwargs)") from None
      examples = []
      for i in group:
        context, visuals, _, where = items[i]
        try:
          examples.append(self._m.row.prompt(self._conversation(context, visuals, where))[0])
        except ValueError as e:
          raise UserError(f"{where}: {e}; pick a task with shorter prompts or fewer images") from None
      max_new = int(kw["max_new_tokens"]) if kw.get("max_new_tokens") else None
      for i, a in zip(group, predicting.answer(self._m, examples, sampling, self._seed, max_new)):
        until = items[i][2].get("until") or []
        for stop in [until] if isinstance(until, str) else until:
          a = a.split(stop)[0] if stop else a
        out[i] = a.strip()
    return out

  def generate_until(self, requests) -> list[str]:
    return self._generate([(args[0], args[2](doc), dict(args[1] or {}), where)
                           for args, doc, where in self._requests(requests)])

  def generate_until_multi_round(self, requests) -> list[list[str]]:
    """Every doc's answers, round by round (round r of all docs decoded together); after each, the
    task's doc_to_text(doc, previous_output=, round_idx=, previous_round_info=) gives (visuals, the next
    context, done, the outputs so far, info)."""
    docs = list(self._requests(requests))
    state = [dict(visuals=args[2](doc), context=args[0], outputs=[], info=None, done=False)
             for args, doc, _ in docs]
    for round_idx in itertools.count(1):
      live = [i for i, s in enumerate(state) if not s["done"]]
      if not live:
        break
      answers = self._generate([(state[i]["context"], state[i]["visuals"], dict(docs[i][0][1] or {}),
                                 docs[i][2]) for i in live])
      for i, a in zip(live, answers):
        s, (args, doc, _) = state[i], docs[i]
        visuals, context, done, outputs, info = args[3](
            doc, previous_output=s["outputs"] + [a], round_idx=round_idx, previous_round_info=s["info"])
        s.update(visuals=s["visuals"] if visuals is None else visuals, context=context,
                 outputs=list(outputs), info=info, done=bool(done))
    return [s["outputs"] for s in state]

  def loglikelihood(self, requests) -> list[tuple[float, bool]]:
    items, spans = [], []  # spans: [first, end) of the continuation's tokens in each row
    for args, doc, where in self._requests(requests):
      context, target, doc_to_visual = args[:3]
      continuation = str(target if isinstance(target, str) else target(doc)).strip()
      conv = self._conversation(context, doc_to_visual(doc), where)
      conv = dataclasses.replace(conv, turns=conv.turns[:-1] + (Turn("assistant", (continuation,)),))
      try:
        ex = self._m.row.train(conv)
      except ValueError as e:
        raise UserError(f"{where}: {e}; pick a task with shorter prompts and answers") from None
      scored = np.flatnonzero(ex["mask_loss"])  # the answer's tokens, then its end-of-turn token
      last = int(scored[-1])
      spans.append((int(scored[0]), last + int(ex["text"][last] != self._m.stop)))
      items.append({k: v for k, v in self._m.row.pad(ex).items() if k in self._inputs})
    out = []
    for start, n, arrays in predicting.batches(self._m, items):
      with self._m.mm.context():
        logp_BxL, greedy_BxL = self._scores(self._m.params, arrays)
      logp_BxL, greedy_BxL = (np.asarray(multihost_utils.process_allgather(x, tiled=True))[:n]
                              for x in (logp_BxL, greedy_BxL))
      for (first, end), lp, g in zip(spans[start:start + n], logp_BxL, greedy_BxL):
        # token t is scored by the logits at t - 1: entry t - 1 of the shifted arrays
        out.append((-float(lp[first - 1:end - 1].sum()), bool(g[first - 1:end - 1].all())))
    return out


def _flat(visuals) -> list:
  if visuals is None:
    return []
  if isinstance(visuals, (list, tuple)):
    return [v for x in visuals for v in _flat(x)]
  return [visuals]


def doc_to_visual(doc: dict) -> list:
  """An exported task's images: its PNG files."""
  return [PILImage.open(p).convert("RGB") for p in doc["images"]]


def export(config, split: str, out: str) -> str:
  """Writes the split's questions (every eval element, as mm_jax.eval asks them) as an lmms-eval task
  in `out`; returns the task's name."""
  src = data.get(config.data.name)
  if src.conversations:
    raise UserError(f"data.name={config.data.name!r} holds whole conversations; the export writes "
                    "sources of single questions (shapes, tfds): score it with mm_jax.eval")
  source, out = data.open_source(config, split), os.path.abspath(out)
  os.makedirs(os.path.join(out, "images"), exist_ok=True)
  lines = []
  for j in range(src.num_elements(config.data, len(source), train=False)):
    r, k = src.element(config.data, len(source), j)
    record = source[r]
    conv = src.conversation(record, k)
    before, answer = conv.until_last_answer()
    paths = [os.path.join(out, "images", f"{split}_{r}_{m}.png") for m in conv.image_order()]
    for m, path in zip(conv.image_order(), paths):
      image = conv.images[m]
      if isinstance(image, (bytes, np.bytes_)):  # encoded: as stored
        with open(path, "wb") as f:
          f.write(bytes(image))
      else:  # decoded by the source: PNG keeps its pixels
        PILImage.fromarray(np.asarray(image, np.uint8)).save(path)
    prompt = "".join("<image>" if isinstance(p, Image) else p for t in before.turns for p in t.parts)
    answers = src.references(record, k) if src.references else [answer]
    lines.append(dict(id=j, kind=src.kind(record, k), prompt=prompt, answers=list(answers), images=paths))
  with open(os.path.join(out, f"{split}.jsonl"), "w", encoding="utf-8") as f:
    f.writelines(json.dumps(x, ensure_ascii=False) + "\n" for x in lines)
  name = f"mm_jax_{config.data.name}_{split}"
  with open(os.path.join(out, f"{name}.yaml"), "w", encoding="utf-8") as f:
    f.write(f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    {split}: {json.dumps(os.path.join(out, split + '.jsonl'))}\n"
            f"test_split: {split}\noutput_type: generate_until\n"
            f"doc_to_visual: !function {MODULE}.doc_to_visual\ndoc_to_text: prompt\n"
            "doc_to_target: answers\nmetric_list:\n  - metric: exact_match\n    aggregation: mean\n"
            "    higher_is_better: true\n    ignore_case: false\n    ignore_punctuation: false\n")
  return name


if __name__ == "__main__":
  from absl import flags  # pylint: disable=g-import-not-at-top  # the command's flags only
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  from mm_jax import cli  # pylint: disable=g-import-not-at-top
  from mm_jax.config import files  # pylint: disable=g-import-not-at-top

  _CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:variant]).",
                                            lock_config=True)
  _SPLIT = flags.DEFINE_string("split", "test", "Dataset split: train, validation or test.")
  _OUT = flags.DEFINE_string("out", None, "The task's folder (lmms-eval's --include_path).")

  def main() -> None:
    if _CONFIG.value is None or not _OUT.value:
      raise UserError("--config and --out are required: the data's config and the task's folder")
    name = export(files.complete(_CONFIG.value), _SPLIT.value, _OUT.value)
    print(f"--tasks {name} --include_path {os.path.abspath(_OUT.value)}", flush=True)

  cli.run("mm_jax.eval.lmms", main)

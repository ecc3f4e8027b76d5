"""mm_jax.eval.lmms: lmms-eval (the package registry's, finding the model by its entry point) scores a
trained shapes workdir on the test split exported as a local task, with mm_jax.eval's accuracy and
predictions; its loglikelihood against a direct computation (prefill and forced decoding steps), and
its multi-round generation against single rounds."""
import glob
import json
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO

pytest.importorskip("lmms_eval", reason="lmms-eval is installed apart: pip install --no-deps "
                    "lmms-eval==0.7.3 (README, the test command)")

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np
from lmms_eval.api.instance import Instance
from PIL import Image as PILImage
from PIL import ImageDraw

from mm_jax import predict
from mm_jax.eval import lmms
from mm_jax.train import sharding

OFFLINE = dict(HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _run(*args, env=None):
  out = subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                       check=False, env=env)
  assert out.returncode == 0, out.stderr[-3000:]
  return out


@pytest.fixture(scope="module")
def trained(trained_default):
  """The session's trained default (conftest.trained_default): (root, its config flags)."""
  return trained_default


@pytest.fixture(scope="module")
def model(trained):
  return lmms.MmJax(workdir=str(trained[0] / "run"))


def _docs(model, docs: list[dict]) -> None:
  model.task_dict = {"t": {"test": docs}}  # where the evaluator puts each task's documents


def _request(kind: str, context: str, second, *more, doc_id: int = 0) -> Instance:
  """A request of `kind` about doc `doc_id` of task "t", laid out as lmms-eval's tasks make them:
  (context, gen_kwargs or continuation, doc_to_visual, *more, doc_id, task, split)."""
  args = (context, second, lmms.doc_to_visual, *more, doc_id, "t", "test")
  return Instance(request_type=kind, arguments=args, idx=0, metadata={"task": "t", "doc_id": doc_id,
                                                                      "repeats": 1})


def _shape_doc(path) -> dict:
  """A red circle top left and a blue square bottom right, drawn here."""
  img = PILImage.new("RGB", (64, 64), (222, 220, 215))
  draw = ImageDraw.Draw(img)
  draw.ellipse((6, 6, 25, 25), fill=(215, 30, 30))
  draw.rectangle((38, 38, 57, 57), fill=(30, 70, 220))
  img.save(path)
  return {"images": [str(path)]}


@pytest.mark.slow  # the session's trained default (conftest), then three commands
def test_lmms_eval_scores_the_workdir_as_mm_jax_eval_does(trained, tmp_path):
  work, flags = trained
  said = _run("mm_jax.eval.lmms", *flags, f"--out={tmp_path / 'task'}").stdout.split()
  assert said == ["--tasks", "mm_jax_shapes_test", "--include_path", str(tmp_path / "task")]
  _run("mm_jax.eval", *flags, f"--workdir={work / 'run'}")
  ours = json.loads((work / "run" / "eval" / "test.json").read_text())
  ours_pred = [json.loads(x)["prediction"] for x in
               (work / "run" / "eval" / "test.predictions.jsonl").read_text().splitlines()]
  env = dict(os.environ, HF_HOME=str(tmp_path / "hf"), **OFFLINE)
  _run("lmms_eval", "--model", "mm_jax", "--model_args", f"workdir={work / 'run'}", *said,
       "--output_path", str(tmp_path / "out"), "--log_samples", env=env)
  written = lambda pattern: pathlib.Path(glob.glob(str(tmp_path / "out" / pattern))[0]).read_text()
  theirs = json.loads(written("*_results.json"))["results"]["mm_jax_shapes_test"]["exact_match,none"]
  samples = [json.loads(x) for x in written("*_samples_*.jsonl").splitlines()]
  assert ours["num_examples"] == len(samples) == 200
  assert theirs == pytest.approx(ours["vqa_exact_match"], abs=1e-9)
  assert [s["filtered_resps"] for s in sorted(samples, key=lambda s: s["doc_id"])] == ours_pred
  assert 0 < theirs < 1 and len(set(ours_pred)) >= 8, ours_pred  # answers that vary: a real comparison


@pytest.mark.slow  # the trained workdir of the test above
def test_loglikelihood_is_the_sum_of_the_continuation_s_log_probs(model, tmp_path):
  doc = _shape_doc(tmp_path / "two.png")
  _docs(model, [doc])
  question = "what color is the circle?"
  got = model.generate_until([_request("generate_until", question, {})])
  other = "blue" if got[0] != "blue" else "red"
  cases = [got[0], other, "top left red circle"]  # greedy, another colour, a longer continuation
  scores = model.loglikelihood([_request("loglikelihood", question, c) for c in cases])
  m = model._m  # pylint: disable=protected-access
  ex, _ = m.row.prompt(predict.conversation(dict(id="0", prompt=question, images=doc["images"]), 10**6))
  for c, (nll, greedy) in zip(cases, scores):
    direct, argmax = _forced(m, ex, m.tokenizer.encode(c))
    assert nll == pytest.approx(-direct, rel=1e-4, abs=1e-4), c
    assert greedy == argmax, c
  assert scores[0][1] and not scores[1][1] and scores[0][0] < scores[1][0]
  # a callable target (doc_to_target's) is called on the doc; the empty continuation costs nothing
  assert model.loglikelihood([_request("loglikelihood", question, lambda d: got[0])]) == [
      pytest.approx(scores[0])]
  assert model.loglikelihood([_request("loglikelihood", question, "")]) == [(0.0, True)]


def _forced(m, ex, cont):
  """(sum of log p of `cont` after the prompt example, whether each is the argmax): one prefill, then one
  decode step per token, as mm_jax.eval.decode runs them."""
  row = m.row.pad(ex)
  p, n = len(row["text"]), len(ex["text"])
  k = sharding.data_parallel_size(m.mm.mesh)  # the row k times: the batch splits over the mesh
  b = lambda key: jnp.asarray(np.repeat(row[key][None], k, 0))
  model, variables = m.mm.model, {"params": m.params}
  with m.mm.context():
    cache = model.decoder.init_cache(k, p + len(cont))
    logits_KxPxV, cache, cache_mask = model.apply(variables, b("image"), b("text"), b("mask_input"), cache,
                                                  b("image_pos"), method=model.prefill)
    logits_V, total, argmax = logits_KxPxV[0, n - 1], 0.0, True
    for t, token in enumerate(cont):
      total += float(jax.nn.log_softmax(logits_V.astype(jnp.float32))[token])
      argmax &= int(jnp.argmax(logits_V)) == token
      logits_KxV, cache, cache_mask = model.apply(variables, jnp.full([k], token), jnp.full([k], n + t),
                                                  cache, cache_mask, p + t, method=model.decode_step)
      logits_V = logits_KxV[0]
  return total, argmax


@pytest.mark.slow  # the trained workdir of the tests above
def test_multi_round_asks_each_round_as_generate_until_would(model, tmp_path):
  docs = [_shape_doc(tmp_path / "a.png"), _shape_doc(tmp_path / "b.png")]
  _docs(model, docs)
  rounds = ["what color is the circle?", "what shape is in the bottom right?", "is there a red circle?"]

  def doc_to_text(doc, previous_output, round_idx, previous_round_info):
    done = round_idx >= (2 if doc is docs[0] else 3)  # the first doc stops after two rounds
    return None, None if done else rounds[round_idx], done, previous_output, previous_round_info

  got = model.generate_until_multi_round([
      _request("generate_until_multi_round", rounds[0], {}, doc_to_text, doc_id=i) for i in range(2)])
  single = model.generate_until([_request("generate_until", q, {}, doc_id=1) for q in rounds])
  assert got == [single[:2], single] and all(single), single

r"""Evaluates a checkpoint with the evaluator of its model's task (EVALUATORS): VQA models answer every
question of a split by greedy KV-cached decoding, scored by exact match; contrastive models give
image->text and text->image recall@1 over the split's images whose caption is unique.

  python -m mm_jax.eval --config=configs/shapes_tiny.py --workdir=workdirs/tiny [--split=test] [--step=N]

Restores the params (no optimizer state) of the newest checkpoint, or of --step, onto the current mesh,
whatever mesh wrote it. Prints the score and writes <workdir>/eval/<split>.json.
"""
import functools
import json

import jax
import ml_collections as mlc
import numpy as np
from jax.experimental import multihost_utils

from mm_jax import cli, data
from mm_jax.tasks import contrastive
from mm_jax.train import sharding
from mm_jax.config import validate
from mm_jax.checkpoint import Checkpoints, OtherLayout, workdir_path
from mm_jax.eval.decode import greedy_decode
from mm_jax.errors import UserError
from mm_jax.checkpoint.parts import restore_params_by_name
from mm_jax.train.state import ModelOnMesh

_SPLITS = ("train", "validation", "test")


def restore_params(workdir: str, mm: ModelOnMesh, step: int | None):
  ckpt = Checkpoints(workdir, read_only=True)
  steps = ckpt.all_steps()
  if not steps:
    raise UserError(f"no checkpoint in {ckpt.directory}; train first: python -m mm_jax.train "
                    f"--config=... --workdir={workdir}")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise UserError(f"no checkpoint at step {step} in {ckpt.directory}; available: {steps}")
  try:
    ckpt.check_compatible(step, mm.abstract_params)
    params = ckpt.restore_params(step, mm.abstract_params)
  except OtherLayout:
    params = restore_params_by_name(workdir, step, mm.abstract_params)  # the other layer layout
  ckpt.close()
  return step, params


def evaluate(config: mlc.ConfigDict, workdir: str, split: str = "test", step: int | None = None) -> dict:
  """Runs the evaluator of the model's task (EVALUATORS); writes <workdir>/eval/<split>.json."""
  if split not in _SPLITS:
    raise UserError(f"unknown split {split!r}; use --split= one of {', '.join(_SPLITS)}")
  validate.check_config(config, split, train=False)  # fields, text_len against the split
  mesh = sharding.make_mesh(config.mesh)
  sharding.check_batch(config.eval.batch_size, mesh, field="eval.batch_size")
  tokenizer, source = data.prepare(config, split)
  mm = ModelOnMesh.create(config, tokenizer.vocab_size, mesh)
  step, params = restore_params(workdir, mm, step)
  scores, line = EVALUATORS[mm.model.task](config, mm, params, tokenizer, source)
  result = {"step": step, "split": split, **scores}
  if jax.process_index() == 0:
    out = workdir_path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{split}.json").write_text(json.dumps(result, indent=1))
    print(f"step {step} | {split} | {line}", flush=True)
  return result


def _local_rows(x, mesh, spec) -> np.ndarray:
  """This process's rows of a batch-sharded global array."""
  return np.asarray(multihost_utils.global_array_to_host_local_array(x, mesh, spec))


def vqa(config, mm: ModelOnMesh, params, tokenizer, source) -> tuple[dict, str]:
  """Greedy KV-cached answers to every question of the split, exact match overall and per kind."""
  batch_sh = sharding.batch_sharding(mm.mesh)
  decode = jax.jit(
      functools.partial(greedy_decode, mm.model, max_new=config.model.max_answer_len),
      in_shardings=(mm.param_shardings, batch_sh, batch_sh, batch_sh, batch_sh), out_shardings=batch_sh)

  kinds = data.QUESTION_KINDS
  counts = np.zeros((len(kinds), 2), np.int64)  # per question kind: [correct, total]
  samples = []
  for batch in data.eval_batches(config, tokenizer, source, process_index=jax.process_index(),
                                 process_count=jax.process_count()):
    arrays = sharding.to_global(
        {k: batch[k] for k in ("image", "text", "mask_input", "prefix_len")}, mm.mesh)
    with mm.context():
      tokens = decode(params, arrays["image"], arrays["text"], arrays["mask_input"],
                      arrays["prefix_len"])
    local = _local_rows(tokens, mm.mesh, batch_sh.spec)
    for row, valid, q, a, kind in zip(local, batch["valid"], batch["question"], batch["answer"],
                                      batch["kind"]):
      if not valid:
        continue
      pred = tokenizer.decode(row.tolist()).strip()
      counts[kinds.index(kind)] += (pred == a, 1)
      if len(samples) < config.eval.num_samples:
        samples.append({"question": q, "answer": a, "prediction": pred})
  if jax.process_count() > 1:  # every process holds the counts of its share
    counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
  correct, total = counts.sum(0).tolist()
  result = {"num_examples": total, "vqa_exact_match": correct / max(total, 1),
            "per_kind": {k: c / n for k, (c, n) in zip(kinds, counts.tolist()) if n},
            "samples": samples}
  kind_scores = " ".join(f"{k} {v:.3f}" for k, v in result["per_kind"].items())
  return result, (f"{total} questions | vqa_exact_match {result['vqa_exact_match']:.4f} | "
                  f"{kind_scores}")


def retrieval(config, mm: ModelOnMesh, params, tokenizer, source) -> tuple[dict, str]:
  """Image->text and text->image recall@1 over the images whose caption is unique in the split."""
  batch_sh = sharding.batch_sharding(mm.mesh)
  apply = lambda p, image, text: (mm.model.apply({"params": p}, image, method="embed_image"),
                                  mm.model.apply({"params": p}, text, method="embed_text"))
  embed = jax.jit(apply, in_shardings=(mm.param_shardings, batch_sh, batch_sh),
                  out_shardings=(batch_sh, batch_sh))
  keep = contrastive.unique_indices(data.captions.captions(source))
  img, txt, index = [], [], []
  for batch in data.captions.eval_batches(config, tokenizer, source, keep,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count()):
    arrays = sharding.to_global({k: batch[k] for k in ("image", "text")}, mm.mesh)
    with mm.context():
      img_BxE, txt_BxE = embed(params, arrays["image"], arrays["text"])
    img.append(_local_rows(img_BxE, mm.mesh, batch_sh.spec))
    txt.append(_local_rows(txt_BxE, mm.mesh, batch_sh.spec))
    index.append(batch["index"])
  img, txt, index = (np.concatenate(x) if x else np.zeros((0,)) for x in (img, txt, index))
  if jax.process_count() > 1:  # every process holds the same number of rows (padded): gather them all
    gather = lambda x: np.concatenate(list(multihost_utils.process_allgather(x)))
    img, txt, index = gather(img), gather(txt), gather(index)
  real = index >= 0  # image i and text i come from the same record; only padding rows are dropped
  if not real.any():
    raise UserError(f"no image of the split has a caption of its own ({len(source)} images)")
  scores = contrastive.recall_at_1(img[real], txt[real])
  result = {"num_examples": int(real.sum()), "num_images": len(source), **scores}
  return result, (f"{result['num_examples']} of {len(source)} images (unique captions) | i2t_recall@1 "
                  f"{scores['i2t_recall@1']:.4f} | t2i_recall@1 {scores['t2i_recall@1']:.4f}")


EVALUATORS = {"vqa": vqa, "contrastive": retrieval}

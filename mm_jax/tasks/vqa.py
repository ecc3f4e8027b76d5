"""The vqa task: a decoder answers (or captions) after the image and a text prefix.

Trained on data.train_iterator's batches (the source's question elements, then its caption elements) by
next-token cross-entropy on the suffix tokens (loss_fn, optim.loss_norm); evaluated by greedy
KV-cached answers to every question of the split, exact match overall and per question kind.
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.experimental import multihost_utils

from mm_jax import data
from mm_jax.eval.decode import greedy_decode
from mm_jax.tasks import Task, choice, forward, image_text_batch, local_rows
from mm_jax.train import sharding

LOSS_NORMS = ("example", "token")


def loss_fn(model, params, batch: dict, norm: str = "example") -> jax.Array:
  """Next-token cross-entropy on the loss-masked (suffix) tokens.

  norm="example": the mean over each example's suffix tokens, then over examples (big_vision's
  PaliGemma trainer): a one-word answer weighs as much as a 20-token caption. norm="token": the mean
  over all suffix tokens of the batch (HF transformers), where long targets dominate.
  """
  logits_BxTxV = forward(model, params, batch)[:, :-1].astype(jnp.float32)
  weights_BxT = batch["mask_loss"][:, 1:].astype(jnp.float32)
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["text"][:, 1:])
  if norm == "token":
    return jnp.sum(ce_BxT * weights_BxT) / jnp.maximum(jnp.sum(weights_BxT), 1.0)
  per_example_B = jnp.sum(ce_BxT * weights_BxT, axis=1) / jnp.maximum(jnp.sum(weights_BxT, axis=1), 1.0)
  return jnp.mean(per_example_B)


def _loss(model, params, batch: dict, optim_cfg: mlc.ConfigDict) -> jax.Array:
  return loss_fn(model, params, batch, norm=optim_cfg.loss_norm)


def example_batch(config: mlc.ConfigDict, batch: int = 1) -> dict:
  """Zeros shaped like a training batch (data.train_iterator's keys)."""
  t = config.data.text_len
  out = image_text_batch(config, batch)
  out.update(mask_ar=jnp.zeros((batch, t), jnp.int32), mask_input=jnp.ones((batch, t), jnp.int32),
             mask_loss=jnp.zeros((batch, t), jnp.int32))
  return out


def tokens_per_example(config: mlc.ConfigDict, model) -> int:
  """The decoder's sequence: data.text_len text tokens plus the image tokens that sit in it."""
  return model.num_image_tokens(example_batch(config)["image"].shape) + config.data.text_len


def text_elements(config, src, texts: list, length, train: bool):
  """(tokens, prefix tokens, record, what) of every element data.train_iterator (train) or
  data.eval_batches (the prefix only) makes of a split; texts: its records' source.RecordTexts (None:
  a damaged record, left out); length: text -> its tokens."""
  for j in range(src.num_elements(config.data, len(texts), train)):
    r, k = src.element(config.data, len(texts), j)
    if texts[r] is None:
      continue
    question, answer = texts[r].elements[k]
    prefix = 1 + length(question)  # bos + question
    what = "its caption" if k == src.caption_element else f"question {k} {question!r}"
    yield (prefix + length(answer) + 1 if train else prefix), prefix, r, what


def evaluate(config, mm, params, tokenizer, source) -> tuple[dict, str]:
  """Greedy KV-cached answers to every question of the split, exact match overall and per kind.
  mm: the train.state.ModelOnMesh of the restored params."""
  batch_sh = sharding.batch_sharding(mm.mesh)
  decode = jax.jit(
      functools.partial(greedy_decode, mm.model, max_new=config.model.max_answer_len),
      in_shardings=(mm.param_shardings, batch_sh, batch_sh, batch_sh, batch_sh), out_shardings=batch_sh)

  kinds = data.get(config.data.name).kinds
  counts = np.zeros((len(kinds), 2), np.int64)  # per question kind: [correct, total]
  samples = []
  for batch in data.eval_batches(config, tokenizer, source, process_index=jax.process_index(),
                                 process_count=jax.process_count()):
    arrays = sharding.to_global(
        {k: batch[k] for k in ("image", "text", "mask_input", "prefix_len")}, mm.mesh)
    with mm.context():
      tokens = decode(params, arrays["image"], arrays["text"], arrays["mask_input"],
                      arrays["prefix_len"])
    local = local_rows(tokens, mm.mesh, batch_sh.spec)
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


TASK = Task(
    inputs=("image", "text", "mask_ar", "mask_input"), loss=_loss, check=choice("loss_norm", LOSS_NORMS),
    example_batch=example_batch, train_iterator=data.train_iterator, evaluate=evaluate,
    tokens_per_example=tokens_per_example, text_elements=text_elements)

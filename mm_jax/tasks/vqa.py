"""The vqa task: a decoder answers, captions or chats about images, in conversations.

Trained on data.train_iterator's batches (conversations rendered by their chat template, data/rows.py)
by next-token cross-entropy on the assistant tokens (loss_fn, optim.loss_norm); evaluated by greedy
KV-cached answers to the last question of every conversation of the split, scored by eval.metrics
overall and per kind, every prediction kept.
"""

import json

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.experimental import multihost_utils

from mm_jax import data, models
from mm_jax.data import chat
from mm_jax.data import rows as rows_lib
from mm_jax.eval import metrics
from mm_jax.eval import decode as decoding
from mm_jax.models.flop_count import Sizes
from mm_jax.tasks import Task, choice, forward, local_rows
from mm_jax.train import sharding

LOSS_NORMS = ("example", "token")


def loss_fn(model, params, batch: dict, norm: str = "example") -> jax.Array:
  """Next-token cross-entropy on the loss-masked (assistant) tokens.

  norm="example": the mean over each example's target tokens, then over examples (big_vision's
  PaliGemma trainer): a one-word answer weighs as much as a 20-token caption. Examples are the
  segments (batch["segment"]), so a packed row of three examples counts three, as unpacked.
  norm="token": the mean over all target tokens of the batch (HF transformers).
  """
  logits_BxTxV = forward(model, params, batch)[:, :-1].astype(jnp.float32)
  weights_BxT = batch["mask_loss"][:, 1:].astype(jnp.float32)
  ce_BxT = optax.softmax_cross_entropy_with_integer_labels(logits_BxTxV, batch["text"][:, 1:])
  if norm == "token":
    return jnp.sum(ce_BxT * weights_BxT) / jnp.maximum(jnp.sum(weights_BxT), 1.0)
  t = weights_BxT.shape[1] + 1  # segment ids are < the row length
  per_row = jax.vmap(lambda x, s: jax.ops.segment_sum(x, s, num_segments=t))
  segment_BxT = batch["segment"][:, 1:]
  sum_BxK, count_BxK = per_row(ce_BxT * weights_BxT, segment_BxT), per_row(weights_BxT, segment_BxT)
  is_example_BxK = (count_BxK > 0).astype(jnp.float32)
  per_example_BxK = sum_BxK / jnp.maximum(count_BxK, 1.0)
  return jnp.sum(per_example_BxK * is_example_BxK) / jnp.maximum(jnp.sum(is_example_BxK), 1.0)


def _loss(model, params, batch: dict, optim_cfg: mlc.ConfigDict) -> jax.Array:
  return loss_fn(model, params, batch, norm=optim_cfg.loss_norm)


def example_batch(config: mlc.ConfigDict, batch: int = 1) -> dict:
  """Zeros shaped like a training batch (data.train_iterator's keys; data/rows.py's layout)."""
  l, m, s = row_length(config), config.data.max_images, config.data.image_size
  zeros = lambda *shape: jnp.zeros((batch, *shape), jnp.int32)
  return dict(image=jnp.zeros((batch, m, s, s, 3), jnp.float32), text=zeros(l), mask_ar=zeros(l),
              mask_input=jnp.ones((batch, l), jnp.int32), mask_loss=zeros(l),
              image_pos=jnp.full((batch, m), l, jnp.int32), segment=jnp.ones((batch, l), jnp.int32),
              positions=jnp.broadcast_to(jnp.arange(l, dtype=jnp.int32), (batch, l)))


def row_length(config: mlc.ConfigDict) -> int:
  """L: data.text_len plus, for families with image tokens in the sequence, max_images x their N."""
  return rows_lib.row_length(config.data, models.tokens_per_image(config))


def tokens_per_example(config: mlc.ConfigDict, model) -> int:
  """The decoder's sequence: data.text_len text tokens plus the image tokens that sit in it."""
  del model
  return row_length(config)


def flop_layout(config: mlc.ConfigDict):
  """A training row for the FLOP count: L tokens (image slots inside), max_images images encoded."""
  return Sizes(config.data.image_size, row_length(config)), {"images_per_row": config.data.max_images}


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
  """Greedy KV-cached answers to the last question of every conversation of the split, scored by
  eval.metrics overall and per kind. mm: the train.state.ModelOnMesh of the restored params.
  The result's "predictions": every (id, kind, question, answer, prediction, scores) row."""
  batch_sh = sharding.batch_sharding(mm.mesh)
  names = tuple(config.eval.metrics)
  stop = chat.stop_id(config.data.chat_template, tokenizer)  # e.g. <end_of_turn>, not always eos
  own = getattr(mm.model, "prefill_keys", None)  # a model's own prefill inputs (native: patch_ids ...)
  keys = ("image", "text", "mask_input", "prefix_len", "image_pos") if own is None else (
      mm.model.image_key, "text", "mask_input", "prefix_len", *own.values())

  def run(p, image, text, mask, plen, *rest):
    kw = dict(image_pos=rest[0]) if own is None else dict(prefill_kw=dict(zip(own, rest)))
    return decoding.decode(mm.model, p, image, text, mask, plen, config.model.max_answer_len,
                           stop_ids=() if stop is None else (stop,), **kw)
  decode = jax.jit(run, in_shardings=(mm.param_shardings, *([batch_sh] * len(keys))),
                   out_shardings=batch_sh)
  rows, pictures = [], {}  # pictures: id -> the images of the first eval.num_summaries rows (process 0's)
  for batch in data.eval_batches(config, tokenizer, source, process_index=jax.process_index(),
                                 process_count=jax.process_count()):
    arrays = sharding.to_global({k: batch[k] for k in keys}, mm.mesh)
    with mm.context():
      tokens = decode(params, *(arrays[k] for k in keys))
    local = local_rows(tokens, mm.mesh, batch_sh.spec)
    for j, (row, valid, i, q, a, refs, kind) in enumerate(zip(
        local, batch["valid"], batch["id"], batch["question"], batch["answer"], batch["answers"],
        batch["kind"])):
      if (valid and len(pictures) < config.eval.num_summaries and jax.process_index() == 0
          and "image" in batch):
        pictures[i] = _picture(batch["image"][j], batch["image_pos"][j], batch["text"].shape[1])
      if valid:
        ids = row.tolist()
        pred = tokenizer.decode(ids[:ids.index(stop)] if stop in ids else ids).strip()
        scores = {n: metrics.METRICS[n](pred, refs) for n in names if n in metrics.METRICS}
        rows.append(dict(id=i, kind=kind, question=q, answer=a, prediction=pred, **scores,
                         **({"answers": refs} if refs != [a] else {})))
  if jax.process_count() > 1:  # every process holds the rows of its share
    rows = _gather_rows(rows)
  result = _scores(rows, names)
  result["samples"] = [{k: r[k] for k in ("question", "answer", "prediction")}
                       for r in rows[:config.eval.num_samples]]
  result["predictions"] = rows
  result["summaries"] = [dict(r, image=pictures[r["id"]]) for r in rows if r["id"] in pictures]
  kind_scores = " ".join(f"{k} {v:.3f}" for k, v in result["per_kind"].items())
  line = " | ".join(f"{n} {result[n]:.4f}" for n in _reported(names))
  return result, f"{result['num_examples']} questions | {line} | {kind_scores}".rstrip(" |")


def _picture(image_MxSxSx3: np.ndarray, image_pos_M: np.ndarray, length: int) -> np.ndarray:
  """A row's images side by side, uint8, each stretched to 0..255 (processors normalise differently)."""
  used = [x for x, pos in zip(image_MxSxSx3, image_pos_M) if pos < length] or [image_MxSxSx3[0] * 0]
  out = []
  for x in used:
    lo, hi = float(x.min()), float(x.max())
    out.append(((x - lo) / (hi - lo or 1.0) * 255).round().astype(np.uint8))
  return np.concatenate(out, axis=1)


def _reported(names) -> list[str]:
  return ["vqa_exact_match" if n == "exact_match" else n for n in names]


def _scores(rows: list[dict], names) -> dict:
  """The mean of each per-example metric, overall and (the first metric) per kind; corpus metrics."""
  out = {"num_examples": len(rows)}
  for n, key in zip(names, _reported(names)):
    if n in metrics.METRICS:
      out[key] = float(np.mean([r[n] for r in rows])) if rows else 0.0
    else:
      preds = {j: r["prediction"] for j, r in enumerate(rows)}
      refs = {j: r.get("answers", [r["answer"]]) for j, r in enumerate(rows)}
      out[key] = float(metrics.corpus_metrics[n](preds, refs))
  first = next((n for n in names if n in metrics.METRICS), None)
  kinds = sorted({r["kind"] for r in rows if r["kind"]}, key=lambda k: [r["kind"] for r in rows].index(k))
  out["per_kind"] = {k: float(np.mean([r[first] for r in rows if r["kind"] == k]))
                     for k in kinds} if first else {}
  return out


def _gather_rows(rows: list[dict]) -> list[dict]:
  """Every process's prediction rows, in process order (they are small: JSON through the hosts)."""
  blob = np.frombuffer(json.dumps(rows).encode(), np.uint8)
  sizes = np.asarray(multihost_utils.process_allgather(np.int64(blob.size)))
  padded = np.zeros(int(sizes.max()), np.uint8)
  padded[:blob.size] = blob
  parts = np.asarray(multihost_utils.process_allgather(padded))
  return [r for p, n in zip(parts, sizes) for r in json.loads(bytes(p[:int(n)]).decode())]


TASK = Task(
    inputs=("image", "text", "mask_ar", "mask_input", "image_pos", "segment", "positions"), loss=_loss, check=choice("loss_norm", LOSS_NORMS),
    example_batch=example_batch, train_iterator=data.train_iterator, evaluate=evaluate,
    tokens_per_example=tokens_per_example, text_elements=text_elements, flop_layout=flop_layout)

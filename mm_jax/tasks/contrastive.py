"""The contrastive task (two towers: SigLIP, CLIP): losses over the full BxB logits, and retrieval.

Trained on data.captions' (image, caption) batches with LOSSES[optim.loss]; evaluated by image->text and
text->image recall@1 over the split's images whose caption is unique. The loss takes logits_per_text
TxI of the WHOLE global batch (row i text, column j image, pair i matches i). The train step is one jit
over global arrays, so when the batch is sharded across devices XLA gathers the embeddings and every
negative of the global batch is scored (tests/test_contrastive.py checks 8 devices against 1). Losses
are computed in float32.

  sigmoid (SigLIP): m = 2*eye - 1; loss = mean_rows(-sum_cols log_sigmoid(m * logits)), as HF SiglipModel
  softmax (CLIP):   (CE(logits, arange) + CE(logits.T, arange)) / 2, mean over the batch
"""
import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
from jax.experimental import multihost_utils

from mm_jax import data
from mm_jax.errors import UserError
from mm_jax.tasks import Task, choice, forward, image_text_batch, local_rows
from mm_jax.train import sharding


def sigmoid_loss(logits_TxI: jax.Array) -> jax.Array:
  logits_TxI = logits_TxI.astype(jnp.float32)
  m_TxI = 2.0 * jnp.eye(logits_TxI.shape[0], dtype=jnp.float32) - 1.0  # +1 on pairs, -1 elsewhere
  return jnp.mean(-jnp.sum(jax.nn.log_sigmoid(m_TxI * logits_TxI), axis=-1))


def softmax_loss(logits_TxI: jax.Array) -> jax.Array:
  logits_TxI = logits_TxI.astype(jnp.float32)
  labels_B = jnp.arange(logits_TxI.shape[0])
  t2i = optax.softmax_cross_entropy_with_integer_labels(logits_TxI, labels_B)
  i2t = optax.softmax_cross_entropy_with_integer_labels(logits_TxI.T, labels_B)
  return jnp.mean(t2i + i2t) / 2.0


LOSSES = {"sigmoid": sigmoid_loss, "softmax": softmax_loss}


def recall_at_1(img_NxE: np.ndarray, txt_NxE: np.ndarray) -> dict[str, float]:
  """Image i's caption is text i. i2t: the fraction of images whose best-scoring text is their own;
  t2i: of texts whose best image is their own. Ties go to the lowest index (np.argmax)."""
  sim_NxN = np.asarray(img_NxE, np.float32) @ np.asarray(txt_NxE, np.float32).T  # [image, text]
  idx = np.arange(sim_NxN.shape[0])
  return {"i2t_recall@1": float(np.mean(sim_NxN.argmax(1) == idx)),
          "t2i_recall@1": float(np.mean(sim_NxN.argmax(0) == idx))}


def unique_indices(captions: list[str]) -> list[int]:
  """Indices of the captions that occur exactly once: retrieval of a repeated caption is ambiguous."""
  counts = {}
  for c in captions:
    counts[c] = counts.get(c, 0) + 1
  return [i for i, c in enumerate(captions) if counts[c] == 1]


def _loss(model, params, batch: dict, optim_cfg: mlc.ConfigDict) -> jax.Array:
  """LOSSES[optim.loss] over the TxI logits of the whole (global) batch."""
  return LOSSES[optim_cfg.loss](forward(model, params, batch))


def tokens_per_example(config: mlc.ConfigDict, model) -> int:
  """No decoder: both towers' sequences, the encoder's patches plus the text tower's data.text_len."""
  return model.encoder.num_patches(image_text_batch(config)["image"].shape) + config.data.text_len


def text_elements(config, src, texts: list, length, train: bool):
  """(tokens, None, record, what) of every caption data.captions makes of a split (eval: those
  retrieval scores); texts: its records' source.RecordTexts (None: a damaged record, left out)."""
  del src  # the captions are in the texts
  indices = range(len(texts))
  if not train:  # retrieval uses the images whose caption is unique
    indices = unique_indices([t.caption if t else "" for t in texts])
  for r in indices:
    if texts[r]:
      yield length(texts[r].caption) + 1, None, r, "its caption + eos"


def retrieval(config, mm, params, tokenizer, source) -> tuple[dict, str]:
  """Image->text and text->image recall@1 over the images whose caption is unique in the split.
  mm: the train.state.ModelOnMesh of the restored params."""
  batch_sh = sharding.batch_sharding(mm.mesh)
  apply = lambda p, image, text: (mm.model.apply({"params": p}, image, method="embed_image"),
                                  mm.model.apply({"params": p}, text, method="embed_text"))
  embed = jax.jit(apply, in_shardings=(mm.param_shardings, batch_sh, batch_sh),
                  out_shardings=(batch_sh, batch_sh))
  keep = unique_indices(data.captions.captions(config, source))
  img, txt, index = [], [], []
  for batch in data.captions.eval_batches(config, tokenizer, source, keep,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count()):
    arrays = sharding.to_global({k: batch[k] for k in ("image", "text")}, mm.mesh)
    with mm.context():
      img_BxE, txt_BxE = embed(params, arrays["image"], arrays["text"])
    img.append(local_rows(img_BxE, mm.mesh, batch_sh.spec))
    txt.append(local_rows(txt_BxE, mm.mesh, batch_sh.spec))
    index.append(batch["index"])
  img, txt, index = (np.concatenate(x) if x else np.zeros((0,)) for x in (img, txt, index))
  if jax.process_count() > 1:  # every process holds the same number of rows (padded): gather them all
    gather = lambda x: np.concatenate(list(multihost_utils.process_allgather(x)))
    img, txt, index = gather(img), gather(txt), gather(index)
  real = index >= 0  # image i and text i come from the same record; only padding rows are dropped
  if not real.any():
    raise UserError(f"no image of the split has a caption of its own ({len(source)} images)")
  scores = recall_at_1(img[real], txt[real])
  result = {"num_examples": int(real.sum()), "num_images": len(source), **scores}
  return result, (f"{result['num_examples']} of {len(source)} images (unique captions) | i2t_recall@1 "
                  f"{scores['i2t_recall@1']:.4f} | t2i_recall@1 {scores['t2i_recall@1']:.4f}")


TASK = Task(
    inputs=("image", "text"), loss=_loss, check=choice("loss", LOSSES), example_batch=image_text_batch,
    train_iterator=data.captions.train_iterator, evaluate=retrieval,
    tokens_per_example=tokens_per_example, text_elements=text_elements)

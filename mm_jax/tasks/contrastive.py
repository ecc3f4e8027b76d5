"""Contrastive losses over the full BxB logits and the retrieval metric.

The loss takes logits_per_text TxI of the WHOLE global batch (row i text, column j image, pair i matches
i). The train step is one jit over global arrays, so when the batch is sharded across devices XLA
gathers the embeddings and every negative of the global batch is scored (tests/test_contrastive.py
checks 8 devices against 1). Losses are computed in float32.

  sigmoid (SigLIP): m = 2*eye - 1; loss = mean_rows(-sum_cols log_sigmoid(m * logits)), as HF SiglipModel
  softmax (CLIP):   (CE(logits, arange) + CE(logits.T, arange)) / 2, mean over the batch
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax


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

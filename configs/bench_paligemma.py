r"""A mid-sized PaliGemma-style model for benchmarks only (no dataset: the benchmarks feed synthetic
batches): SigLIP-style ViT 6 x 384 (6 heads, MLP 1536) on 224 px, patch 16 (196 image tokens), linear
connector, Gemma-style decoder 6 x 512 (8 heads, 1 KV head, head_dim 64, GeGLU 2048, vocab 8192);
64 text tokens (16 prefix incl. BOS, 48 suffix, prefix-LM attention), batch 8, float32, AdamW.
37.8 M params, the same model as transformers' PaliGemmaForConditionalGeneration at these sizes.

  python experiments/bench_hf.py    # mm_jax vs transformers on this config, train step and forward

Expected (2 cores): mm_jax train step ~2.3 s (HF ~1.9 s), forward ~0.65 s (HF ~0.63 s); 4.25e11 train and
1.42e11 forward model FLOPs; experiments/bench_hf.jsonl has the runs.
"""
import ml_collections as mlc

from mm_jax.config import files

PREFIX_LEN = 16  # BOS + prompt; the remaining data.text_len - PREFIX_LEN tokens are the suffix


def get_config(arg: str = "") -> mlc.ConfigDict:
  del arg
  c = files.get_config("base")  # the model, batch and optimizer are set here
  c.global_batch_size = 8
  c.total_steps = 1000
  c.mesh.update(dict(dcn=1, data=-1, fsdp=1, tensor=1))
  c.data.image_size = 224
  c.data.text_len = 64

  m = c.model
  m.family, m.connector = "unified", "linear"
  m.image_position, m.prefix_attention = 0, True
  m.dtype, m.param_dtype = "float32", "float32"
  m.encoder = mlc.ConfigDict(dict(
      patch_size=16, width=384, depth=6, num_heads=6, mlp_dim=1536, norm_eps=1e-6, final_norm=True,
      scan=False, remat="none", remat_names=()))
  m.decoder.update(dict(
      vocab_size=8192, width=512, depth=6, num_heads=8, num_kv_heads=1, head_dim=64, mlp_dim=2048,
      norm="gemma", norm_eps=1e-6, mlp_act="gelu_tanh", embed_scale=True, tie_embeddings=True,
      rope_theta=10_000.0, rope_type="default", scan=False, remat="none", remat_names=()))

  # As the torch side: AdamW lr 1e-4, weight decay 0.01, betas (0.9, 0.999), constant lr; HF's token
  # mean loss. (mm_jax keeps its gradient clip and non-finite check: part of every real step.)
  c.optim.lr = 1e-4
  c.optim.warmup_steps = 0
  c.optim.end_lr_factor = 1.0
  c.optim.weight_decay = 0.01
  c.optim.b2 = 0.999
  c.optim.loss_norm = "token"
  c.optim.rules = ((".*", "trainable"),)
  return c

r"""A ~1B-parameter unified-embedding model (PaliGemma layout, bfloat16 compute) for measuring MFU on one
accelerator: ViT-B/16 at 224 px (196 image tokens), a linear connector, a Gemma-style decoder of width
2048 and 14 layers (multi-query attention, head_dim 256, vocab 32768). The shapes come from
configs/paligemma_3b.py, shrunk; no data or tokenizer is needed (benchmarks feed synthetic batches).

  python experiments/gpu_mfu.py                  # on a GPU machine (experiments/gpu_env.sh first)

Expected (experiments/README.md, "Speed"): 0.99 B params; on one H100 the train step runs at the MFU
that table records.
"""
import ml_collections as mlc

from mm_jax.config import files


def get_config(arg: str = "") -> mlc.ConfigDict:
  c = files.get_config("paligemma_3b")  # scanned, full remat, bf16 compute, f32 params/Adam
  c.global_batch_size = 32
  c.mesh.update(dict(dcn=1, data=1, fsdp=-1, tensor=1))
  c.data.image_size = 224
  c.data.text_len = 128
  c.model.encoder.update(dict(patch_size=16, width=768, depth=12, num_heads=12, mlp_dim=3072))
  c.model.decoder.update(dict(vocab_size=32_768, width=2048, depth=14, num_heads=8, num_kv_heads=1,
                              head_dim=256, mlp_dim=8192))
  c.optim.lr_scales = ()
  for variant in filter(None, arg.split(",")):
    if variant == "no_remat":  # no recompute in the backward (memory allowing)
      c.model.encoder.remat = c.model.decoder.remat = "none"
    elif variant == "dots":  # keeps the weight matmuls' outputs, recomputes the elementwise work
      c.model.encoder.remat = c.model.decoder.remat = "dots"
    else:
      raise ValueError(f"unknown variant {variant!r} of bench_1b; known: no_remat, dots")
  return c

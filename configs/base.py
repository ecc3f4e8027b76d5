r"""The base config: every field mm_jax reads, with its default. Every config builds on it.

  from mm_jax.config import files
  c = files.get_config("base")   # then set what the job chooses

A config loaded from a file that predates a field gets it from here (mm_jax.config.files.complete), so
no code repeats a default. Fields typed by their defaults: `--config.x=v` of another type is an error.
Family-specific fields sit under model.family_options.<family>, connector ones under
model.connector_options.<connector>; each section is checked against its module's fields.
"""
import math

import ml_collections as mlc


def get_config(arg: str = "") -> mlc.ConfigDict:
  if arg:
    raise ValueError(f"the base config has no variants (got {arg!r})")
  c = mlc.ConfigDict()
  c.seed = 0
  c.total_steps = 3000
  c.global_batch_size = 64
  c.log_every = 50
  # Peak FLOP/s per device for the logged mfu; 0: the datasheet's for the device kind and model.dtype
  # (mm_jax/perf/mfu.py's table), measured by a matmul on CPU or an unknown kind.
  c.mfu_peak_flops = 0.0
  # Permanent checkpoints every checkpoint_every steps: the newest keep_checkpoints are kept, and every
  # one at a multiple of keep_every (0: none). A temporary one after checkpoint_minutes without a save
  # (0: never): only the newest is kept, until a newer checkpoint exists. Each step's manifest.json has
  # every file's size and crc32 (checkpoint_checksums=False: sizes only, for huge ones on slow storage).
  c.checkpoint_every = 500
  c.keep_checkpoints = 2
  c.keep_every = 0
  c.checkpoint_minutes = 10.0
  c.checkpoint_checksums = True

  # Mesh axes; -1 takes the devices left over; dcn x data x fsdp x tensor must equal the device count.
  # Strategies (data parallel, FSDP, tensor, multi-slice dcn): the table in mm_jax/train/sharding.py.
  c.mesh = mlc.ConfigDict(dict(dcn=1, data=-1, fsdp=1, tensor=1))
  # Logical axis name -> mesh axes. Params use the plain names, activations the `act_` ones; a name
  # not listed (act_len, act_embed) is replicated.
  c.axis_rules = (
      ("act_batch", ("dcn", "data", "fsdp")),
      ("embed", "fsdp"),
      ("mlp", "tensor"),
      ("heads", "tensor"),
      ("kv_heads", "tensor"),
      ("vocab", "tensor"),
      ("act_heads", "tensor"),
      ("act_mlp", "tensor"),
      ("act_vocab", "tensor"),
      ("layers", None),  # scanned layers' leading axis: replicated (each device holds every layer)
  )

  c.data = mlc.ConfigDict()
  c.data.name = "shapes"             # mm_jax.data.SOURCES; `python -m mm_jax.models` lists them
  c.data.data_dir = "data"           # the TFDS data_dir; built here on first use
  c.data.num_train = 8000            # images per split; each image carries several questions
  c.data.num_validation = 200
  c.data.num_test = 500
  c.data.dataset_seed = 0            # the generator's seed: same seed, same dataset
  c.data.image_size = 64             # the model's input resolution (images are resized if they differ)
  c.data.text_len = 26               # prefix + suffix tokens, padded
  c.data.vocab_size = 128            # SentencePiece vocabulary trained on the dataset's text
  c.data.tokenizer = ""              # a SentencePiece .model to use instead (an imported model's)
  c.data.blind = False               # replace every image by a constant
  c.data.caption_ratio = 1.0         # captioning elements per image mixed into training (0: off)
  c.data.num_threads = 2             # grain read threads
  # A record that cannot be used (undecodable, a field missing or malformed, text longer than text_len):
  # "fail" stops naming its split, index, field and the fix; "skip" replaces it by the next good element
  # (batches keep their size, resumes stay bitwise) and counts data_skipped in the metrics.
  c.data.bad_records = "fail"

  c.model = mlc.ConfigDict()
  # models.FAMILIES: unified (image tokens beside text tokens), cross (gated cross-attention), hybrid
  # (NVLM-H: thumbnail in the sequence, tiles by cross-attention), fuyu (raw patches, no encoder), lm,
  # siglip (two towers, contrastive; with its model.text section).
  c.model.family = "unified"
  c.model.image_position = 0         # text tokens before the image: 0 PaliGemma, 1 LLaVA (after BOS)
  c.model.prefix_attention = True    # PaliGemma prefix-LM; False: causal everywhere (LLaVA)
  c.model.dtype = "float32"          # compute dtype, or "bfloat16" (norms, softmax, loss stay float32)
  c.model.param_dtype = "float32"
  # scan: one compiled block for the whole stack (params stacked on a "layers" axis); remat: what the
  # backward keeps, "none" | "full" | "dots" | "custom" (remat_names); models/stack.py explains both.
  c.model.encoder = mlc.ConfigDict(dict(  # vit.ViT
      patch_size=16, width=128, depth=3, num_heads=4, mlp_dim=512, norm_eps=1e-6, final_norm=True,
      scan=False, remat="none", remat_names=()))
  c.model.connector = "linear"       # models.CONNECTORS; `python -m mm_jax.models` lists them
  # Options per connector, by name (the modules' defaults); only the chosen connector's section is used,
  # every one is checked. linear (LLaVA-1.0, PaliGemma) and mlp (LLaVA-1.5) have none: a token a patch.
  c.model.connector_options = mlc.ConfigDict(dict(
      # Learned queries cross-attend to the patches: num_queries tokens whatever the resolution.
      # mlp_dim 0: 4x the encoder width; num_heads must divide the encoder width.
      resampler=mlc.ConfigDict(dict(num_queries=64, depth=2, num_heads=4, mlp_dim=0)),
      # scale x scale neighbouring patches in one token (Idefics3); must divide the patch grid's side.
      pixel_shuffle=mlc.ConfigDict(dict(scale=2)),
  ))
  c.model.decoder = mlc.ConfigDict(dict(  # decoder.Decoder; Llama-style: norm "llama", mlp_act "silu",
      vocab_size=0,                  #   embed_scale False, tie_embeddings False. 0: the tokenizer's size
      width=128, depth=3, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=512,
      norm="gemma", norm_eps=1e-6, mlp_act="gelu_tanh", embed_scale=True, tie_embeddings=True,
      rope_theta=10_000.0, rope_type="default", rope_factor=8.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_len=8192,
      scan=False, remat="none", remat_names=()))  # also for the cross blocks of cross / hybrid
  # Options per family, by name (models.FAMILIES); only the chosen family's sections are used.
  c.model.family_options = mlc.ConfigDict(dict(
      # cross (models/cross_attention.py), also read by hybrid: the image reaches the decoder only
      # through gated cross-attention blocks (gates start at 0). 0: the decoder's value.
      cross=mlc.ConfigDict(dict(
          every=1,                   # a cross block before every N decoder blocks (Llama 3.2: ~4-5)
          num_heads=0, num_kv_heads=0, head_dim=0,
          mlp_dim=0,                 # the cross block's MLP width
          last_image_only=True)),    # a token sees the last image (group) before it; False: all
      hybrid=mlc.ConfigDict(dict(tiles=2)),  # a G x G grid of tiles; the thumbnail pooled by G
      # The logit scale (log) and bias at init: the paper's for training from scratch (HF: 0, 0).
      siglip=mlc.ConfigDict(dict(logit_scale_init=math.log(10.0), logit_bias_init=-10.0)),
  ))
  c.model.max_answer_len = 6         # greedy decoding budget in eval

  # Parts loaded from other checkpoints at step 0 (params only), by name: ordered
  # (checkpoint dir, source prefix, destination prefix); params under the destination prefix are read
  # from source prefix + the rest of their path. E.g. an encoder from a SigLIP run:
  #   (("workdirs/siglip", "encoder/", "encoder/"),)
  c.init = mlc.ConfigDict()
  c.init.parts = ()

  c.optim = mlc.ConfigDict()
  c.optim.lr = 2e-3
  c.optim.warmup_steps = 100
  c.optim.end_lr_factor = 0.05       # cosine decay to lr * this
  c.optim.weight_decay = 1e-4
  c.optim.b2 = 0.98
  c.optim.grad_clip = 1.0
  c.optim.loss_norm = "example"      # token mean per example, then over examples; or "token" (batch-wide)
  c.optim.loss = "sigmoid"           # contrastive task: "sigmoid" (SigLIP) | "softmax" (CLIP)
  # Ordered (regex over 'subtree/.../name', 'trainable' | 'frozen'); the first match wins; every param
  # must match one. E.g. LLaVA stage 1: (("connector/.*", "trainable"), (".*", "frozen")).
  c.optim.rules = ((".*", "trainable"),)
  # Ordered (regex, factor): the learning rate of matching trainable params times factor (first match
  # wins; the rest 1). E.g. a pretrained encoder fine-tuned gently: (("encoder/.*", 0.1),).
  c.optim.lr_scales = ()
  # A step whose loss or gradients hold a NaN or Inf applies no update; then "stop": the run stops naming
  # the step and the parameter groups (nothing saved after it); "skip": training goes on, counting
  # skipped_steps in the metrics, until max_consecutive_skips of them come in a row.
  c.optim.nonfinite = "stop"
  c.optim.max_consecutive_skips = 10

  c.eval = mlc.ConfigDict()
  c.eval.batch_size = 256
  c.eval.num_samples = 20            # (question, answer, prediction) samples written to the json
  return c

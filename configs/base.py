r"""The base config: every field mm_jax reads, with its default. Every config builds on it.

  from mm_jax.config import files
  c = files.get_config("base")   # then set what the job chooses

A config loaded from a file that predates a field gets it from here (mm_jax.config.files.complete), so
no code repeats a default. Fields typed by their defaults: `--config.x=v` of another type is an error.
Family-specific fields sit under model.family_options.<family>, connector ones under
model.connector_options.<connector>; each section is checked against its module's fields.
"""
import dataclasses

import ml_collections as mlc

from mm_jax import models


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
  c.data.path = ""                   # data.name=conversations: a directory `python -m mm_jax.data.prepare` wrote
  # data.name=tfds: a dataset TFDS prepared (array_record) in data_dir, by name, and its field names
  c.data.tfds = mlc.ConfigDict(dict(name="", image="image", question="question", answer="answer", kind=""))
  # How a conversation becomes tokens: data/chat.py's TEMPLATES ("plain": [image] bos question answer eos;
  # "paligemma", "llava", "gemma", "llama3": the models' own); its image processor: data/images.py's.
  c.data.chat_template = "plain"
  c.data.image_processor = "plain"
  c.data.max_images = 1              # image slots per row (empty ones are masked)
  c.data.max_image_pixels = 50_000_000  # larger images are refused before decoding (decompression bombs)
  # The native family (images at their own size, data/native_rows.py): pixel bounds of a still image
  # and of a video frame (sizes round to multiples of patch * merge), the frames a video keeps (count,
  # or 0: video_fps per second), and the padded patch counts a batch may take: one compiled train step
  # each. E.g. --config.data.native.patch_buckets='(256, 1024)'. An image (or frame) with a side under
  # min_side pixels is refused rather than blown up (HF's processor would upscale it to min_pixels).
  # still_frame: a video is read as its middle frame alone (the single-frame baseline).
  c.data.native = mlc.ConfigDict(dict(min_side=8, still_frame=False, min_pixels=56 * 56, max_pixels=28 * 28 * 1280,
                                      video_min_pixels=128 * 28 * 28, video_max_pixels=28 * 28 * 768,
                                      video_frames=0, video_fps=2.0, patch_buckets=(1024, 4096, 16384)))
  c.data.packing = False             # several examples per row (segment ids; attention stays within each)
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
  # Options per connector, by name: every connector's fields but width and dtypes, at the module's
  # defaults (`python -m mm_jax.models` lists them); only the chosen connector's section is used, every
  # one is checked. E.g. --config.model.connector_options.resampler.num_queries=16.
  c.model.connector_options = _sections({n: cls for n, cls in models.CONNECTORS.items()},
                                        ("width", "dtype", "param_dtype"))
  c.model.decoder = mlc.ConfigDict(dict(  # decoder.Decoder; Llama-style: norm "llama", mlp_act "silu",
      vocab_size=0,                  #   embed_scale False, tie_embeddings False. 0: the tokenizer's size
      width=128, depth=3, num_heads=4, num_kv_heads=4, head_dim=32, mlp_dim=512,
      norm="gemma", norm_eps=1e-6, mlp_act="gelu_tanh", embed_scale=True, tie_embeddings=True,
      embed_rows=0,                  # embedding rows, 0: vocab_size (an import's may hold more)
      rope_theta=10_000.0, rope_type="default", rope_factor=8.0, rope_low_freq_factor=1.0,
      rope_high_freq_factor=4.0, rope_original_max_len=8192,
      scan=False, remat="none", remat_names=()))  # also for the cross blocks of cross / hybrid
  # Options per family, by name: each Family record's options dataclass at its defaults (cross, also
  # read by hybrid: CrossOptions in models/cross_attention.py; hybrid: tiles; siglip: the logit scale and
  # bias at init). E.g. --config.model.family_options.cross.every=4.
  c.model.family_options = _sections({n: f.options for n, f in models.FAMILIES.items() if f.options})
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
  c.eval.num_summaries = 4           # of them, with their images, to TensorBoard (<workdir>/tensorboard)
  c.eval.every_steps = 0             # > 0: training evaluates eval.split every so many steps (and last)
  c.eval.split = "validation"
  # Per-example metrics (mm_jax/eval/metrics.py: exact_match, vqa_accuracy, anls, relaxed_accuracy) and
  # corpus ones (cider_d); every prediction is written to predictions.jsonl beside the scores.
  c.eval.metrics = ("exact_match",)
  return c


def _sections(classes: dict, exclude=()) -> mlc.ConfigDict:
  """{name: {field: default}} of the registered classes' config-settable fields (those with options)."""
  out = {}
  for name, cls in sorted(classes.items()):
    fields = {f.name: f.default for f in dataclasses.fields(cls)
              if f.name not in ("parent", "name", *exclude) and f.default is not dataclasses.MISSING}
    if fields:
      out[name] = mlc.ConfigDict(fields)
  return mlc.ConfigDict(out)

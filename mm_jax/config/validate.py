"""Config checks at startup, before any work: train() and evaluate() call check_config first, so a bad
field stops the command with one line naming the field and the fix (UserError), before a workdir, a
checkpoint or a compile is touched.

Checked here: the type and range of every field the trainer and evaluator read (steps, intervals, batch
sizes, seed, optimizer numbers, model sizes, eval fields); the relations between fields (heads dividing
widths, query heads a multiple of kv heads, RoPE's even head_dim, the image a whole number of patches,
the text tower's position table against data.text_len); the freeze rules against the real parameter
tree (a rule that takes no parameter, every parameter frozen); data.text_len against the split's
longest element, and model.image_position against the shortest text prefix.

Checked where they already are, not here: the registries, the mesh and the batch (sharding), the
rules' coverage and lr_scales (optim), init.parts (parts.map_parts), the tokenizer's size (models),
the dataset's sizes and data_dir (data.shapes).
"""
import re

import flax.linen as nn
import jax
import ml_collections as mlc
import numpy as np

from mm_jax.train import optim
from mm_jax import data
from mm_jax.data import chat, images, native_images, native_rows, pipeline
from mm_jax.eval import metrics
from mm_jax.errors import UserError
from mm_jax.config import fields
from mm_jax.models import build_model, example_batch, family_of, model_inputs, stack
from mm_jax.tasks import TASKS



def check_config(config: mlc.ConfigDict, split: str = "train", *, train: bool = True) -> None:
  """Raises UserError for the first bad field. train=False (eval) skips the fields only training reads.

  Builds the data of `split` if it is not built yet (as the run would next), reads its text (not its
  images) once, and traces the model's init abstractly (no compile, nothing allocated)."""
  check_fields(config, train=train)
  tokenizer = pipeline.load_tokenizer(config)
  chat.check(config.data.chat_template, tokenizer)  # the special tokens the template writes
  model = build_model(config.model, tokenizer.vocab_size)
  _check_text(config, tokenizer, split, model.task, train)
  if getattr(model, "image_key", None) == "patches":  # native: every still image's size, from headers
    _check_native_images(config, split)
  if train:
    check_rules(config, abstract_params(config, model))


def check_fields(config: mlc.ConfigDict, *, train: bool = True) -> None:
  """The checks of the config alone (no data, no model trace): types, ranges, relations."""
  if train:
    _check_run(config)
  _check_data(config)
  _check_model(config)
  _check_eval(config)


# --- the sections ---

def _check_run(config) -> None:
  """What only training reads: steps, intervals, batch, seed, the optimizer's numbers."""
  for path in ("total_steps", "global_batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    fields.integer(config, path, 1)
  seed = fields.integer(config, "seed", 0)
  if seed is not None and seed >= 2 ** 32:  # numpy's and grain's seeds are uint32
    raise UserError(f"seed={seed} must be below 2**32; set --config.seed")
  fields.number(config, "optim.lr", 0, lo_open=True)
  fields.integer(config, "optim.warmup_steps", 0)  # may exceed total_steps: the schedule then warms up throughout
  fields.number(config, "optim.end_lr_factor", 0, 1)
  fields.number(config, "optim.weight_decay", 0)
  fields.number(config, "optim.b2", 0, 1, hi_open=True)
  fields.number(config, "optim.grad_clip", 0, lo_open=True)
  fields.number(config, "data.caption_ratio", 0)
  fields.number(config, "mfu_peak_flops", 0)  # 0: automatic (mm_jax.perf.mfu)


def _check_data(config) -> None:
  fields.integer(config, "data.image_size", 1)
  fields.integer(config, "data.text_len", 1)
  fields.integer(config, "data.num_threads", 0)
  fields.boolean(config, "data.blind")
  fields.boolean(config, "data.packing")
  fields.integer(config, "data.max_images", 1)
  fields.integer(config, "data.max_image_pixels", 1)
  fields.choice(config, "data.chat_template", tuple(chat.TEMPLATES))
  fields.choice(config, "data.image_processor", tuple(images.PROCESSORS))
  vocab = fields.get(config, "data.vocab_size")
  if vocab is not fields.ABSENT and (not fields.is_int(vocab) or vocab <= 4):
    raise UserError(f"data.vocab_size={vocab!r} must be an integer > 4 (ids 0-3 are pad, unk, bos, "
                    "eos); set --config.data.vocab_size")


def _check_model(config) -> None:
  """The fields every family reads, then the family's own sections (its record's check)."""
  fields.boolean(config, "model.prefix_attention")
  fields.integer(config, "model.max_answer_len", 1)
  family_of(config.model).check(config)


def _check_eval(config) -> None:
  fields.integer(config, "eval.batch_size", 1)  # its split over the mesh: sharding.check_batch in eval
  fields.integer(config, "eval.num_samples", 0)
  fields.integer(config, "eval.num_summaries", 0)
  fields.integer(config, "eval.every_steps", 0)
  known = (*metrics.METRICS, *metrics.corpus_metrics)
  names = fields.get(config, "eval.metrics")
  for name in () if names is fields.ABSENT else names:
    if name not in known:
      raise UserError(f"eval.metrics has {name!r}, which is unknown; use some of {', '.join(known)} "
                      "(--config.eval.metrics=...)")


# --- against the parameter tree ---

def abstract_params(config, model) -> dict:
  """The model's params as ShapeDtypeStructs (an abstract trace of init: nothing is allocated)."""
  task = TASKS[model.task]
  batch = example_batch(config, task)
  init = lambda rng: model.init(rng, *(batch[k] for k in model_inputs(model, task)))["params"]
  return nn.meta.unbox(jax.eval_shape(init, jax.random.key(0)))


def check_rules(config, params) -> None:
  """optim.rules against the parameter tree: besides optim.param_labels' checks (format, every param
  covered), every rule takes some parameter (a typo would silently leave its params to a later rule,
  often the catch-all) and some parameter trains."""
  rules = config.optim.rules
  labels = optim.param_labels(params, rules)
  names = [stack.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
  taken = set()
  for name in names:
    for i, (regex, _) in enumerate(rules):
      if re.fullmatch(regex, name):
        taken.add(i)
        break
  for i, rule in enumerate(rules):
    if i not in taken:
      tops = sorted({n.split("/")[0] for n in names})
      raise UserError(f"optim.rules entry {tuple(rule)!r} matches no parameter (or only ones an earlier "
                      f"entry took; the params are under {', '.join(tops)}/); fix it or remove it")
  if "trainable" not in jax.tree.leaves(labels):
    raise UserError(f"optim.rules freeze all {len(names)} parameters, so nothing would train; make a "
                    "rule 'trainable' (e.g. ('connector/.*', 'trainable') first)")


# --- against the data ---

def _check_text(config, tokenizer, split: str, task: str, train: bool) -> None:
  """data.text_len against the longest element of the split as the pipeline makes it (the eval split:
  the prefix only), and model.image_position against the shortest prefix. Under
  data.bad_records='skip' a too-long element is skipped by design: not checked then. Whole
  conversations, or another chat template than "plain", are checked as the pipeline renders them."""
  if (config.data.bad_records != "fail" or data.get(config.data.name).conversations
      or config.data.chat_template != "plain"):
    return
  longest, shortest = None, None  # (tokens, record, what)
  for n_tokens, prefix, r, what in _elements(config, tokenizer, split, task, train):
    if longest is None or n_tokens > longest[0]:
      longest = (n_tokens, r, what)
    if prefix is not None and (shortest is None or prefix < shortest[0]):
      shortest = (prefix, r, what)
  text_len = config.data.text_len
  if longest and longest[0] > text_len:
    n, r, what = longest
    raise UserError(f"data.text_len={text_len} is too short for the {split} split: its longest element "
                    f"(record {r}, {what}) needs {n} tokens; set --config.data.text_len to at least {n}")
  position = config.model.image_position
  if family_of(config.model).image_in_sequence and shortest and position > shortest[0]:
    n, r, what = shortest
    raise UserError(f"model.image_position={position} is past the text prefix of {split} record {r} "
                    f"({what}: {n} tokens); set --config.model.image_position to 0 (image first) or 1 "
                    "(after BOS)")


def _check_native_images(config, split: str) -> None:
  """Each still image of the split against data.native (min_side; its patches within the largest
  bucket), from the encoded images' headers: before the workdir is touched, not at the first batch.
  Videos and damaged records are left to the pipeline (data.bad_records)."""
  src = data.get(config.data.name)
  source = src.open(config.data, split, text_only=True)
  rules, _, _ = native_rows.options(config)
  n, largest = config.data.native, max(native_rows.buckets(config))
  for r in range(len(source)):
    try:
      record = source[r]
    except Exception:  # pylint: disable=broad-except
      continue
    encoded = record.get("images", [record.get("image")])
    patches = 0
    for j, b in enumerate(encoded):
      if not isinstance(b, (bytes, np.bytes_)) or native_rows.is_video(b):
        continue
      try:
        w, h = images.image_size(bytes(b))
      except Exception:  # pylint: disable=broad-except
        continue
      if min(w, h) < n.min_side:
        raise UserError(f"{split} record {r} image {j} is {w}x{h} pixels, a side under "
                        f"data.native.min_side={n.min_side}; drop it, or lower --config.data.native.min_side")
      gh, gw = (x // rules.patch_size for x in native_images.smart_resize(h, w, rules))
      patches += gh * gw
    if patches > largest:
      raise UserError(f"{split} record {r} needs {patches} patches but the largest of "
                      f"data.native.patch_buckets is {largest}; add a bucket of at least {patches} or "
                      "lower data.native.max_pixels")


def _texts(src, record):
  """The source.RecordTexts of a record; None for a damaged record: the pipeline's data.bad_records
  policy reports it (or skips it) when the run reaches it, not this check."""
  try:
    return src.record_texts(record)
  except Exception:  # pylint: disable=broad-except
    return None


def _read(src, source) -> list:
  """_texts of every record of a TFDS source (src.open's), images left undecoded."""
  out = []
  for start in range(0, len(source), 1024):  # in blocks: a third faster than one by one
    block = list(range(start, min(start + 1024, len(source))))
    try:
      records = source.__getitems__(block)
    except Exception:  # pylint: disable=broad-except  # a damaged record in the block
      records = []
      for r in block:
        try:
          records.append(source[r])
        except Exception:  # pylint: disable=broad-except
          records.append(None)
    out += [_texts(src, record) for record in records]
  return out


def _elements(config, tokenizer, split: str, task: str, train: bool):
  """(tokens, prefix tokens or None, record, what) of every element the pipeline makes of the split,
  as the model's task enumerates them (Task.text_elements) from the texts of data.name's records."""
  src = data.get(config.data.name)
  texts = _read(src, src.open(config.data, split, text_only=True))
  cache = {}
  length = lambda text: cache.setdefault(text, len(tokenizer.encode(text)))
  return TASKS[task].text_elements(config, src, texts, length, train)

"""Config checks at startup, before any work: train() and evaluate() call check_config first, so a bad
field stops the command with one line naming the field and the fix (UserError), before a workdir, a
checkpoint or a compile is touched.

Checked here: the type and range of every field the trainer and evaluator read (steps, intervals, batch
sizes, seed, optimizer numbers, model sizes, eval fields); the relations between fields (heads dividing
widths, query heads a multiple of kv heads, RoPE's even head_dim, the image a whole number of patches,
the text tower's position table against data.text_len); the freeze rules against the real parameter
tree (a rule that takes no parameter, every parameter frozen); and data.text_len against what the
split's elements need (the longest one), and model.image_position against the shortest text prefix.

Not repeated, only called where they already are (with their own messages): the registries (family,
connector, dtypes, remat, optim.loss_norm / loss), the mesh against the device count and the batch
against the data-parallel size (sharding), uncovered params and malformed rules / lr_scales (optim),
init.parts against the model's shapes (parts.plan_parts), the tokenizer's size against the
vocabulary (models), the dataset's sizes and data_dir (data.shapes).
"""
import math
import re

import flax.linen as nn
import jax
import ml_collections as mlc

from mm_jax.train import optim
from mm_jax.data import pipeline, shapes
from mm_jax.errors import UserError
from mm_jax.models import build_model
from mm_jax.models.layers import ACTIVATIONS
from mm_jax.train.state import TASKS, example_batch

NORMS = ("gemma", "llama")          # layers.RMSNorm's forms
ROPE_TYPES = ("default", "llama3")  # layers.Rope.type
_ABSENT = object()
# Families whose image tokens sit in the decoder's sequence at model.image_position.
_IN_SEQUENCE = ("unified", "fuyu", "hybrid")


def check_config(config: mlc.ConfigDict, split: str = "train", *, train: bool = True) -> None:
  """Raises UserError for the first bad field. train=False (eval) skips the fields only training reads.

  Builds the data of `split` if it is not built yet (as the run would next), reads its text (not its
  images) once, and traces the model's init abstractly (no compile, nothing allocated)."""
  check_fields(config, train=train)
  tokenizer = pipeline.load_tokenizer(config)
  model = build_model(config.model, tokenizer.vocab_size)
  _check_text(config, tokenizer, split, model.task, train)
  if train:
    check_rules(config, abstract_params(config, model))


def check_fields(config: mlc.ConfigDict, *, train: bool = True) -> None:
  """The checks of the config alone (no data, no model trace): types, ranges, relations."""
  if train:
    _check_run(config)
  _check_data(config)
  _check_model(config)
  _check_eval(config)


# --- field helpers: the value at a dotted path, absent fields (other configs) skipped ---

def _get(config, path: str):
  node = config
  for key in path.split("."):
    if not isinstance(node, (mlc.ConfigDict, dict)) or key not in node:
      return _ABSENT
    node = node[key]
  return node


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _int(config, path: str, lo: int):
  """The int at `path` (None if absent), >= lo."""
  v = _get(config, path)
  if v is _ABSENT:
    return None
  if not _is_int(v) or v < lo:
    raise UserError(f"{path}={v!r} must be an integer >= {lo}; set --config.{path}")
  return v


def _float(config, path: str, lo: float, hi: float = math.inf, lo_open=False, hi_open=False):
  """The number at `path` (None if absent), in the interval [lo, hi] (open ends as given)."""
  v = _get(config, path)
  if v is _ABSENT:
    return None
  ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        and (v > lo if lo_open else v >= lo) and (v < hi if hi_open else v <= hi))
  if not ok:
    span = f"{'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
    if hi == math.inf:
      span = f"{'> ' if lo_open else '>= '}{lo:g}"
    raise UserError(f"{path}={v!r} must be a number {span}; set --config.{path}")
  return v


def _bool(config, path: str):
  v = _get(config, path)
  if v is not _ABSENT and not isinstance(v, bool):
    raise UserError(f"{path}={v!r} must be True or False; set --config.{path}")


def _choice(config, path: str, known):
  v = _get(config, path)
  if v is not _ABSENT and v not in known:
    raise UserError(f"{path}={v!r} is unknown; use one of {', '.join(known)} (--config.{path}=...)")


# --- the sections ---

def _check_run(config) -> None:
  """What only training reads: steps, intervals, batch, seed, the optimizer's numbers."""
  for path in ("total_steps", "global_batch_size", "log_every", "checkpoint_every", "keep_checkpoints"):
    _int(config, path, 1)
  seed = _int(config, "seed", 0)
  if seed is not None and seed >= 2 ** 32:  # numpy's and grain's seeds are uint32
    raise UserError(f"seed={seed} must be below 2**32; set --config.seed")
  _float(config, "optim.lr", 0, lo_open=True)
  _int(config, "optim.warmup_steps", 0)  # may exceed total_steps: the schedule then warms up throughout
  _float(config, "optim.end_lr_factor", 0, 1)
  _float(config, "optim.weight_decay", 0)
  _float(config, "optim.b2", 0, 1, hi_open=True)
  _float(config, "optim.grad_clip", 0, lo_open=True)
  _float(config, "data.caption_ratio", 0)
  _float(config, "mfu_peak_flops", 0)  # 0: automatic (mm_jax.mfu)


def _check_data(config) -> None:
  _int(config, "data.image_size", 1)
  _int(config, "data.text_len", 1)
  _int(config, "data.num_threads", 0)
  _bool(config, "data.blind")
  vocab = _get(config, "data.vocab_size")
  if vocab is not _ABSENT and (not _is_int(vocab) or vocab <= 4):
    raise UserError(f"data.vocab_size={vocab!r} must be an integer > 4 (ids 0-3 are pad, unk, bos, "
                    "eos); set --config.data.vocab_size")


def _check_heads(section: str, width: int | None, heads: int | None) -> None:
  if width and heads and width % heads:
    raise UserError(f"model.{section}.num_heads={heads} must divide model.{section}.width={width}; set "
                    f"--config.model.{section}.num_heads to a divisor of {width}")


def _check_model(config) -> None:
  family = _get(config, "model.family")
  _bool(config, "model.prefix_attention")
  _int(config, "model.max_answer_len", 1)
  if family != "lm" and _get(config, "model.encoder") is not _ABSENT:
    _check_encoder(config, family)
  if family != "siglip" and _get(config, "model.decoder") is not _ABSENT:
    _check_decoder(config)
  if family == "siglip" and _get(config, "model.text") is not _ABSENT:
    for field in ("width", "depth", "num_heads", "mlp_dim", "max_len"):
      _int(config, f"model.text.{field}", 1)
    _int(config, "model.text.vocab_size", 0)
    _check_heads("text", _get(config, "model.text.width"), _get(config, "model.text.num_heads"))
    max_len, text_len = _get(config, "model.text.max_len"), config.data.text_len
    if max_len is not _ABSENT and max_len < text_len:  # the text tower's position table
      raise UserError(f"data.text_len={text_len} exceeds model.text.max_len={max_len}, the text tower's "
                      "positions; set --config.data.text_len to at most that (or model.text.max_len)")
  if family in ("cross", "hybrid"):
    _check_cross(config)
  if family in _IN_SEQUENCE:
    _int(config, "model.image_position", 0)


def _check_encoder(config, family: str) -> None:
  patch = _int(config, "model.encoder.patch_size", 1)
  if family != "fuyu":  # fuyu reads only patch_size (raw patches, no transformer)
    for field in ("width", "num_heads", "mlp_dim"):
      _int(config, f"model.encoder.{field}", 1)
    _int(config, "model.encoder.depth", 0)  # 0: patch embedding only (LLaVA's vision_feature_layer=0)
    _float(config, "model.encoder.norm_eps", 0, lo_open=True)
    _check_heads("encoder", config.model.encoder.width, config.model.encoder.num_heads)
  size = config.data.image_size
  side, what = size, f"data.image_size={size}"
  tiles = _get(config, "model.hybrid_tiles")
  if family == "hybrid" and _is_int(tiles) and tiles >= 1 and size % tiles == 0:  # tiles are encoded
    side = size // tiles
    what = f"the tile side {side} (data.image_size={size} / model.hybrid_tiles={tiles})"
  if patch and (side % patch or side < patch):  # else the conv drops the rest of the image silently
    raise UserError(f"{what} is not a multiple of model.encoder.patch_size={patch}; set "
                    f"--config.data.image_size (or the patch size) so that the image is whole patches")


def _check_decoder(config) -> None:
  d = "model.decoder"
  for field in ("width", "depth", "num_heads", "num_kv_heads", "mlp_dim"):
    _int(config, f"{d}.{field}", 1)
  _int(config, f"{d}.vocab_size", 0)
  head_dim = _int(config, f"{d}.head_dim", 2)
  if head_dim and head_dim % 2:  # RoPE rotates pairs of dims
    raise UserError(f"{d}.head_dim={head_dim} must be even (RoPE rotates pairs); set "
                    f"--config.{d}.head_dim")
  heads, kv = _get(config, f"{d}.num_heads"), _get(config, f"{d}.num_kv_heads")
  if heads is not _ABSENT and kv is not _ABSENT and heads % kv:
    raise UserError(f"{d}.num_heads={heads} must be a multiple of {d}.num_kv_heads={kv} (grouped-query "
                    f"attention); set --config.{d}.num_kv_heads to a divisor of {heads}")
  _choice(config, f"{d}.norm", NORMS)
  _choice(config, f"{d}.mlp_act", tuple(ACTIVATIONS))
  _choice(config, f"{d}.rope_type", ROPE_TYPES)
  _float(config, f"{d}.norm_eps", 0, lo_open=True)
  _float(config, f"{d}.rope_theta", 0, lo_open=True)


def _check_cross(config) -> None:
  for field in ("num_heads", "num_kv_heads", "head_dim", "mlp_dim"):
    _int(config, f"model.cross_{field}", 0)  # 0: the decoder's
  dec = config.model.decoder
  heads = config.model.get("cross_num_heads", 0) or dec.num_heads
  kv = config.model.get("cross_num_kv_heads", 0) or dec.num_kv_heads
  if heads % kv:
    raise UserError(f"the cross-attention's query heads ({heads}) must be a multiple of its kv heads "
                    f"({kv}); set --config.model.cross_num_heads / cross_num_kv_heads (0: the decoder's)")


def _check_eval(config) -> None:
  _int(config, "eval.batch_size", 1)  # its split over the mesh: sharding.check_batch in eval
  _int(config, "eval.num_samples", 0)


# --- against the parameter tree ---

def abstract_params(config, model) -> dict:
  """The model's params as ShapeDtypeStructs (an abstract trace of init: nothing is allocated)."""
  batch = example_batch(config, task=model.task)
  init = lambda rng: model.init(rng, *(batch[k] for k in TASKS[model.task].inputs))["params"]
  return nn.meta.unbox(jax.eval_shape(init, jax.random.key(0)))


def check_rules(config, params) -> None:
  """optim.rules against the parameter tree: besides optim.param_labels' checks (format, every param
  covered), every rule takes some parameter (a typo would silently leave its params to a later rule,
  often the catch-all) and some parameter trains."""
  rules = config.optim.rules
  labels = optim.param_labels(params, rules)
  names = [optim.path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
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
  data.bad_records='skip' a too-long element is skipped by design: not checked then."""
  if config.data.get("bad_records", "fail") != "fail":
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
  position = config.model.get("image_position", 0)
  if config.model.family in _IN_SEQUENCE and shortest and position > shortest[0]:
    n, r, what = shortest
    raise UserError(f"model.image_position={position} is past the text prefix of {split} record {r} "
                    f"({what}: {n} tokens); set --config.model.image_position to 0 (image first) or 1 "
                    "(after BOS)")


def _texts(record):
  """(questions, answers, caption) of a record as str; None for a damaged record: the pipeline's
  data.bad_records policy reports it (or skips it) when the run reaches it, not this check."""
  try:
    return ([q.decode() for q in record["questions"]], [a.decode() for a in record["answers"]],
            record["caption"].decode())
  except Exception:  # pylint: disable=broad-except
    return None


def _read(source) -> list:
  """_texts of every record of a TFDS source, images left undecoded."""
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
    out += [_texts(record) for record in records]
  return out


def _elements(config, tokenizer, split: str, task: str, train: bool):
  """(tokens, prefix tokens or None, record, what) of every element the pipeline makes of the split:
  pipeline._TrainExample / eval_batches (vqa) and captions.caption_tokens (contrastive)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top  (data.shapes imports it)
  records = _read(shapes.build(config.data).as_data_source(
      decoders={"image": tfds.decode.SkipDecoding()})[split])  # the text only
  cache = {}
  length = lambda text: cache.setdefault(text, len(tokenizer.encode(text)))
  if task == "contrastive":
    indices = range(len(records))
    if not train:  # retrieval uses the images whose caption is unique
      from mm_jax.tasks import contrastive  # pylint: disable=g-import-not-at-top
      indices = contrastive.unique_indices([t[2] if t else "" for t in records])
    for r in indices:
      if records[r]:
        yield length(records[r][2]) + 1, None, r, "its caption + eos"
    return
  for r, texts in enumerate(records):
    for k, (q, a) in enumerate(zip(*texts[:2]) if texts else ()):
      prefix = 1 + length(q)  # bos + question
      yield (prefix + length(a) + 1 if train else prefix), prefix, r, f"question {k} {q!r}"
  num_captions = pipeline._num_captions  # pylint: disable=protected-access
  n_captions = num_captions(config, len(records)) if train else 0
  for c in range(n_captions):
    r = c * len(records) // n_captions
    if records[r]:
      prefix = 1 + length(pipeline.CAPTION_PROMPT)
      yield prefix + length(records[r][2]) + 1, prefix, r, "its caption"

"""Scanned and unrolled layer stacks (models/stack.py): same function and gradients on the same params for
every family and remat policy, cached decoding, remat policies that change what is saved, the stacked
"layers" axis replicated by the rules, and checkpoints converted between the two layouts by name."""
import copy
import math
import pathlib
import re

import flax.linen as nn
import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import load_config, make_run, random_vqa_batch, random_vqa_rows
from mm_jax import models
from mm_jax.eval import evaluate as eval_lib
from mm_jax.train import loop as train
from mm_jax.checkpoint import Checkpoints, OtherLayout, layout, relayout
from mm_jax.eval.decode import greedy_decode
from mm_jax.errors import UserError
from mm_jax.models.stack import path_str
from mm_jax.tasks import TASKS, forward

V = 40
FAMILIES = {
    "unified": {},
    "cross": dict(family="cross", family_options=dict(cross=dict(every=1))),
    "hybrid": dict(family="hybrid", family_options=dict(cross=dict(every=2), hybrid=dict(tiles=2))),
}


def _config(family="unified", scan=False, remat="none", names=(), **extra):
  config = load_config("test")
  config.model.update(FAMILIES[family])
  config.model.update(extra)
  for section in (config.model.encoder, config.model.decoder):
    section.update(dict(scan=scan, remat=remat, remat_names=names))
  return config


def to_layout(params, scanned: bool):
  """The same params in the scanned (P/block_i/R stacked into P/blocks/R) or unrolled layout."""
  flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(params)[0]}
  out, groups = {}, {}
  for path, x in flat.items():
    if scanned and "/block_" in path:
      head, rest = path.split("/block_", 1)
      i, tail = rest.split("/", 1)
      groups.setdefault(f"{head}/blocks/{tail}", {})[int(i)] = x
    elif not scanned and "/blocks/" in path:
      head, tail = path.split("/blocks/", 1)
      out.update({f"{head}/block_{i}/{tail}": x[i] for i in range(x.shape[0])})
    else:
      out[path] = x
  out.update({path: jnp.stack([by_i[i] for i in range(len(by_i))]) for path, by_i in groups.items()})
  tree = {}
  for path, x in out.items():
    node = tree
    *parents, leaf = path.split("/")
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = x
  return tree


def _inputs(config, batch=2):
  """The old call form (4-D image, text_len tokens, no image_pos): what greedy_decode takes here."""
  b = random_vqa_batch(config, V)
  return {k: v[:batch] for k, v in b.items()}


def _rows(config, batch=2):
  """A training batch in the rows layout (the vqa task's inputs, image slots in the row)."""
  return random_vqa_rows(config, V, batch)


def _args(batch):
  return [batch[k] for k in TASKS["vqa"].inputs]


@pytest.mark.slow  # forward and grads, scanned and unrolled
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scanned_equals_unrolled_forward_and_grads(family):
  config = _config(family)
  if family == "hybrid":
    config.data.image_size = 32  # tiles of 16 with patch 8
  batch = _rows(config)
  model = models.build_model(config.model, V)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *_args(batch)))["params"]
  scanned = models.build_model(_config(family, scan=True).model, V)
  sparams = to_layout(params, scanned=True)
  # The scanned init builds the same tree shapes.
  abstract = jax.eval_shape(scanned.init, jax.random.key(0), *_args(batch))
  shapes = lambda t: jax.tree.map(lambda x: x.shape, nn.meta.unbox(t))
  assert shapes(abstract["params"]) == shapes(sparams)
  assert "blocks" in sparams["decoder"] and "block_0" not in sparams["decoder"]
  # Gates open, so the cross path counts.
  open_gates = lambda t: jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, 0.5) if p[-1].key.endswith("_gate") else x, t)
  params, sparams = open_gates(params), open_gates(sparams)
  loss = lambda m, p: jnp.mean(forward(m, p, batch) ** 2)
  l1, g1 = jax.jit(jax.value_and_grad(lambda p: loss(model, p)))(params)
  l2, g2 = jax.jit(jax.value_and_grad(lambda p: loss(scanned, p)))(sparams)
  np.testing.assert_allclose(l1, l2, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4), to_layout(g1, True), g2)


@pytest.mark.slow  # two cached decodes per family
@pytest.mark.parametrize("family", ["unified", "cross"])
def test_scanned_cached_decoding_equals_unrolled(family):
  config = _config(family)
  batch = _inputs(config)
  model, scanned = models.build_model(config.model, V), models.build_model(_config(family, scan=True).model, V)
  args = [batch[k] for k in ("image", "text", "mask_ar", "mask_input")]
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), *args))["params"]
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.full_like(x, 0.5) if p[-1].key.endswith("_gate") else x, params)
  cache = scanned.decoder.init_cache(2, 8)
  assert cache["k"].shape[0] == config.model.decoder.depth  # one stacked cache
  prefix, mask = batch["text"][:, :5], jnp.ones((2, 5), jnp.int32)
  decode = lambda m, p: jax.jit(lambda p: greedy_decode(m, p, batch["image"], prefix, mask,
                                                        jnp.array([5, 3]), 4))(p)
  np.testing.assert_array_equal(decode(model, params), decode(scanned, to_layout(params, True)))


@pytest.fixture(scope="module")
def remat_base():
  batch = _rows(_config())
  base = models.build_model(_config(scan=True).model, V)
  params = nn.meta.unbox(jax.jit(base.init)(jax.random.key(0), *_args(batch)))["params"]
  f = lambda m: (lambda p: jnp.mean(forward(m, p, batch) ** 2))
  return f, params, jax.jit(jax.value_and_grad(f(base)))(params), f(base)


@pytest.mark.parametrize("remat,names", [("full", ()), ("dots", ()), ("custom", ("attn_out", "mlp_hidden"))])
def test_remat_policies_keep_the_function_and_save_less(remat_base, remat, names, capsys):
  f, params, (l1, g1), f_base = remat_base
  other = models.build_model(_config(scan=True, remat=remat, names=names).model, V)
  l2, g2 = jax.jit(jax.value_and_grad(f(other)))(params)
  np.testing.assert_allclose(l1, l2, rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), g1, g2)
  assert _saved_elements(f(other), params, capsys) < _saved_elements(f_base, params, capsys), (
      f"remat {remat} saves no less than none")


def _saved_elements(f, params, capsys) -> int:
  """Elements of the residuals the backward pass keeps (jax.ad_checkpoint.print_saved_residuals)."""
  capsys.readouterr()
  jax.ad_checkpoint.print_saved_residuals(f, params)
  shapes = re.findall(r"^\w+\[([\d,]*)\]", capsys.readouterr().out, re.M)
  assert shapes, "no residuals printed"
  return sum(math.prod(int(d) for d in s.split(",") if d) for s in shapes)


def test_remat_config_errors():
  with pytest.raises(UserError, match=r"model.decoder.remat='sometimes' is unknown"):
    models.build_model(_config(remat="sometimes").model, V).init(jax.random.key(0), *[
        v for k, v in _inputs(_config()).items() if k in ("image", "text", "mask_ar", "mask_input")])
  config = _config(remat="custom", names=("attention",))
  with pytest.raises(UserError, match=r"remat_names has unknown tags \['attention'\]"):
    b = _inputs(config)
    models.build_model(config.model, V).init(jax.random.key(0), b["image"], b["text"], b["mask_ar"],
                                             b["mask_input"])
  with pytest.raises(UserError, match=r"multiple of model.family_options.cross.every"):
    models.build_model(_config("cross", scan=True, family_options=dict(cross=dict(every=3))).model, V)


def test_layers_axis_is_replicated_and_the_rest_sharded():
  config = _config(scan=True)
  config.mesh.update(dict(data=1, fsdp=4, tensor=2))
  mm, _ = make_run(config, jax.devices(), V)
  q = mm.abstract_params["decoder"]["blocks"]["attn"]["q"]["kernel"]
  assert q.shape[0] == config.model.decoder.depth
  assert q.sharding.spec[0] is None and q.sharding.spec[1] == "fsdp"  # layers, embed, heads...


def test_layout_names():
  sig = {"decoder/blocks/attn/q/kernel": "float32[2, 4, 8]", "encoder/block_0/ln/scale": "float32[4]"}
  assert layout(sig) == {"decoder": "scanned", "encoder": "unrolled"}
  assert relayout("decoder/block_1/attn/q/kernel", (4, 8), sig) == (
      "index", "decoder/blocks/attn/q/kernel", 1, 2)
  assert relayout("decoder/block_2/attn/q/kernel", (4, 8), sig) is None  # past the stack
  assert relayout("encoder/blocks/ln/scale", (1, 4), sig) == ("stack", ("encoder/block_0/ln/scale",))
  assert relayout("encoder/blocks/ln/scale", (2, 4), sig) is None  # block_1 missing


@pytest.fixture(scope="module")
def scanned_run(test_config, tmp_path_factory):
  config = copy.deepcopy(test_config)
  for section in (config.model.encoder, config.model.decoder):
    section.update(dict(scan=True, remat="full"))
  workdir = str(tmp_path_factory.mktemp("scanned"))
  train.train(config, workdir)
  return config, workdir


@pytest.mark.slow  # trains end to end
def test_checkpoint_layout_converts_for_eval_and_init_parts(scanned_run, test_config):
  config, workdir = scanned_run
  ckpt = Checkpoints(workdir, read_only=True)
  step = ckpt.latest_step()
  assert ckpt.meta(step)["layout"] == {"encoder": "scanned", "decoder": "scanned"}
  ckpt.close()
  scanned_eval = eval_lib.evaluate(config, workdir, "validation")
  unrolled = copy.deepcopy(test_config)  # the same run evaluated with unrolled layers
  unrolled_eval = eval_lib.evaluate(unrolled, workdir, "validation")
  assert scanned_eval["vqa_exact_match"] == pytest.approx(unrolled_eval["vqa_exact_match"], abs=1e-6)
  # Resuming with the other layout: a clear error naming both ways out; nothing written.
  before = _files(workdir)
  with pytest.raises(OtherLayout, match=r"stores the layers of .*scanned, this config has them unrolled.*init.parts"):
    train.train(unrolled, workdir)
  # init.parts from the scanned run into an unrolled model: params equal to the stacked ones.
  unrolled.init.parts = ((workdir, "", ""),)
  unrolled.total_steps = 0
  mm, _ = make_run(unrolled, jax.devices()[:1], _vocab(unrolled))
  params = train.initial_params(unrolled, mm)
  ckpt = Checkpoints(workdir, read_only=True)
  saved = ckpt.restore_params(step, make_run(config, jax.devices()[:1], _vocab(config))[0].abstract_params)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, to_layout(params, True), jax.device_get(saved))
  assert _files(workdir) == before


def _files(workdir):
  return sorted((str(p), p.stat().st_mtime_ns) for p in pathlib.Path(workdir).rglob("*"))


def _vocab(config):
  from mm_jax.data import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.load_tokenizer(config).vocab_size

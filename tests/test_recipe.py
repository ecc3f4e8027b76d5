"""Stage recipes (configs/recipes.py, mm_jax.recipe) at the `test` variant on the session's test dataset:
whole recipes trained, checked and evaluated in-process with one shared pretraining dir; the two stage
checks fail when violated; every stage config of every recipe builds and its rules cover its params."""
import json
import os
import shlex
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO, command_env, load_config, make_run
from mm_jax import recipe
from mm_jax.models import stack
from mm_jax.train import optim
from mm_jax.checkpoint import Checkpoints
from mm_jax.errors import UserError

pytestmark = pytest.mark.slow  # end to end through the commands

# recipe -> its stages after the pretraining: (name, trainable top-level subtrees, model family)
EXPECTED = {
    "llava": [("connector", {"connector"}, "unified"),
              ("connector_llm", {"connector", "decoder"}, "unified")],
    "llama32_vision": [("encoder_cross", {"encoder", "connector", "cross"}, "cross")],
    "molmo": [("all", {"encoder", "connector", "decoder"}, "unified")],
    "baichuan_omni": [("connector", {"connector"}, "unified"),
                      ("connector_encoder", {"connector", "encoder"}, "unified"),
                      ("all", {"encoder", "connector", "decoder"}, "unified")],
    "qwen2_vl": [("encoder", {"encoder", "connector"}, "unified"),
                 ("all", {"encoder", "connector", "decoder"}, "unified"),
                 ("llm", {"decoder"}, "unified")],
    "nvlm_x": [("cross", {"connector", "cross"}, "cross"),
               ("cross_sft", {"connector", "cross"}, "cross")],
}
PRETRAIN = [("siglip", {"encoder", "map_head", "text", "logit_scale", "logit_bias"}, "siglip"),
            ("text_lm", {"decoder"}, "lm")]


def _recipe(name: str, data_dir: str):
  r = load_config(f"{name},test", "recipes")
  r.data_dir = data_dir
  return r


@pytest.fixture(scope="module")
def run_recipe(test_config, tmp_path_factory):
  """name -> (recipe.json's dict, recipe config, {stage: workdir}) of `name,test`, each recipe run once;
  all share one pretraining dir."""
  pretrain, done = str(tmp_path_factory.mktemp("pretrain")), {}

  def run(name):
    if name not in done:
      r, workdir = _recipe(name, test_config.data.data_dir), str(tmp_path_factory.mktemp(name))
      summary = recipe.run_recipe(r, workdir, pretrain)
      assert json.loads(open(os.path.join(workdir, "recipe.json")).read()) == summary
      done[name] = summary, r, workdir, pretrain
    return done[name]
  return run


def _params(workdir: str, config, subtree: str, vocab_size: int) -> dict:
  """`subtree` of the params in the newest checkpoint of `workdir`, on one device, as numpy."""
  mm, _ = make_run(config, jax.devices()[:1], vocab_size)
  ckpt = Checkpoints(workdir, read_only=True)
  params = ckpt.restore_params(ckpt.latest_step(), {subtree: mm.abstract_params[subtree]})
  ckpt.close()
  return jax.tree.map(np.asarray, params)


def _assert_bitwise_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes()


def _parse_train_command(command: str):
  """The config that `python -m mm_jax.train` would build from `command` (its flags parsed here)."""
  argv = ["mm_jax.train", *shlex.split(command)[3:]]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  fv(argv)
  return fv.config, fv.workdir


# llama32_vision is the cross family; llava the one with both pretrainings trained here (first).
@pytest.mark.parametrize("name", ["llava", "qwen2_vl", "llama32_vision"])
def test_recipe_end_to_end(name, run_recipe, tokenizer):
  summary, r, workdir, pretrain = run_recipe(name)
  workdirs = recipe.stage_workdirs(r, workdir, pretrain)
  stages = summary["stages"]
  assert [s["name"] for s in stages] == [n for n, _, _ in PRETRAIN + EXPECTED[name]]
  for i, (s, (stage_name, trainable, family)) in enumerate(zip(stages, PRETRAIN + EXPECTED[name])):
    config, _ = recipe.stage_config(r, i, workdirs)
    assert config.model.family == family and s["workdir"] == workdirs[stage_name]
    mm, _ = recipe.describe(config)
    sizes = {stack.path_str(p): x.size
             for p, x in jax.tree_util.tree_flatten_with_path(mm.abstract_params)[0]}
    want_trainable = [k for k in sizes if k.split("/")[0] in trainable]
    assert s["total_steps"] == config.total_steps and s["total_params"] == sum(sizes.values())
    assert s["trainable_params"] == sum(sizes[k] for k in want_trainable)
    assert s["frozen_params_unchanged"] == len(sizes) - len(want_trainable)
    assert s["opt_state_elements"] == 2 * s["trainable_params"] + s["opt_state_counters"]
    assert s["opt_state_counters"] == 2  # Adam's count and the schedule's
    assert s["eval"]["step"] == config.total_steps
    if i >= len(PRETRAIN):  # trained and checked by this run (the pretraining by the first recipe's)
      assert s["trained_steps"] == config.total_steps and s["checked_now"]
    assert ("i2t_recall@1" if family == "siglip" else "vqa_exact_match") in s["eval"]
    # The printed standalone command builds exactly this stage's config.
    parsed, parsed_workdir = _parse_train_command(s["command"])
    assert parsed.to_dict() == config.to_dict() and parsed_workdir == s["workdir"]
    # Read back here: frozen subtrees are bitwise those of the stage they were loaded from; loaded
    # trainable ones changed (the stage trained, so the checks were not vacuous).
    sources = {dst.rstrip("/"): src for src, _, dst in r.stages[i].init}
    for subtree in {p.split("/")[0] for p in sizes}:
      source = sources.get(subtree, sources.get(""))
      if source:
        now, then = (_params(workdirs[n], config, subtree, tokenizer.vocab_size)
                     for n in (stage_name, source))
        if subtree in trainable:
          assert any(x.tobytes() != y.tobytes()
                     for x, y in zip(jax.tree.leaves(now), jax.tree.leaves(then)))
        else:
          _assert_bitwise_equal(now, then)

  if name == "llava":  # the same command again resumes: nothing trains, nothing changes
    again = recipe.run_recipe(r, workdir, pretrain)
    assert [s["trained_steps"] for s in again["stages"]] == [0] * len(stages)
    drop = lambda s: {k: v for k, v in s.items()
                      if k not in ("trained_steps", "train_seconds", "checked_now")}
    assert [drop(s) for s in again["stages"]] == [drop(s) for s in stages]


def _small_params():
  """(params, labels): a trainable connector/w (6 elements), a frozen encoder/b and encoder/w."""
  params = {"connector": {"w": jnp.ones((2, 3))},
            "encoder": {"b": jnp.zeros((3,)), "w": jnp.ones((3, 3))}}
  return params, {"connector": {"w": "trainable"}, "encoder": {"b": "frozen", "w": "frozen"}}


def test_frozen_check_fails_when_a_frozen_param_changed():
  before, labels = _small_params()
  after = jax.tree.map(lambda x: x, before)
  after["connector"]["w"] = before["connector"]["w"] + 1
  assert recipe.check_frozen_unchanged("s1", labels, before, after) == 2
  after["encoder"]["w"] = before["encoder"]["w"].at[2, 2].add(1e-7)
  with pytest.raises(recipe.CheckError, match=r"stage s1: frozen parameter encoder/w "):
    recipe.check_frozen_unchanged("s1", labels, before, after)
  after["encoder"]["w"] = before["encoder"]["w"]
  after["encoder"]["b"] = -before["encoder"]["b"]  # -0.0 == 0.0, but not bitwise
  with pytest.raises(recipe.CheckError, match=r"frozen parameter encoder/b "):
    recipe.check_frozen_unchanged("s1", labels, before, after)
  assert issubclass(recipe.CheckError, UserError)  # the CLI: one line, exit 1


def test_opt_state_check_fails_with_state_for_a_frozen_param(test_config):
  params, labels = _small_params()
  good = optim.make_optimizer(test_config.optim, 3, labels).init(params)
  assert recipe.check_opt_state("s2", labels, params, good) == (2 * 6 + 2, 2)
  all_trainable = jax.tree.map(lambda _: "trainable", labels)
  bad = optim.make_optimizer(test_config.optim, 3, all_trainable).init(params)
  with pytest.raises(recipe.CheckError, match=r"stage s2: .* for frozen parameter encoder/b;"):
    recipe.check_opt_state("s2", labels, params, bad)
  with pytest.raises(recipe.CheckError, match=r"stage s2: trainable parameter connector/w has 0 "):
    recipe.check_opt_state("s2", labels, params, {"count": jnp.zeros((), jnp.int32)})


@pytest.mark.parametrize("name", list(EXPECTED))
def test_every_stage_config_builds_and_rules_cover_params(name, test_config):
  r = _recipe(name, test_config.data.data_dir)
  workdirs = recipe.stage_workdirs(r, "/w", "/p")
  for i, (stage_name, trainable, family) in enumerate(PRETRAIN + EXPECTED[name]):
    config, _ = recipe.stage_config(r, i, workdirs)
    assert r.stages[i].name == stage_name and config.model.family == family
    assert workdirs[stage_name] == f"/{'p' if i < len(PRETRAIN) else 'w'}/{stage_name}"
    mm, labels = recipe.describe(config)  # abstract (eval_shape); raises if the rules leave a param
    got = {stack.path_str(p).split("/")[0] for (p, _), lab in zip(
        jax.tree_util.tree_flatten_with_path(mm.abstract_params)[0], jax.tree.leaves(labels))
           if lab == "trainable"}
    assert got == trainable
  # Full scale: the same pretraining everywhere, then 3000 multimodal steps (the unified default's).
  full = load_config(name, "recipes")
  assert [s.to_dict() for s in full.stages[:2]] == [s.to_dict() for s in
                                                    load_config("llava", "recipes").stages[:2]]
  assert sum(s.overrides["total_steps"] for s in full.stages if not s.pretrain) == 3000


def test_unknown_recipe_names_the_known_ones(tmp_path):
  with pytest.raises(ValueError, match="unknown recipe 'nope'; known: llava, llama32_vision, molmo"):
    load_config("nope", "recipes")
  env = command_env()
  r = subprocess.run([sys.executable, "-m", "mm_jax.recipe", "--config=configs/recipes.py:nope",
                      f"--workdir={tmp_path}/w"], cwd=REPO, env=env, capture_output=True, text=True)
  assert r.returncode != 0 and "Traceback" not in r.stderr
  assert "unknown recipe 'nope'; known: llava, llama32_vision" in r.stderr.strip().splitlines()[-1]
  assert not (tmp_path / "w").exists()
  assert all(f"{n} (" in recipe._recipe_names() for n in EXPECTED)  # what --help lists

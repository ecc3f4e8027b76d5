r"""Runs a stage recipe (configs/recipes.py) end to end: every stage trained, checked and evaluated.

  python -m mm_jax.recipe --config=configs/recipes.py:llava --workdir=workdirs/recipes/llava \
      [--pretrain_dir=workdirs/recipes/pretrain]

Stage S trains in WORKDIR/S (pretraining stages in PRETRAIN_DIR/S, default WORKDIR/pretrain) by
mm_jax.train.train, in this process: the stage's base config + overrides, with init.parts pointing at
the earlier stages' workdirs; its equivalent `python -m mm_jax.train ...` command is printed. Every
stage config is built and its rules checked before anything trains; the same command resumes.
After each stage two checks, which exit non-zero naming the stage and the first offending parameter:
every frozen parameter is bitwise its step-0 value (train.initial_params), and the checkpoint's
optimizer state holds Adam's mu and nu of each trainable parameter and nothing of a frozen one
(2 x trainable elements + counters). Then the test split eval. WORKDIR/recipe.json holds per stage
its workdir, steps, params, checks, scores and train seconds.
"""
import contextlib
import fcntl
import json
import os
import shlex
import time

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp
from absl import flags
from jax.experimental import multihost_utils
from ml_collections import config_flags

from mm_jax import cli, data
from mm_jax.train import optim
from mm_jax.train import sharding
from mm_jax.checkpoint import Checkpoints, workdir_path
from mm_jax.config import files
from mm_jax.errors import UserError
from mm_jax.eval.evaluate import evaluate
from mm_jax.models.stack import path_str
from mm_jax.train.state import ModelOnMesh
from mm_jax.train.loop import initial_params, train



class CheckError(UserError):
  """A stage broke its freeze rules: a trainer bug, not bad input. Names the stage and the parameter."""


def stage_workdirs(recipe: mlc.ConfigDict, workdir: str, pretrain_dir: str | None = None) -> dict:
  pretrain_dir = pretrain_dir or os.path.join(workdir, "pretrain")
  names = [s.name for s in recipe.stages]
  if len(set(names)) != len(names) or "pretrain" in names:
    raise UserError(f"recipe {recipe.name}: stage names {names} must be unique and not 'pretrain'")
  return {s.name: os.path.join(pretrain_dir if s.pretrain else workdir, s.name) for s in recipe.stages}


def stage_config(recipe: mlc.ConfigDict, index: int, workdirs: dict) -> tuple[mlc.ConfigDict, dict]:
  """(train config, the flat overrides that make it from the stage's base config) of stage `index`."""
  stage = recipe.stages[index]
  overrides = dict(stage.overrides)
  earlier = [s.name for s in recipe.stages[:index]]
  parts = []
  for name, src, dst in stage.init:
    if name not in earlier:
      raise UserError(f"recipe {recipe.name}: stage {stage.name} inits from {name!r}, which is not an "
                      f"earlier stage ({', '.join(earlier) or 'none'})")
    parts.append((workdirs[name], src, dst))
  if parts:
    overrides["init.parts"] = tuple(parts)
  if recipe.data_dir:
    overrides["data.data_dir"] = recipe.data_dir
  for field in ("checkpoint_every", "keep_checkpoints"):
    if recipe[field]:
      overrides[field] = recipe[field]
  config = files.load(stage.config)
  config.lock()  # an override naming no field is an error, not a new field
  for key, value in overrides.items():
    try:
      config.update_from_flattened_dict({key: value})
    except (AttributeError, KeyError, TypeError, ValueError) as e:
      raise UserError(f"recipe {recipe.name}, stage {stage.name}: override {key}={value!r} does not fit "
                      f"{stage.config} ({cli.one_line(e)}); fix configs/recipes.py") from None
  return config, overrides


def _flag_value(v) -> str:
  """A value as config_flags parses it: tuples as Python literals (double-quoted strings), str raw."""
  if isinstance(v, (tuple, list)):
    items = [_flag_value(x) if isinstance(x, (tuple, list)) else json.dumps(x) for x in v]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  return str(v)


def train_command(config_spec: str, overrides: dict, workdir: str) -> str:
  """The equivalent `python -m mm_jax.train` command line (shell-quoted)."""
  path, sep, arg = config_spec.partition(":")
  args = ["python", "-m", "mm_jax.train", f"--config={files.path(path)}{sep}{arg}",
          f"--workdir={workdir}"]
  args += [f"--config.{k}={_flag_value(v)}" for k, v in overrides.items()]
  return " ".join(shlex.quote(a) for a in args)


def describe(config: mlc.ConfigDict, mesh=None) -> tuple[ModelOnMesh, dict]:
  """(the model on a mesh, its freeze labels): abstract only; raises UserError for uncovered params."""
  mesh = mesh or sharding.make_mesh(config.mesh)
  mm = ModelOnMesh.create(config, data.load_tokenizer(config).vocab_size, mesh)
  return mm, optim.param_labels(mm.abstract_params, config.optim.rules)


# --- the checks ---

def _local_differs(x, y) -> bool:
  """Bitwise difference on this process's shards (replica 0 of each), or whole host arrays."""
  shards = lambda a: ([s.data for s in a.addressable_shards if s.replica_id == 0]
                      if hasattr(a, "addressable_shards") else [a])
  for a, b in zip(shards(x), shards(y)):
    a, b = np.asarray(a), np.asarray(b)
    if a.dtype != b.dtype or a.shape != b.shape or a.tobytes() != b.tobytes():
      return True
  return False


def check_frozen_unchanged(stage: str, labels, before, after) -> int:
  """(a) Raises CheckError at the first frozen param of `after` not bitwise `before`'s; returns how many
  frozen params were checked. `before` may hold ShapeDtypeStructs for trainable params (not read)."""
  flat = jax.tree_util.tree_flatten_with_path(before)[0]
  if jax.tree.structure(before) != jax.tree.structure(after):
    raise CheckError(f"stage {stage}: the params after the stage have another tree than at step 0")
  labels_L = jax.tree.leaves(labels)
  differs_L = np.array([lab == "frozen" and _local_differs(x, y)
                        for (_, x), y, lab in zip(flat, jax.tree.leaves(after), labels_L)])
  if jax.process_count() > 1:  # every process saw its own shards
    differs_L = np.asarray(multihost_utils.process_allgather(differs_L)).any(0)
  for (path, _), differs in zip(flat, differs_L):
    if differs:
      raise CheckError(f"stage {stage}: frozen parameter {path_str(path)} is not bitwise equal to "
                       "its step-0 value after training; the optimizer updated a parameter that "
                       "optim.rules freezes")
  return labels_L.count("frozen")


def check_opt_state(stage: str, labels, params, opt_state) -> tuple[int, int]:
  """(b) Raises CheckError unless `opt_state` (leaves with .shape) holds exactly two arrays of each
  trainable param's shape (path ending with the param's path), none of a frozen one, and scalars.

  Returns (elements, scalar counters): elements == 2 x trainable elements + counters."""
  info = {path_str(p): (lab, tuple(x.shape)) for (p, x), lab in
          zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(labels))}
  count = {p: 0 for p, (lab, _) in info.items() if lab == "trainable"}
  elements = counters = 0
  for path, x in jax.tree_util.tree_flatten_with_path(opt_state)[0]:
    name, shape = path_str(path), tuple(x.shape)
    elements += int(np.prod(shape))
    parts = name.split("/")
    param = next(("/".join(parts[i:]) for i in range(len(parts)) if "/".join(parts[i:]) in info), None)
    if param is None:
      if shape:
        raise CheckError(f"stage {stage}: optimizer-state array {name} {list(shape)} is of no parameter")
      counters += 1
    elif info[param][0] == "frozen":
      raise CheckError(f"stage {stage}: the optimizer state holds {name} for frozen parameter {param}; "
                       "a frozen parameter must have none (optax.set_to_zero in optim.make_optimizer)")
    elif shape != info[param][1]:
      raise CheckError(f"stage {stage}: optimizer-state array {name} is {list(shape)}, its parameter "
                       f"{param} {list(info[param][1])}")
    else:
      count[param] += 1
  for param, n in count.items():
    if n != 2:
      raise CheckError(f"stage {stage}: trainable parameter {param} has {n} optimizer-state arrays, "
                       "not 2 (Adam's mu and nu)")
  want = 2 * sum(int(np.prod(info[p][1])) for p in count) + counters
  if elements != want:  # implied by the above; stated as the invariant it is
    raise CheckError(f"stage {stage}: the optimizer state has {elements} elements, not {want}")
  return elements, counters


def saved_state_tree(workdir: str, step: int) -> dict:
  """The train state tree as the checkpoint at `step` holds it (leaves: metadata with .shape)."""
  return ocp.PyTreeCheckpointHandler().metadata(
      workdir_path(workdir) / "checkpoints" / str(step) / "state").tree


def check_stage(config: mlc.ConfigDict, stage: str, workdir: str) -> dict:
  """Both checks on the stage's final checkpoint; returns the counts for recipe.json."""
  mm, labels = describe(config)
  ckpt = Checkpoints(workdir, read_only=True)
  step = ckpt.latest_step()
  if step != config.total_steps:
    raise CheckError(f"stage {stage}: the newest checkpoint in {ckpt.directory} is at step {step}, not "
                     f"total_steps {config.total_steps}")
  final = ckpt.restore_params(step, mm.abstract_params)
  ckpt.close()
  frozen = [path_str(p) for p, lab in jax.tree_util.tree_flatten_with_path(labels)[0]
            if lab == "frozen"]
  # The seeded init is computed only if a frozen param is not loaded by init.parts.
  start = initial_params(config, mm, needed=frozen)
  frozen_checked = check_frozen_unchanged(stage, labels, start, final)
  elements, counters = check_opt_state(stage, labels, mm.abstract_params,
                                       saved_state_tree(workdir, step)["opt_state"])
  sizes = [(x.size, lab) for x, lab in zip(jax.tree.leaves(mm.abstract_params), jax.tree.leaves(labels))]
  return {"trainable_params": sum(n for n, lab in sizes if lab == "trainable"),
          "total_params": sum(n for n, _ in sizes), "frozen_params_unchanged": frozen_checked,
          "opt_state_elements": elements, "opt_state_counters": counters}


# --- the run ---

def _checked(config: mlc.ConfigDict, stage: str, workdir: str, trained_now: bool) -> tuple[dict, bool]:
  """(check_stage's counts, whether checked now): kept from <workdir>/checks.json when the stage did not
  train in this run and that file is of this config (a shared pretraining stage, a resumed recipe)."""
  path = workdir_path(workdir) / "checks.json"
  key = json.loads(config.to_json_best_effort())
  if not trained_now and path.exists():
    saved = json.loads(path.read_text())
    if saved["config"] == key:
      return saved["checks"], False
  checks = check_stage(config, stage, workdir)
  if jax.process_index() == 0:
    path.write_text(json.dumps({"config": key, "checks": checks}, indent=1))
  return checks, True


@contextlib.contextmanager
def _exclusive(workdir: str):
  """One process at a time in a shared pretraining stage (recipes run in parallel share it)."""
  if "://" in workdir or jax.process_count() > 1:
    yield
    return
  os.makedirs(os.path.dirname(os.path.abspath(workdir)), exist_ok=True)
  with open(workdir.rstrip("/") + ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def _evaluate(config: mlc.ConfigDict, workdir: str) -> dict:
  saved = workdir_path(workdir) / "eval" / "test.json"
  result = json.loads(saved.read_text()) if saved.exists() else {}
  if result.get("step") != config.total_steps:
    result = evaluate(config, workdir, "test")
  return {k: v for k, v in result.items() if k != "samples"}


def _scores(result: dict) -> str:
  return " ".join(f"{k} {v:.4f}" for k, v in result.items() if isinstance(v, float))


def run_recipe(recipe: mlc.ConfigDict, workdir: str, pretrain_dir: str | None = None) -> dict:
  """Trains, checks and evaluates every stage in order; writes and returns WORKDIR/recipe.json's dict."""
  workdirs = stage_workdirs(recipe, workdir, pretrain_dir)
  configs = [stage_config(recipe, i, workdirs) for i in range(len(recipe.stages))]
  for config, _ in configs:  # a bad rule in the last stage fails now, not after the first stages
    describe(config)
  summary = {"recipe": recipe.name, "workdir": workdir, "stages": []}
  out = workdir_path(workdir)
  for i, (stage, (config, overrides)) in enumerate(zip(recipe.stages, configs)):
    wd = workdirs[stage.name]
    command = train_command(stage.config, overrides, wd)
    print(f"[{recipe.name} {i + 1}/{len(configs)}] {stage.name}: {command}", flush=True)
    with _exclusive(wd) if stage.pretrain else contextlib.nullcontext():
      ckpt = Checkpoints(wd, read_only=True)
      start_step = ckpt.latest_step() or 0
      ckpt.close()
      t0 = time.time()
      train(config, wd)
      seconds = time.time() - t0
      checks, checked_now = _checked(config, stage.name, wd, config.total_steps > start_step)
      scores = _evaluate(config, wd)
    record = {"name": stage.name, "pretrain": stage.pretrain, "workdir": wd, "config": stage.config,
              "command": command, "total_steps": config.total_steps,
              "trained_steps": config.total_steps - start_step, "train_seconds": round(seconds, 1),
              **checks, "checked_now": checked_now, "eval": scores}
    summary["stages"].append(record)
    if jax.process_index() == 0:
      out.mkdir(parents=True, exist_ok=True)
      (out / "recipe.json").write_text(json.dumps(summary, indent=1))
      print(f"[{recipe.name}] {stage.name}: {record['trained_steps']} of {config.total_steps} steps in "
            f"{seconds:.0f} s | trainable {checks['trainable_params']:,} of {checks['total_params']:,} "
            f"| frozen unchanged: {checks['frozen_params_unchanged']} arrays | opt state "
            f"{checks['opt_state_elements']:,} = 2 x trainable + {checks['opt_state_counters']} | test "
            f"{_scores(scores)}", flush=True)
  if jax.process_index() == 0:
    print(f"Wrote {out / 'recipe.json'}", flush=True)
  return summary


def _recipe_names() -> str:
  """NAME (stage -> stage) of every recipe in configs/recipes.py, for --help."""
  return "; ".join(f"{name} ({' -> '.join(s['name'] for s in stages())})"
                   for name, stages in files.module("configs/recipes.py").RECIPES.items())


def main() -> None:
  if _CONFIG.value is None or not _WORKDIR.value:
    raise UserError("--config and --workdir are required")
  run_recipe(_CONFIG.value, _WORKDIR.value, _PRETRAIN_DIR.value)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Recipe: configs/recipes.py:NAME[,test]. NAME (its stages after the shared "
      f"pretraining siglip, text_lm): {_recipe_names()}.", lock_config=True)
  _WORKDIR = flags.DEFINE_string("workdir", None, "The recipe's stages go in WORKDIR/<stage>.")
  _PRETRAIN_DIR = flags.DEFINE_string(
      "pretrain_dir", None, "The shared pretraining stages go in PRETRAIN_DIR/<stage> (default "
      "WORKDIR/pretrain); the same dir for every recipe trains them once.")
  cli.run("mm_jax.recipe", main, steps=True)

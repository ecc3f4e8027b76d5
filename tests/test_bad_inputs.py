"""The bad-input list: each entry is a command a user might type (a config field, a flag, a mesh, a
checkpoint, init.parts, the data, a topology, a converter input) that must stop with one line on stderr
naming the problem and the fix, a non-zero exit, no traceback, and its workdir (or --out, --json_out)
exactly as it was: every file's content and every directory. README.md's troubleshooting table
summarises the list. tests/test_cli.py holds six more (unknown config key, uncovered freeze rules, an
unwritable data_dir, a checkpoint of another architecture, a batch the data-parallel size does not
divide, eval with no checkpoint).

Every case is a real `python -m mm_jax.<module>` process. They run two at a time in a module fixture
(each has its own copy of the workdir, so a case that wrote would be caught by its own snapshot), and
each test asserts its case; `-k NAME` runs only the selected ones.
"""
import concurrent.futures
import copy
import dataclasses
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from conftest import REPO, command_env

CONFIG = f"{REPO}/configs/shapes_tiny.py:test"
SIGLIP = f"{REPO}/configs/siglip_shapes.py:test"
WORKERS = min(4, max(2, (os.cpu_count() or 2) // 2))  # processes at once: each is mostly imports


@dataclasses.dataclass(frozen=True)
class Bad:
  module: str           # python -m mm_jax.<module>
  args: tuple           # formatted with {workdir} {data} {trained} {tmp} {hf_*}
  expected: str         # the last stderr line contains it
  workdir: str = "trained"  # "trained": a copy of a finished 4-step run; "fresh": a dir with one note


def _train(*overrides, workdir="trained", config=CONFIG):
  return ("train", (f"--config={config}", "--workdir={workdir}", "--config.data.data_dir={data}",
                    *overrides), workdir)


def _eval(*overrides):
  return ("eval", (f"--config={CONFIG}", "--workdir={workdir}", "--config.data.data_dir={data}",
                   *overrides), "trained")


def bad(command, expected: str) -> Bad:
  module, args, workdir = command
  return Bad(module, args, expected, workdir)


CASES = {
    # Fields of the config, alone and against each other (mm_jax.validate; more in FIELD_CASES below).
    "zero total_steps": bad(_train("--config.total_steps=0"), "total_steps=0 must be an integer >= 1"),
    "zero log_every": bad(_train("--config.log_every=0"), "log_every=0 must be an integer >= 1"),
    "negative learning rate": bad(_train("--config.optim.lr=-0.001"),
                                  "optim.lr=-0.001 must be a number > 0"),
    "eval batch size 0": bad(_eval("--config.eval.batch_size=0"),
                             "eval.batch_size=0 must be an integer >= 1"),
    "image not whole patches": bad(_train("--config.data.image_size=30"),
                                   "data.image_size=30 is not a multiple of model.encoder.patch_size=8"),
    "query heads not a multiple of kv heads": bad(
        _train("--config.model.decoder.num_kv_heads=3"),
        "model.decoder.num_heads=4 must be a multiple of model.decoder.num_kv_heads=3"),
    "odd head_dim under RoPE": bad(_train("--config.model.decoder.head_dim=7"),
                                   "model.decoder.head_dim=7 must be even"),
    "text longer than the text tower": bad(
        _train("--config.data.text_len=24", workdir="fresh", config=SIGLIP),
        "data.text_len=24 exceeds model.text.max_len=20"),
    # The config against the data (mm_jax.validate): before the workdir is touched, not at the first batch.
    "text_len too short for the data": bad(_train("--config.data.text_len=8"),
                                           "data.text_len=8 is too short for the train split"),
    "image_position past the prefix": bad(_train("--config.model.image_position=40"),
                                          "model.image_position=40 is past the text prefix"),
    # Freeze rules and lr_scales against the real parameter tree.
    "freeze rule that matches nothing": bad(
        _train("--config.optim.rules=(('conector/.*','trainable'),('.*','frozen'))", workdir="fresh"),
        "optim.rules entry ('conector/.*', 'trainable') matches no parameter"),
    "every parameter frozen": bad(_train("--config.optim.rules=(('.*','frozen'),)", workdir="fresh"),
                                  "optim.rules freeze all"),
    "lr_scales regex that matches nothing": bad(_train("--config.optim.lr_scales=(('encodr/.*',0.1),)"),
                                                "optim.lr_scales regex 'encodr/.*' matches no trainable"),
    "unknown model family": bad(_train("--config.model.family=llava"), "unknown model.family 'llava'"),
    # Meshes, checkpoints and init.parts.
    "mesh of another device count": bad(_train("--config.mesh.data=3"), "needs 3 devices but 8 are present"),
    "resume with the other layer layout": bad(
        _train("--config.model.decoder.scan=True"),
        "stores the layers of decoder unrolled, this config has them scanned"),
    "resume with other freeze rules": bad(
        _train("--config.optim.rules=(('encoder/.*','frozen'),('.*','trainable'))"),
        "holds another optimizer state than this config makes"),
    "init.parts from a dir without a checkpoint": bad(
        _train("--config.init.parts=(('{tmp}/nothing','',''),)", workdir="fresh"),
        "init.parts: no checkpoint in"),
    "init.parts source prefix not in the checkpoint": bad(
        _train("--config.init.parts=(('{trained}','vision/','encoder/'),)", workdir="fresh"),
        "(for encoder/"),
    "init.parts of another architecture": bad(
        _train("--config.init.parts=(('{trained}','',''),)", "--config.model.decoder.mlp_dim=96",
               workdir="fresh"), "the architectures differ"),
    # Data and tokenizer.
    "missing tokenizer file": bad(_train("--config.data.tokenizer={tmp}/none.model"),
                                  "/none.model' does not exist"),
    "vocabulary smaller than the tokenizer": bad(_train("--config.model.decoder.vocab_size=10"),
                                                 "but model.decoder.vocab_size is 10"),
    "empty split": bad(_train("--config.data.num_validation=0"),
                       "data.num_validation is 0 but every split needs at least 1 image"),
    # Command-line flags.
    "unknown flag": bad(_train("--steps=5"), "Unknown command line flag 'steps'"),
    "override of the wrong type": bad(_train("--config.total_steps=ten"),
                                      "flag --config.total_steps=ten: invalid literal for int()"),
    "unknown config variant": bad(("train", (f"--config={REPO}/configs/shapes_tiny.py:tiny",
                                             "--workdir={workdir}"), "trained"),
                                  "unknown variant 'tiny' of shapes_tiny"),
    "eval of an unknown split": bad(_eval("--split=dev"), "unknown split 'dev'"),
    "eval of a step with no checkpoint": bad(_eval("--step=3"), "no checkpoint at step 3"),
    "eval batch the data-parallel size does not divide": bad(
        _eval("--config.eval.batch_size=12"), "eval.batch_size=12 is not divisible by the data-parallel"),
    "unknown recipe": bad(("recipe", (f"--config={REPO}/configs/recipes.py:nope,test", "--workdir={workdir}"),
                           "fresh"), "unknown recipe 'nope'"),
    "unknown sweep": bad(("sweep", (f"--config={CONFIG}", "--sweep=nope", "--workdir={workdir}"), "fresh"),
                         "declares no sweep 'nope'; known: connector, lr, smoke"),
    "sweep flag that a point sets": bad(
        ("sweep", (f"--config={CONFIG}", "--sweep=lr", "--workdir={workdir}", "--config.optim.lr=0.1"),
         "fresh"), "sets optim.lr, which a --config flag also sets"),
    "unknown topology": bad(("plan", (f"--config={CONFIG}", "--topology=v9-8",
                                      "--json_out={workdir}/plan.json"), "fresh"),
                            "unknown topology 'v9-8'"),
    # Converter inputs (--out is the workdir).
    "convert without config.json": bad(("convert", ("--hf_dir={hf_empty}", "--out={workdir}"), "fresh"),
                                       "holds no config.json"),
    "convert of an unsupported architecture": bad(
        ("convert", ("--hf_dir={hf_bert}", "--out={workdir}"), "fresh"),
        "architectures[0]='BertModel' is not supported by mm_jax.convert"),
}


def _run(args, timeout=300):
  env = command_env()
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _snapshot(root: pathlib.Path) -> dict:
  """path -> content hash of every file, 'dir' for every directory: what 'unchanged' means."""
  return {str(p.relative_to(root)): "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*"))}


def _inputs(tmp: pathlib.Path) -> dict:
  """The files the cases name: Hugging Face dirs that fail at successive checks."""
  import safetensors.numpy  # pylint: disable=g-import-not-at-top
  dirs = {name: tmp / name for name in ("hf_empty", "hf_bert")}
  for d in dirs.values():
    d.mkdir()
  (dirs["hf_bert"] / "config.json").write_text(json.dumps({"architectures": ["BertModel"]}))
  safetensors.numpy.save_file({}, str(dirs["hf_bert"] / "model.safetensors"))
  return {k: str(v) for k, v in dirs.items()}


def _selected(request) -> list[str]:
  """The cases of this module's tests that this session runs (all of them, or those -k selects)."""
  params = lambda item: getattr(getattr(item, "callspec", None), "params", {})
  names = [params(item)["name"] for item in request.session.items
           if item.module.__name__ == __name__ and "name" in params(item)]
  return names or list(CASES)


@pytest.fixture(scope="module")
def outcomes(request, test_config, tmp_path_factory):
  """name -> (the process, the workdir's snapshot before, after), every selected case run."""
  tmp = tmp_path_factory.mktemp("bad_inputs")
  data = test_config.data.data_dir
  trained = tmp / "trained"
  r = _run([sys.executable, "-m", "mm_jax.train", f"--config={CONFIG}", f"--workdir={trained}",
            f"--config.data.data_dir={data}"])
  assert r.returncode == 0, r.stderr[-3000:]
  fields = dict(data=data, trained=str(trained), tmp=str(tmp), **_inputs(tmp))
  jobs = {}
  for i, name in enumerate(_selected(request)):
    case, workdir = CASES[name], tmp / f"case_{i}"
    if case.workdir == "trained":
      shutil.copytree(trained, workdir)
    else:
      workdir.mkdir()
      (workdir / "notes.txt").write_text("mine")
    args = [a.format(workdir=workdir, **fields) for a in case.args]
    jobs[name] = (workdir, [sys.executable, "-m", f"mm_jax.{case.module}", *args])
  before = {name: _snapshot(workdir) for name, (workdir, _) in jobs.items()}
  sources = _snapshot(trained)  # read by the init.parts cases
  with concurrent.futures.ThreadPoolExecutor(WORKERS) as pool:
    runs = dict(zip(jobs, pool.map(lambda job: _run(job[1]), jobs.values())))
  assert _snapshot(trained) == sources
  return {name: (runs[name], before[name], _snapshot(workdir)) for name, (workdir, _) in jobs.items()}


@pytest.mark.slow  # every case through its command
@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_one_line_nonzero_exit_workdir_unchanged(name, outcomes):
  r, before, after = outcomes[name]
  assert r.returncode != 0, r.stdout[-2000:]
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  line = r.stderr.strip().splitlines()[-1]
  assert line.startswith(f"mm_jax.{CASES[name].module}: error: "), r.stderr[-2000:]
  assert CASES[name].expected in line, r.stderr[-2000:]
  assert after == before


# --- mm_jax.validate in-process: more fields (the process adds nothing to these), and no false alarm ---

FIELD_CASES = [
    ({"optim.b2": 1.5}, "optim.b2=1.5 must be a number [0, 1)"),
    ({"optim.end_lr_factor": 2.0}, "optim.end_lr_factor=2.0 must be a number [0, 1]"),
    ({"optim.grad_clip": 0.0}, "optim.grad_clip=0.0 must be a number > 0"),
    ({"optim.warmup_steps": -1}, "optim.warmup_steps=-1 must be an integer >= 0"),
    ({"seed": -1}, "seed=-1 must be an integer >= 0"),
    ({"keep_checkpoints": 0}, "keep_checkpoints=0 must be an integer >= 1"),
    ({"global_batch_size": 0}, "global_batch_size=0 must be an integer >= 1"),
    ({"data.caption_ratio": -0.5}, "data.caption_ratio=-0.5 must be a number >= 0"),
    ({"data.vocab_size": 4}, "data.vocab_size=4 must be an integer > 4"),
    ({"model.max_answer_len": 0}, "model.max_answer_len=0 must be an integer >= 1"),
    ({"eval.num_samples": -1}, "eval.num_samples=-1 must be an integer >= 0"),
    ({"model.encoder.num_heads": 3}, "model.encoder.num_heads=3 must divide model.encoder.width=32"),
    ({"model.decoder.depth": 0}, "model.decoder.depth=0 must be an integer >= 1"),
    ({"model.decoder.mlp_act": "relu2"}, "model.decoder.mlp_act='relu2' is unknown"),
    ({"model.decoder.norm": "rms"}, "model.decoder.norm='rms' is unknown; use one of gemma, llama"),
    ({"model.decoder.rope_type": "yarn"}, "model.decoder.rope_type='yarn' is unknown"),
    ({"model.family": "cross", "model.family_options.cross.num_kv_heads": 3},
     "the cross-attention's query heads (4) must be a multiple of its kv heads (3)"),
    ({"model.family": "hybrid", "data.image_size": 40},
     "the tile side 20 (data.image_size=40 / model.family_options.hybrid.tiles=2) is not a multiple of "
     "model.encoder.patch_size=8"),
    ({"model.family": "fuyu", "data.image_size": 36}, "data.image_size=36 is not a multiple"),
    ({"model.family": "cross", "model.family_options.cross.encoder": "vitt"},
     "model.family_options.cross.encoder='vitt' is not one of vit, mllama"),
    ({"model.family": "cross", "model.family_options.cross.layers": (1, 1)},
     "model.family_options.cross.layers=(1, 1) must be ascending distinct indices in [0, 4)"),
    ({"model.family": "cross", "model.family_options.cross.unseen_rows": "hf", "data.packing": True},
     "unseen_rows='hf' lets a token that sees no image read every image of its row"),
    ({"model.family": "hybrid", "model.family_options.cross.encoder": "mllama"},
     "the hybrid family tiles images itself"),
    ({"model.decoder.embed_rows": 300}, "model.decoder.embed_rows=300 needs an untied head"),
]


@pytest.mark.parametrize("overrides,expected", FIELD_CASES, ids=[str(c[0]) for c in FIELD_CASES])
def test_field_check_names_the_field(overrides, expected, test_config):
  from mm_jax.config import validate  # pylint: disable=g-import-not-at-top
  from mm_jax.errors import UserError  # pylint: disable=g-import-not-at-top
  config = copy.deepcopy(test_config)
  config.update_from_flattened_dict(overrides)
  with pytest.raises(UserError, match=re.escape(expected)):
    validate.check_fields(config)


def test_the_repo_configs_pass(test_config):
  """Every config and variant of configs/ passes the field checks; the test config in every family and
  with every connector, and every stage of every recipe, pass the checks against the tree too."""
  from conftest import load_config  # pylint: disable=g-import-not-at-top
  from mm_jax import recipe  # pylint: disable=g-import-not-at-top
  from mm_jax.config import files  # pylint: disable=g-import-not-at-top
  from mm_jax.config import validate  # pylint: disable=g-import-not-at-top
  from mm_jax.models import build_model  # pylint: disable=g-import-not-at-top
  for name, variants in (("shapes_tiny", ("", "blind", "test")), ("siglip_shapes", ("", "softmax", "test")),
                         ("paligemma_3b", ("", "448,frozen_encoder")), ("llava_7b", ("", "stage1", "all")),
                         ("llama32_vision_11b", ("", "all", "oversized")),
                         ("shapes_native", ("fixed", "native", "anyres", "native,test")),
                         ("shapes_video", ("video", "middle", "video,test")), ("qwen2_vl_7b", ("",))):
    for variant in variants:
      validate.check_fields(load_config(variant, name))
  for family, connector in [(f, "linear") for f in ("unified", "cross", "hybrid", "fuyu", "lm")] + [
      ("unified", c) for c in ("mlp", "resampler", "pixel_shuffle")]:
    config = copy.deepcopy(test_config)
    config.model.family, config.model.connector = family, connector
    validate.check_config(config)
  siglip = load_config("test", "siglip_shapes")
  siglip.data.data_dir = test_config.data.data_dir
  validate.check_config(siglip)
  validate.check_config(siglip, "test", train=False)
  for name in files.module("configs/recipes.py").RECIPES:
    spec = files.load(f"configs/recipes.py:{name},test")
    workdirs = recipe.stage_workdirs(spec, "unused")
    for i in range(len(spec.stages)):
      config = recipe.stage_config(spec, i, workdirs)[0]
      validate.check_fields(config)
      model = build_model(config.model, config.data.vocab_size)
      validate.check_rules(config, validate.abstract_params(config, model))

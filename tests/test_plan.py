"""mm_jax.plan: topology names, the missing-libtpu error, and the whole plan on this host's CPU devices
(`cpu-N`: the same code path as a TPU topology, minus libtpu). TPU compiles run only where libtpu is
installed (pip install -e '.[tpu]')."""
import importlib.util
import json
import subprocess
import sys

import pytest
from conftest import REPO, command_env, load_config

from mm_jax.perf import plan
from mm_jax.errors import UserError

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None


def _cli(*args, env=None):
  env = command_env(**(env or {}))
  return subprocess.run([sys.executable, "-m", "mm_jax.plan", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("name,gen,chips,slices,devices,topology_name,chip_config,wrap", [
    ("v5e-16", "v5e", 16, 1, 16, "v5e:4x4", "default", (False, False, False)),
    ("v5litepod-16", "v5e", 16, 1, 16, "v5e:4x4", "default", (False, False, False)),
    ("v5e-256", "v5e", 256, 1, 256, "v5e:16x16", "default", (True, True, False)),
    ("v6e-64", "v6e", 64, 1, 64, "v6e:8x8", "default", (False, False, False)),
    ("v6e-128", "v6e", 128, 1, 128, "v6e:8x16", "default", (False, True, False)),
    ("v4-32", "v4", 16, 1, 16, "v4:2x2x4", "megacore", (False, False, False)),  # 32 TensorCores
    ("v5p-32", "v5p", 16, 1, 16, "v5:2x2x4", "megacore", (False, False, False)),
    ("v5p-128", "v5p", 64, 1, 64, "v5:4x4x4", "megacore", (True, True, True)),
    ("tpu7x-16", "tpu7x", 8, 1, 16, "tpu7x:2x2x2", "default", (False, False, False)),  # 2 per chip
    ("2xv5e-256", "v5e", 256, 2, 512, "v5e:16x16", "default", (True, True, False)),
    ("V5E-1", "v5e", 1, 1, 1, "v5e:1x1", "default", (False, False, False)),
])
def test_parse_topology(name, gen, chips, slices, devices, topology_name, chip_config, wrap):
  topo = plan.parse_topology(name)
  assert (topo.generation, topo.chips, topo.slices, topo.devices) == (gen, chips, slices, devices)
  args = topo.topology_desc_args()
  assert (args["topology_name"], args["chip_config_name"], args["wrap"]) == (topology_name, chip_config,
                                                                               wrap)
  assert args["num_slices"] == slices
  assert args["chips_per_host_bounds"] == ((1, 1, 1) if chips == 1 else (2, 2, 1))


def test_parse_cpu_topology():
  topo = plan.parse_topology("cpu-8")
  assert (topo.generation, topo.devices) == ("cpu", 8)


@pytest.mark.parametrize("name", ["v5e-3", "v5p-33", "v4-2", "v9-16", "tpu", "0xv5e-16", "cpu-0",
                                  "2xcpu-8", "v5e16"])
def test_unknown_topology_lists_the_known_ones(name):
  with pytest.raises(UserError, match=r"unknown topology .*known: v4-\{8,16,.*v5e-\{1,4,8,16,.*cpu-N"):
    plan.parse_topology(name)


@pytest.mark.skipif(HAS_LIBTPU, reason="libtpu is installed here")
def test_missing_libtpu_says_how_to_install():
  out = _cli("--config=configs/shapes_tiny.py:test", "--topology=v5e-16")
  assert out.returncode == 1
  assert out.stdout == ""
  lines = out.stderr.strip().splitlines()
  assert lines[-1] == ("mm_jax.plan: error: compiling for v5e-16 needs libtpu, which is not installed: "
                       "pip install -e '.[tpu]' (the optional tpu extra; no TPU needed)")


def test_parse_oom_messages():
  short = ("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
           "temporaries (28.36G) exceeds available HBM (15.75G).")
  out = plan.parse_oom(short)
  assert out["required_bytes"] == int(28.36 * 2 ** 30) and out["available_bytes"] == int(15.75 * 2 ** 30)
  long = ("RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. "
          "Used 20.61G of 15.75G hbm. Exceeded hbm capacity by 4.86G.\n\nTotal hbm usage >= 21.11G:")
  out = plan.parse_oom(long)
  assert out["required_bytes"] == int(20.61 * 2 ** 30) and out["available_bytes"] == int(15.75 * 2 ** 30)
  assert out["exceeded_by_bytes"] == int(4.86 * 2 ** 30) and "\n" not in out["message"]
  assert plan.is_oom(RuntimeError(short)) and plan.is_oom(RuntimeError(long))
  assert not plan.is_oom(RuntimeError("INVALID_ARGUMENT: bad sharding"))


def _config(**mesh):
  config = load_config("test")
  config.data.vocab_size = 100  # the plan's vocab when model.decoder.vocab_size is 0 (no tokenizer)
  config.mesh.update(mesh)
  return config


@pytest.mark.slow  # compiles the train step twice
def test_plan_on_cpu_devices_accounts_memory_and_flops():
  replicated = plan.plan(_config(data=-1, fsdp=1), "cpu-2")
  mem = replicated["memory"]
  n = replicated["params"]["total"]
  assert replicated["devices"] == 2 and replicated["mesh"]["data"] == 2
  assert mem["params_bytes"] == 4 * n  # float32, whole on every device
  assert 2 * mem["params_bytes"] <= mem["opt_state_bytes"] <= 2 * mem["params_bytes"] + 64  # Adam mu, nu
  state_bytes = mem["params_bytes"] + mem["opt_state_bytes"]
  assert 0 <= mem["argument_bytes"] - state_bytes - mem["batch_bytes"] <= 64  # + the step counter
  assert mem["alias_bytes"] >= state_bytes  # the state is donated
  assert mem["total_bytes"] == (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
                                + mem["temp_bytes"] + mem["generated_code_bytes"])
  assert replicated["fits"] and replicated["hbm_bytes"] is None
  f = replicated["flops"]
  assert f["total"] == f["forward"] + f["backward"] and 1.9 < f["backward"] / f["forward"] < 2

  sharded = plan.plan(_config(data=1, fsdp=-1), "cpu-8", hbm_gib=1e-4)
  assert sharded["mesh"]["fsdp"] == 8
  assert sharded["memory"]["params_bytes"] < mem["params_bytes"] / 4  # FSDP: each device a slice
  assert sharded["memory"]["batch_bytes"] == mem["batch_bytes"] / 4   # the batch 8 ways, not 2
  assert not sharded["fits"] and sharded["hbm_bytes"] == int(1e-4 * 2 ** 30)
  assert sharded["flops"] == replicated["flops"]


@pytest.mark.slow  # the plan command in a process
def test_cli_reports_not_fitting_with_exit_2_and_json(tmp_path):
  out = _cli("--config=configs/shapes_tiny.py:test", "--config.data.vocab_size=100", "--topology=cpu-2",
             "--hbm_gib=0.0001", f"--json_out={tmp_path}/plan.json")
  assert out.returncode == 2, out.stderr
  assert "DOES NOT FIT" in out.stdout and "model FLOPs per step" in out.stdout
  report = json.loads((tmp_path / "plan.json").read_text())
  assert report["fits"] is False and report["config"] == "configs/shapes_tiny.py:test"
  assert report["overrides"] == {"data.vocab_size": "100"}


def test_cli_errors_are_one_line():
  out = _cli("--config=configs/shapes_tiny.py:test", "--topology=v5e-17")
  assert out.returncode == 1
  assert out.stderr.strip().splitlines()[-1].startswith("mm_jax.plan: error: unknown topology 'v5e-17'")
  out = _cli("--config=configs/shapes_tiny.py:test", "--topology=cpu-16")
  assert out.returncode == 1
  assert "xla_force_host_platform_device_count=16" in out.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu: pip install -e '.[tpu]'")
def test_plan_compiles_for_a_tpu_topology():
  config = _config(data=1, fsdp=-1)
  config.global_batch_size = 16
  report = plan.plan(config, "v5e-16")
  assert report["device_kind"] == "TPU v5 lite" and report["mesh"]["fsdp"] == 16
  assert report["fits"] and report["hbm_bytes"] == int(15.75 * 2 ** 30)
  assert report["memory"]["argument_bytes"] >= report["memory"]["params_bytes"] > 0


@pytest.mark.parametrize("name,arg,params,trainable", [
    ("paligemma_3b", "", 2.923e9, 2.923e9), ("paligemma_3b", "448,frozen_encoder", 2.924e9, 2.511e9),
    ("llava_7b", "", 7.050e9, 6.759e9), ("llava_7b", "stage1", 7.050e9, 0.021e9),
    ("llava_7b", "all", 7.050e9, 7.050e9), ("llama32_vision_11b", "", 10.413e9, 2.383e9),
    ("llama32_vision_11b", "oversized", 10.413e9, 10.413e9),
])
def test_large_configs_build_at_their_published_sizes(name, arg, params, trainable):
  import jax  # pylint: disable=g-import-not-at-top
  from mm_jax.perf import flops  # pylint: disable=g-import-not-at-top
  from mm_jax.train import optim  # pylint: disable=g-import-not-at-top
  from mm_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from mm_jax.train.state import ModelOnMesh  # pylint: disable=g-import-not-at-top
  config = load_config(arg, name)
  assert config.model.decoder.scan and config.model.decoder.remat in ("full", "none")
  mm = ModelOnMesh.create(config, plan.vocab_size(config), sharding.make_mesh(config.mesh, jax.devices()[:1]))
  labels = optim.param_labels(mm.abstract_params, config.optim.rules)
  sizes = [(p.size, lab) for p, lab in zip(jax.tree.leaves(mm.abstract_params), jax.tree.leaves(labels))]
  assert sum(s for s, _ in sizes) == pytest.approx(params, rel=1e-3)
  assert sum(s for s, lab in sizes if lab == "trainable") == pytest.approx(trainable, rel=2e-3)
  assert flops.train_flops(config, mm.abstract_params, labels)["total"] > 0

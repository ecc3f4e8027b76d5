import os
# The tests compile far more than they run: XLA's CPU backend without LLVM's optimisation passes compiles
# ~1.6x faster (a 4-step train command: 26 s -> 16 s) and runs ~1.7x slower. Its numbers differ in the
# last bits, so every process of a test uses these flags (command_env), except where many steps are run.
FAST_COMPILE = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 {FAST_COMPILE}"

# pylint: disable=g-import-not-at-top,wrong-import-position
import pathlib
import sys

import pytest
from xdist.scheduler import LoadScopeScheduling

REPO = pathlib.Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # Lets `pytest` run from a plain checkout without an install.
  sys.path.insert(0, str(REPO))

from mm_jax.config import files
from mm_jax.data import pipeline


def command_env(devices: int | None = 8, base: dict | None = None, **extra) -> dict:
  """The environment (`base`, or this process's) of a command a test runs: `devices` simulated CPU devices
  (None: the platform's own count), the tests' compile flags, and `extra`."""
  count = "" if devices is None else f"--xla_force_host_platform_device_count={devices} "
  return dict(os.environ if base is None else base, XLA_FLAGS=count + FAST_COMPILE, **extra)


def load_config(arg: str = "", name: str = "shapes_tiny"):
  """configs/NAME.py with `arg` (e.g. "test", "test,blind"), as --config=configs/NAME.py:ARG loads it."""
  return files.get_config(name, arg)


# Modules that ask about the session's trained default: one work unit, so one worker trains it while
# the other runs the rest (a second worker would wait on its lock).
TRAINED_MODULES = ("test_lmms_eval", "test_predict")


class _ByModule(LoadScopeScheduling):
  """pytest-xdist's loadscope (a module is a unit, so its module fixtures build once), with the trained
  default's modules as one unit, in collection order (they come first: the longest unit)."""

  def _split_scope(self, nodeid: str) -> str:
    module = nodeid.split("::", 1)[0]
    return "trained_default" if pathlib.Path(module).stem in TRAINED_MODULES else module


def pytest_xdist_make_scheduler(config, log):
  if config.getvalue("dist") != "loadscope":  # another --dist asked for: xdist's own
    return None
  config.option.loadscopereorder = False
  return _ByModule(config, log)


def pytest_collection_modifyitems(items):
  trained = {i.module.__name__ for i in items if "trained_default" in i.fixturenames}
  if extra := trained - set(TRAINED_MODULES):
    raise pytest.UsageError(f"{sorted(extra)} use trained_default: add them to conftest.TRAINED_MODULES")
  items.sort(key=lambda i: i.module.__name__ not in trained)  # stable: the rest keep their order


@pytest.fixture(scope="session")
def test_config(tmp_path_factory):
  """The `:test` config with its small dataset built once in a session tmp dir.

  Shared by the whole session: copy it (`copy.deepcopy`) before changing a field.
  """
  config = load_config("test")
  config.data.data_dir = str(tmp_path_factory.mktemp("data"))
  pipeline.open_source(config, "train")  # Builds the data and the tokenizer.
  return config


TRAINED_DATA = ["--config.data.num_train=2000", "--config.data.num_test=50"]  # 200 test questions


@pytest.fixture(scope="session")
def trained_default(tmp_path_factory):
  """configs/shapes_tiny.py trained 1000 steps (a third of its budget: colour is learnt by then) through
  the command, on 2,000 training images, one device (8 simulated ones are slower on 2 cores): the
  workdir that predict and the lmms-eval adapter are asked about. Returns (root, its config flags);
  the run is root/run. ~3 min, once per session: pytest-xdist's workers share it (the first trains
  it under a file lock, the others wait and read it)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import filelock  # pylint: disable=g-import-not-at-top
  base = tmp_path_factory.getbasetemp()
  work = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "trained_default"
  flags = [f"--config={REPO}/configs/shapes_tiny.py", f"--config.data.data_dir={work / 'data'}",
           *TRAINED_DATA]
  with filelock.FileLock(f"{work}.lock"):
    if not (work / "done").exists():
      one_device = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # optimised: 1000 steps
      out = subprocess.run([sys.executable, "-m", "mm_jax.train", *flags, f"--workdir={work / 'run'}",
                            "--config.total_steps=1000"], cwd=REPO, capture_output=True, text=True,
                           check=False, env=one_device)
      assert out.returncode == 0, out.stderr[-3000:]
      (work / "done").touch()
  return work, flags


@pytest.fixture(scope="session")
def tokenizer(test_config):
  return pipeline.load_tokenizer(test_config)


@pytest.fixture(scope="session")
def train_source(test_config):
  return pipeline.open_source(test_config, "train")


def make_run(config, devices, vocab_size):
  """(ModelOnMesh, optimizer) for `config` on a mesh over `devices`."""
  from mm_jax.train import optim  # pylint: disable=g-import-not-at-top
  from mm_jax.train import sharding  # pylint: disable=g-import-not-at-top
  from mm_jax.train.state import ModelOnMesh  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(config.mesh, devices)
  mm = ModelOnMesh.create(config, vocab_size, mesh)
  labels = optim.param_labels(mm.abstract_params, config.optim.rules)
  return mm, optim.make_optimizer(config.optim, config.total_steps, labels)


def random_vqa_batch(config, vocab_size):
  """A random VQA batch of the config's global size: prefix (first half) and suffix (scored) tokens."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  n, t, s = config.global_batch_size, config.data.text_len, config.data.image_size
  suffix = jnp.zeros((n, t), jnp.int32).at[:, t // 2:].set(1)
  return {"image": jax.random.normal(jax.random.key(1), (n, s, s, 3)),
          "text": jax.random.randint(jax.random.key(2), (n, t), 4, vocab_size),
          "mask_ar": suffix, "mask_input": jnp.ones((n, t), jnp.int32), "mask_loss": suffix}


def random_vqa_rows(config, vocab_size, batch=None):
  """A random VQA batch in the rows layout (data/rows.py; tasks.vqa.example_batch's keys and shapes) of
  `batch` rows (default: the config's global size): one image per row at image_pos 0 (for families with
  image tokens in the sequence its slots are 0..N-1), the other image slots empty (image_pos = L); the
  first half of each row is the prefix, the second half the scored suffix."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mm_jax.tasks import vqa  # pylint: disable=g-import-not-at-top
  b = vqa.example_batch(config, batch or config.global_batch_size)
  n, l = b["text"].shape
  suffix = jnp.zeros((n, l), jnp.int32).at[:, l // 2:].set(1)
  return dict(b, image=jax.random.normal(jax.random.key(1), b["image"].shape),
              text=jax.random.randint(jax.random.key(2), (n, l), 4, vocab_size),
              mask_ar=suffix, mask_loss=suffix, image_pos=b["image_pos"].at[:, 0].set(0))


def train_losses(mm, tx, batch, steps=3):
  """(state, losses) after `steps` train steps of `mm` on one batch from seed 0."""
  state, step, losses = mm.init_train_state(tx, seed=0), mm.make_train_step(tx), []
  for _ in range(steps):
    state, out = step(state, batch)
    losses.append(float(out["loss"]))
  return state, losses

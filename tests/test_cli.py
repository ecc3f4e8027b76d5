"""The command line, as a user runs it: bad input gives one line and a non-zero exit and leaves the workdir
as it was; a converted Hugging Face model fine-tunes and evaluates. (kill -9 and SIGTERM at random
moments, resumed bitwise: tests/test_faults.py.)"""
import hashlib
import os
import pathlib
import subprocess
import sys

import pytest

from conftest import REPO, command_env
from mm_jax.checkpoint import Checkpoints

pytestmark = pytest.mark.slow  # end to end through the commands

CONFIG = f"{REPO}/configs/shapes_tiny.py:test"


def _cmd(module, workdir, data_dir, *overrides):
  return [sys.executable, "-m", f"mm_jax.{module}", f"--config={CONFIG}", f"--workdir={workdir}",
          f"--config.data.data_dir={data_dir}", *overrides]


def _run(args, timeout=240):
  env = command_env()
  return subprocess.run(args, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def _snapshot(root: pathlib.Path) -> dict:
  """path -> content hash of every file under root: what 'unchanged' means."""
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def _last_line(stderr: str) -> str:
  return stderr.strip().splitlines()[-1]


@pytest.fixture(scope="module")
def trained_workdir(test_config, tmp_path_factory):
  """A workdir with a finished 4-step run of the test config."""
  workdir = tmp_path_factory.mktemp("trained")
  r = _run(_cmd("train", workdir, test_config.data.data_dir))
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def test_train_then_eval_writes_results(trained_workdir, test_config):
  r = _run(_cmd("eval", trained_workdir, test_config.data.data_dir))
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stderr.strip() == "", r.stderr[-3000:]  # results only: no library notices
  import json  # pylint: disable=g-import-not-at-top
  result = json.loads((trained_workdir / "eval" / "test.json").read_text())
  assert result["step"] == 4 and result["split"] == "test" and result["num_examples"] == 16 * 4
  assert 0.0 <= result["vqa_exact_match"] <= 1.0
  assert {"question", "answer", "prediction"} <= set(result["samples"][0])
  assert (trained_workdir / "metrics.jsonl").read_text().count('"loss"') == 2
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  events = event_accumulator.EventAccumulator(str(trained_workdir / "tensorboard"))
  events.Reload()
  assert [s.step for s in events.Scalars("loss")] == [2, 4]
  table = events.Tensors("parameters/text_summary")[0].tensor_proto.string_val[0].decode()
  assert "trainable" in table and "total" in table
  # the eval's summaries: its scores, eval.num_summaries images and their question/answer/prediction
  evals = event_accumulator.EventAccumulator(str(trained_workdir / "tensorboard" / "eval"),
                                             size_guidance={"images": 0, "tensors": 0})
  evals.Reload()
  assert evals.Scalars("test/vqa_exact_match")[0].value == result["vqa_exact_match"]
  images = sorted(t for t in evals.Tags()["images"] if t.startswith("test/sample_"))
  assert len(images) == 4
  assert evals.Images(images[0])[0].width == 32 and evals.Images(images[0])[0].height == 32
  text = evals.Tensors("test/samples/text_summary")[0].tensor_proto.string_val[0].decode()
  assert text.count("\n") == 4 + 1 and result["samples"][0]["question"] in text


def test_training_evaluates_every_n_steps_into_tensorboard(test_config, tmp_path):
  """eval.every_steps: the validation scores in the log and metrics.jsonl, and each eval's samples
  (images and text) in TensorBoard, at steps 2 and 4; a split the data lacks is refused first."""
  d = test_config.data.data_dir
  r = _run(_cmd("train", tmp_path / "run", d, "--config.eval.every_steps=2", "--config.eval.batch_size=8"))
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stdout.count("validation_vqa_exact_match") == 2
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=g-import-not-at-top
  evals = event_accumulator.EventAccumulator(str(tmp_path / "run" / "tensorboard" / "eval"),
                                             size_guidance={"images": 0, "tensors": 0})
  evals.Reload()
  assert [e.step for e in evals.Scalars("validation/vqa_exact_match")] == [2, 4]
  assert [e.step for e in evals.Images("validation/sample_0")] == [2, 4]
  assert [e.step for e in evals.Tensors("validation/samples/text_summary")] == [2, 4]
  r = _run(_cmd("train", tmp_path / "other", d, "--config.eval.every_steps=2", "--config.eval.split=dev"))
  assert r.returncode == 1 and "eval.split='dev' is not a split" in _last_line(r.stderr)
  assert not (tmp_path / "other").exists()


BAD_INPUTS = {
    "unknown config key": (
        "train", ["--config.optim.lrr=0.1"], "optim.lrr"),
    "freeze rules leave a parameter uncovered": (
        "train", ["--config.optim.rules=(('encoder/.*','frozen'),)"], "parameters uncovered"),
    "data_dir not writable": (
        "train", ["--config.data.data_dir={file}/sub"], "is not writable"),
    "checkpoint of another architecture": (
        "train", ["--config.model.decoder.mlp_dim=96"], "belongs to another architecture"),
    "batch not divisible by the data-parallel size": (
        "train", ["--config.global_batch_size=12"], "not divisible by the data-parallel size 8"),
    "eval with no checkpoint": (
        "eval", [], "no checkpoint in"),
    "config file missing": (
        "train", ["--config=configs/nope.py"], "configs/nope.py: the config file cannot be loaded (no such file)"),
    "config file that fails to import": (
        "train", ["--config={broken}"], "the config file cannot be loaded (ImportError: no module"),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_one_line_nonzero_exit_workdir_unchanged(name, trained_workdir, test_config, tmp_path):
  module, overrides, expected = BAD_INPUTS[name]
  workdir = trained_workdir
  if name == "eval with no checkpoint":
    workdir = tmp_path / "empty_workdir"
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
  a_file = tmp_path / "a_file"
  a_file.write_text("not a directory")
  broken = tmp_path / "broken_config.py"
  broken.write_text("raise ImportError('no module for this config')\n")
  overrides = [o.format(file=a_file, broken=broken) for o in overrides]
  before = _snapshot(workdir)
  r = _run(_cmd(module, workdir, test_config.data.data_dir, *overrides))
  assert r.returncode != 0
  line = _last_line(r.stderr)
  assert expected in line, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert _snapshot(workdir) == before


def test_imported_paligemma_fine_tunes_and_evaluates(test_config, tmp_path):
  """HF PaliGemma (tiny, random) -> mm_jax.convert -> mm_jax.train from it -> mm_jax.eval, all by CLI."""
  import shutil  # pylint: disable=g-import-not-at-top
  import hf_tiny  # pylint: disable=g-import-not-at-top
  import transformers  # pylint: disable=g-import-not-at-top
  from mm_jax.data import shapes  # pylint: disable=g-import-not-at-top
  config = transformers.PaliGemmaConfig(
      vision_config=dict(hf_tiny.SIGLIP_VISION, vision_use_head=False),
      text_config=dict(model_type="gemma", vocab_size=256, hidden_size=64, intermediate_size=128,
                       num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, head_dim=16),
      image_token_index=255, vocab_size=256, projection_dim=64, hidden_size=64)
  hf_dir = hf_tiny.save(hf_tiny.randomize(transformers.PaliGemmaForConditionalGeneration(config)),
                        tmp_path / "hf")
  # The checkpoint's tokenizer: here the shapes one (a real PaliGemma ships Gemma's tokenizer.model).
  shutil.copy(shapes.tokenizer_path(shapes.build(test_config.data)), os.path.join(hf_dir, "tokenizer.model"))
  out, ft = tmp_path / "import", tmp_path / "ft"
  r = _run([sys.executable, "-m", "mm_jax.convert", f"--hf_dir={hf_dir}", f"--out={out}"])
  assert r.returncode == 0, r.stderr[-3000:]
  d = test_config.data
  small = [f"--config={out}/config.py", f"--config.data.data_dir={d.data_dir}",
           f"--config.data.num_train={d.num_train}", f"--config.data.num_validation={d.num_validation}",
           f"--config.data.num_test={d.num_test}", f"--config.data.text_len={d.text_len}",
           "--config.data.caption_ratio=0", "--config.eval.batch_size=8"]
  r = _run([sys.executable, "-m", "mm_jax.train", f"--workdir={ft}", *small, "--config.total_steps=4",
            "--config.global_batch_size=8", "--config.log_every=2", "--config.checkpoint_every=4"])
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Loaded " in r.stdout and str(out) in r.stdout  # the imported params, by init.parts
  r = _run([sys.executable, "-m", "mm_jax.eval", f"--workdir={ft}", *small])
  assert r.returncode == 0, r.stderr[-3000:]
  import json  # pylint: disable=g-import-not-at-top
  result = json.loads((ft / "eval" / "test.json").read_text())
  assert result["step"] == 4 and result["num_examples"] == d.num_test * 4
  # The fine-tuned checkpoint has exactly the imported architecture.
  imported = Checkpoints(str(out), read_only=True)
  tuned = Checkpoints(str(ft), read_only=True)
  assert imported.meta(0)["signature"] == tuned.meta(4)["signature"]


_HEAP_PROBE = r"""
import ctypes, sys
from mm_jax.cli import keep_freed_memory

def rss_mb():
  return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2 ** 20
kept = keep_freed_memory() if sys.argv[1] == "keep" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
before = rss_mb()
for _ in range(3):  # a step's temporaries: allocated, touched, freed
  p = libc.malloc(256 << 20)
  ctypes.memset(p, 1, 256 << 20)
  libc.free(p)
print(kept, round(rss_mb() - before))
"""


@pytest.mark.parametrize("mode", ["keep", "default"])
def test_keep_freed_memory_keeps_a_freed_step_buffer_resident(mode):
  """With keep_freed_memory() glibc neither unmaps nor trims a freed 256 MB buffer (the next step
  reuses its pages without faulting them in); by default it gives them back."""
  out = subprocess.run([sys.executable, "-c", _HEAP_PROBE, mode], capture_output=True, text=True,
                       check=True, cwd=REPO).stdout.split()
  kept, grown_mb = out[0] == "True", int(out[1])
  if mode == "keep":
    assert kept and grown_mb >= 250
  else:
    assert not kept and grown_mb < 50

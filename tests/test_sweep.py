"""mm_jax.sweep on configs/shapes_tiny.py:test and the session's test dataset: the 4-point `smoke` sweep
runs from one command and writes its summary; the same call again keeps the finished points; a bad point
fails before anything is written; a failing point is recorded and the others run; the printed pod
commands parse back to each point's config; --list and an unknown sweep from the command line."""
import csv
import json
import os
import shlex
import subprocess
import sys

import pytest
from absl import flags
from ml_collections import config_flags

from conftest import REPO, command_env
from mm_jax import sweep
from mm_jax.checkpoint import Checkpoints
from mm_jax.errors import UserError

pytestmark = pytest.mark.slow  # end to end through the commands

SPEC = "configs/shapes_tiny.py:test"


def _cli(*args):
  """python -m mm_jax.sweep --config=configs/shapes_tiny.py[:test] ARGS; one device by default, where
  XLA compiles faster than for the 8 of the in-process tests (compiling is most of a tiny point)."""
  env = command_env(1)
  return subprocess.run([sys.executable, "-m", "mm_jax.sweep", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def swept(test_config, tmp_path_factory):
  """(workdir, common, stdout) of the smoke sweep run once, by its command."""
  workdir, common = str(tmp_path_factory.mktemp("sweeps")), {"data.data_dir": test_config.data.data_dir}
  r = _cli(f"--config={SPEC}", "--sweep=smoke", f"--workdir={workdir}",
           f"--config.data.data_dir={test_config.data.data_dir}")
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir, common, r.stdout


def _table(workdir: str) -> list[dict]:
  with open(os.path.join(workdir, "smoke", "summary.csv")) as f:
    return list(csv.DictReader(f))


def test_four_points_run_from_one_command_and_write_the_summary(swept):
  workdir, common, stdout = swept
  points = sweep.resolve_points(SPEC, "smoke", workdir, common)
  table = _table(workdir)
  assert [t["point"] for t in table] == [p["name"] for p in points] == [
      "0_base", "1_connector=mlp,lr=0.001", "2_connector=pixel_shuffle,lr_scales=encoder_0.5",
      "3_connector=resampler,prefix_attention=False,seed=1"]
  for t, p in zip(table, points):
    assert t["status"] == "done" and int(t["steps"]) == 4, t
    assert 3 < float(t["train_loss"]) < 6  # ~log(128) after 4 steps
    assert 0 <= float(t["validation/vqa_exact_match"]) <= 1 and float(t["train_s"]) > 0
    assert all(t[k] == sweep.flag_value(v) for k, v in p["overrides"].items())
    # The point trained its own config: the checkpoint's meta holds it, and config.json beside it.
    want = json.loads(p["config"].to_json_best_effort())
    ckpt = Checkpoints(p["workdir"], read_only=True)
    assert ckpt.meta(4)["config"] == want
    ckpt.close()
    with open(os.path.join(p["workdir"], "config.json")) as f:
      assert json.load(f) == want
    assert os.path.exists(os.path.join(p["workdir"], "eval", "validation.json"))
  assert points[3]["config"].model.prefix_attention is False and points[3]["config"].seed == 1
  md = open(os.path.join(workdir, "smoke", "summary.md")).read()
  assert md.startswith("Sweep `smoke` of `configs/shapes_tiny.py:test`") and md.split("\n", 2)[2] in stdout
  assert len([line for line in md.splitlines() if line.startswith("| ")]) == 6  # header, rule, 4 points


def test_rerun_keeps_finished_points_and_evaluates_a_trained_one(swept, monkeypatch):
  workdir, common, _ = swept
  rows = _table(workdir)
  os.remove(os.path.join(workdir, "smoke", rows[1]["point"], "eval", "validation.json"))

  def no_training(*_):
    raise AssertionError("a finished point trained again")
  monkeypatch.setattr(sweep, "train", no_training)
  again = sweep.run(SPEC, "smoke", workdir, common=common)  # in this process: 8 devices
  assert [r["status"] for r in again] == ["kept", "done", "kept", "kept"]
  # Only evaluated (on another mesh than it trained on); train_s is of the run that trained it.
  assert again[1]["train_s"] == float(rows[1]["train_s"]) and again[1]["eval_s"] > 0
  for r, old in zip(again, rows):
    for k, v in old.items():
      if k in ("status", "train_s", "eval_s", "error") or (r is again[1] and "/" in k):
        continue
      assert str(r.get(k, "")) == v or float(r[k]) == float(v), (k, r, old)
  assert abs(again[1]["validation/vqa_exact_match"] - float(rows[1]["validation/vqa_exact_match"])) < 0.1
  assert [r["status"] for r in sweep.run(SPEC, "smoke", workdir, common=common)] == ["kept"] * 4
  # Another budget in the same workdir would resume the runs with another schedule: refused.
  with pytest.raises(UserError, match=r"point 0_base: .* holds a run of another config \(total_steps: "
                                      r"4 there, 6 now\)"):
    sweep.resolve_points(SPEC, "smoke", workdir, {**common, "total_steps": 6})


def test_summarize_reads_what_the_workdirs_hold(swept, tmp_path):
  workdir, common, _ = swept
  done = sweep.summarize(SPEC, "smoke", workdir, common=common)
  assert [r["status"] for r in done] == ["done"] * 4 and all(r["steps"] == 4 for r in done)
  assert [r["status"] for r in sweep.summarize(SPEC, "smoke", str(tmp_path), common=common)] == [
      "pending"] * 4
  assert [t["status"] for t in _table(str(tmp_path))] == ["pending"] * 4


@pytest.mark.parametrize("point, message", [
    ({"optim.lrr": 1.0}, r"point 3_lrr=1.0: override 'optim.lrr' names no field of .* \(Did you mean "
                         r"\"lr\"\?\); fix the sweep in get_sweeps\(\)"),
    ({"model.connector": 3}, r"point 3_connector=3: override model.connector=3 has the wrong type"),
    ({"model.connector": "mlpp"}, r"point 3_connector=mlpp: unknown model.connector 'mlpp'; known: "),
    ({"optim.lr": None}, r"point 3: optim.lr is None, which no --config flag can give"),
    ({"total_steps": 6}, r"point 3_total_steps=6 sets total_steps, which a --config flag also sets"),
])
def test_a_bad_point_fails_before_anything_runs(point, message, test_config, tmp_path, monkeypatch):
  monkeypatch.setattr(sweep, "declared_sweeps", lambda _: {"bad": [{"optim.lr": 1e-3}, {}, {}, point]})
  monkeypatch.setattr(sweep, "train", lambda *_: pytest.fail("a point trained"))
  with pytest.raises(UserError, match=message):
    sweep.run(SPEC, "bad", str(tmp_path / "w"), common={"data.data_dir": test_config.data.data_dir,
                                                        "total_steps": 4})
  assert not (tmp_path / "w").exists()


def test_a_failing_point_is_recorded_and_the_others_run(test_config, tmp_path, monkeypatch):
  trained = []

  def fake_train(config, workdir):
    trained.append(os.path.basename(workdir))
    if config.model.connector == "mlp":
      raise RuntimeError("the mlp point broke")
  monkeypatch.setattr(sweep, "train", fake_train)
  monkeypatch.setattr(sweep, "evaluate", lambda *_: {})
  with pytest.raises(UserError, match=r"sweep smoke: 1 of 4 points failed: 1_connector=mlp,lr=0.001; "
                                      r"their errors are in .*summary.md"):
    sweep.run(SPEC, "smoke", str(tmp_path), common={"data.data_dir": test_config.data.data_dir})
  assert len(trained) == 4
  table = {t["point"]: t for t in _table(str(tmp_path))}
  assert table["1_connector=mlp,lr=0.001"]["status"] == "failed"
  assert table["1_connector=mlp,lr=0.001"]["error"] == "the mlp point broke"
  assert "the mlp point broke" in open(tmp_path / "smoke" / "summary.md").read()


def _parse(args: list[str], *extra: str):
  """The config (and flags) that `python -m mm_jax.train|eval ARGS` would build."""
  argv = ["prog", *args]
  fv = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=fv, lock_config=True, sys_argv=argv)
  flags.DEFINE_string("workdir", None, "", flag_values=fv)
  for name in extra:
    flags.DEFINE_string(name, None, "", flag_values=fv)
  fv(argv)
  return fv


def test_printed_pod_commands_parse_back_to_each_points_config(test_config, tmp_path, monkeypatch):
  monkeypatch.chdir(REPO)
  common = {"data.data_dir": test_config.data.data_dir, "total_steps": 6,
            "optim.rules": (("encoder/.*", "frozen"), (".*", "trainable"))}
  text = sweep.print_commands(SPEC, "smoke", "gs://bucket/sweeps", common=common, split="test")
  points = sweep.resolve_points(SPEC, "smoke", "gs://bucket/sweeps", common, check_workdirs=False)
  lines = [line for line in text.splitlines() if not line.startswith("#")]
  assert len(lines) == 2 * len(points)
  for p, train_line, eval_line in zip(points, lines[::2], lines[1::2]):
    assert train_line.startswith("./launch_tpu.sh --name=$TPU_NAME --zone=$ZONE -- python -m mm_jax.train ")
    train_args, eval_args = (shlex.split(line.split(" -- ", 1)[1])[3:] for line in (train_line, eval_line))
    assert shlex.split(eval_line)[4:7] == ["python", "-m", "mm_jax.eval"]
    fv = _parse(train_args)
    assert fv.config.to_dict() == p["config"].to_dict()
    assert fv.workdir == f"gs://bucket/sweeps/smoke/{p['name']}"
    fv = _parse(eval_args, "split")
    assert fv.config.to_dict() == p["config"].to_dict() and fv.split == "test"
  assert points[2]["config"].optim.lr_scales == (("encoder/.*", 0.5),)
  # launch_tpu.sh passes the command through to every worker intact.
  prefix = "./launch_tpu.sh --name=pod --zone=z --accelerator=v5litepod-16 --dry-run --"
  text = sweep.print_commands(SPEC, "smoke", "gs://b/s", common=common, launch_prefix=prefix)
  line = [x for x in text.splitlines() if not x.startswith("#")][4]
  out = subprocess.run(["bash", "-c", line], cwd=REPO, capture_output=True, text=True, timeout=60,
                       env=dict(os.environ, TMPDIR=str(tmp_path)))
  assert out.returncode == 0, out.stderr
  remote = shlex.split(out.stdout.splitlines()[-1])[-1].split("&& ", 1)[1]
  assert shlex.split(remote)[2:] == shlex.split(line.split(" -- ", 1)[1])[1:]
  # '' prints the plain commands, to run anywhere; printing writes nothing.
  local = str(tmp_path / "w")
  plain = sweep.print_commands(SPEC, "smoke", local, common=common, launch_prefix="").splitlines()
  assert plain[2].startswith(f"python -m mm_jax.train --config={SPEC} --workdir={local}/smoke/0_base ")
  assert not (tmp_path / "w").exists()


def test_list_and_an_unknown_sweep_from_the_command_line(tmp_path):
  r = _cli("--config=configs/shapes_tiny.py", "--list")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "  connector    4 points: model.connector=linear | model.connector=mlp | " in r.stdout
  assert "  lr           4 points: optim.lr=0.0005 | " in r.stdout and "  smoke  " in r.stdout
  r = _cli("--config=configs/shapes_tiny.py", "--sweep=nope", f"--workdir={tmp_path}/w")
  assert r.returncode == 1 and "Traceback" not in r.stderr
  assert r.stderr.strip().splitlines()[-1] == (
      "mm_jax.sweep: error: configs/shapes_tiny.py declares no sweep 'nope'; known: connector, lr, smoke")
  assert not (tmp_path / "w").exists()

"""launch_tpu.sh --dry-run: every gcloud/git command it would run, in order; argument errors."""
import os
import shlex
import subprocess

from conftest import REPO

SCRIPT = str(REPO / "launch_tpu.sh")


def _run(*args, tmp_path):
  env = dict(os.environ, TMPDIR=str(tmp_path))
  return subprocess.run(["bash", SCRIPT, *args], capture_output=True, text=True, cwd=REPO, env=env,
                        timeout=60, check=False)


def test_dry_run_prints_every_command_and_runs_none(tmp_path):
  out = _run("--name=pod", "--zone=us-east5-a", "--accelerator=v5litepod-16", "--project=proj", "--spot",
             "--dry-run", "--", "python", "-m", "mm_jax.train", "--config=configs/shapes_tiny.py",
             "--workdir=gs://bucket/run 1", tmp_path=tmp_path)
  assert out.returncode == 0, out.stderr
  cmds = [shlex.split(line) for line in out.stdout.splitlines() if not line.startswith("#")]
  tpu, where = ["gcloud", "compute", "tpus", "tpu-vm"], ["--zone=us-east5-a", "--project=proj"]
  assert cmds[0] == tpu + ["describe", "pod"] + where
  assert cmds[1] == tpu + ["create", "pod"] + where + [
      "--accelerator-type=v5litepod-16", "--version=tpu-ubuntu2204-base", "--spot"]
  archive = str(tmp_path / "mm_jax-pod.tar.gz")
  assert cmds[2] == ["git", "archive", "--format=tar.gz", "-o", archive, "HEAD"]
  assert cmds[3] == tpu + ["scp", archive, "pod:~/mm_jax.tar.gz"] + where + ["--worker=all"]
  assert cmds[4][:6 + len(where)] == tpu + ["ssh", "pod"] + where
  assert "--worker=all" in cmds[4] and ".venv/bin/pip install -q -e '.[tpu]'" in cmds[4][-1]
  assert cmds[5][-2] == "--worker=all"
  remote = cmds[5][-1].removeprefix("--command=")
  assert remote.startswith("cd ~/mm_jax && MM_JAX_DISTRIBUTED=1 .venv/bin/python -m mm_jax.train ")
  assert shlex.split(remote.split("&& ", 1)[1])[-1] == "--workdir=gs://bucket/run 1"  # quoted intact
  assert len(cmds) == 6
  assert not os.path.exists(archive)  # a dry run writes nothing


def test_missing_arguments_and_an_uncreatable_slice_are_errors(tmp_path):
  out = _run("--zone=z", "--", "python", "-m", "mm_jax.train", tmp_path=tmp_path)
  assert out.returncode == 2 and "--name, --zone and a command after -- are required" in out.stderr
  out = _run("--name=pod", "--zone=z", "--bogus", tmp_path=tmp_path)
  assert out.returncode == 2 and "unknown argument --bogus" in out.stderr
  out = _run("--name=pod", "--zone=z", "--dry-run", "--", "python", "-m", "mm_jax.train", tmp_path=tmp_path)
  assert out.returncode == 2 and "give --accelerator=TYPE" in out.stderr

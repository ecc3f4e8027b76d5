r"""Runs a named sweep that a config file declares: every point trained and evaluated, a summary table.

  python -m mm_jax.sweep --config=configs/shapes_tiny.py --list
  python -m mm_jax.sweep --config=configs/shapes_tiny.py --sweep=connector --workdir=workdirs/sweeps \
      [--config.total_steps=600] [--split=validation]
  python -m mm_jax.sweep ... --print_commands [--launch_prefix='./launch_tpu.sh --name=pod --zone=Z --']
  python -m mm_jax.sweep ... --summarize

`get_sweeps()` in the config file returns {name: points}, each point a dict of dotted overrides. Point
i of sweep S trains in WORKDIR/S/<i>_<overrides> (mm_jax.train.train, in this process) and is then
evaluated on --split; every point is checked before any trains. The same command resumes; a failing
point is recorded and the command exits 1 at the end naming it. WORKDIR/S/summary.csv and summary.md
are rewritten after every point. --print_commands prints the launch_tpu.sh train and eval commands
per point and runs nothing; --summarize writes the summary from the workdirs.
"""
import copy
import csv
import io
import json
import os
import re
import shlex
import time
import traceback

import jax
import ml_collections as mlc
from absl import flags, logging
from ml_collections import config_flags

from mm_jax import cli
from mm_jax.train import optim
from mm_jax.train import sharding
from mm_jax.checkpoint import Checkpoints, workdir_path
from mm_jax.config import files
from mm_jax.errors import UserError
from mm_jax.eval.evaluate import evaluate
from mm_jax.tasks import TASKS
from mm_jax.train.state import ModelOnMesh
from mm_jax.train.loop import train

DEFAULT_LAUNCH = "./launch_tpu.sh --name=$TPU_NAME --zone=$ZONE --"
_SCALARS = (bool, int, float, str)


# --- the points ---

def declared_sweeps(spec: str) -> dict:
  """{name: points} of the config file's get_sweeps() ({} without one); points not yet expanded."""
  module = files.module(spec.partition(":")[0])
  return module.get_sweeps() if hasattr(module, "get_sweeps") else {}


def _normalized(value, where: str):
  """Lists become tuples (what a --config flag parses); only values a flag can give are allowed."""
  if isinstance(value, (list, tuple)):
    return tuple(_normalized(v, where) for v in value)
  if not isinstance(value, _SCALARS):
    raise UserError(f"{where} is {value!r}, which no --config flag can give; use a bool, int, float, "
                    "str or a tuple of them")
  return value


def expand(spec: str, sweep: str) -> list[dict]:
  """The points of `sweep` in the config file `spec`: a list of {dotted key: value}."""
  sweeps = declared_sweeps(spec)
  if sweep not in sweeps:
    raise UserError(f"{spec.partition(':')[0]} declares no sweep {sweep!r}; known: "
                    f"{', '.join(sweeps) or 'none (add get_sweeps() to the config file)'}")
  points = sweeps[sweep]
  points = list(points() if callable(points) else points)
  if not points:
    raise UserError(f"sweep {sweep} has no points")
  out = []
  for i, point in enumerate(points):
    if not isinstance(point, dict):
      raise UserError(f"sweep {sweep}, point {i} is {point!r}; a point is a dict of dotted overrides")
    out.append({k: _normalized(v, f"sweep {sweep}, point {i}: {k}") for k, v in point.items()})
  return out


def flag_value(v) -> str:
  """`v` as the value of a --config.x=... flag that config_flags parses back to `v`."""
  if isinstance(v, tuple):  # a Python literal; strings double-quoted (single quotes read badly in shells)
    items = [flag_value(x) if isinstance(x, tuple) else json.dumps(x) if isinstance(x, str) else repr(x)
             for x in v]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"
  return repr(v) if isinstance(v, float) else str(v)


def _short(v) -> str:
  """A value for a directory name: a tuple's leaves joined by '_', each reduced to [\\w.+-]."""
  if isinstance(v, tuple):
    return "_".join(filter(None, (_short(x) for x in v)))
  return re.sub(r"[^\w.+-]+", "-", flag_value(v)).strip("-.")


def point_name(index: int, overrides: dict) -> str:
  """'<index>_<key>=<value>,...' with the last part of each key (the whole key where ambiguous)."""
  if not overrides:
    return f"{index}_base"
  last = [k.rsplit(".", 1)[-1] for k in overrides]
  keys = [s if last.count(s) == 1 else k for k, s in zip(overrides, last)]
  return f"{index}_" + ",".join(f"{k}={_short(v)}" for k, v in zip(keys, overrides.values()))[:80]


def _json(config: mlc.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def _flat(d: dict, prefix: str = "") -> dict:
  out = {}
  for k, v in d.items():
    out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
  return out


def resolve_points(spec: str, sweep: str, workdir: str, common: dict | None = None,
         check_workdirs: bool = True) -> list[dict]:
  """Per point: index, name, overrides, config, workdir. Raises UserError, naming the point, for an
  override that names no field or has the wrong type, or (check_workdirs) a workdir holding a run of
  another config."""
  common = {k: _normalized(v, f"--config.{k}") for k, v in (common or {}).items()}
  base = files.load(spec)
  base.lock()
  try:
    base.update_from_flattened_dict(common)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raise UserError(f"the overrides {common} do not fit {spec} ({cli.one_line(e)})") from None
  points = []
  for i, overrides in enumerate(expand(spec, sweep)):
    name, config = point_name(i, overrides), copy.deepcopy(base)
    where = f"sweep {sweep}, point {name}"
    both = sorted(set(common) & set(overrides))
    if both:
      raise UserError(f"{where} sets {', '.join(both)}, which a --config flag also sets; drop the flag "
                      "(the sweep's points choose it)")
    for key, value in overrides.items():
      try:
        config.update_from_flattened_dict({key: value})
      except (AttributeError, KeyError) as e:
        hint = re.search(r'Did you mean "[^"]+"', str(e))
        raise UserError(f"{where}: override {key!r} names no field of {spec}"
                        f"{' (' + hint.group(0) + '?)' if hint else ''}; fix the sweep in "
                        f"get_sweeps()") from None
      except (TypeError, ValueError) as e:
        raise UserError(f"{where}: override {key}={value!r} has the wrong type ({cli.one_line(e)}); "
                        "fix the sweep in get_sweeps()") from None
    wd = os.path.join(workdir, sweep, name)
    saved = workdir_path(wd) / "config.json" if check_workdirs else None
    if saved and saved.exists():  # else a rerun would resume a run of another config
      then, now = _flat(json.loads(saved.read_text())), _flat(_json(config))
      diff = next((k for k in sorted(set(then) | set(now)) if then.get(k) != now.get(k)), None)
      if diff:
        raise UserError(f"{where}: {wd} holds a run of another config ({diff}: {then.get(diff)!r} "
                        f"there, {now.get(diff)!r} now); use another --workdir or the flags it ran with")
    points.append({"index": i, "name": name, "overrides": overrides, "config": config, "workdir": wd})
  return points


def check_builds(point: dict) -> None:
  """What train() checks before touching a workdir, short of the data: mesh, batch, model, loss, rules,
  lr_scales. data.vocab_size stands in for the tokenizer's (the vocabulary changes no check here)."""
  config = point["config"]
  try:
    mesh = sharding.make_mesh(config.mesh)
    sharding.check_batch(config.global_batch_size, mesh)
    sharding.check_batch(config.eval.batch_size, mesh, field="eval.batch_size")
    mm = ModelOnMesh.create(config, config.data.vocab_size, mesh)
    TASKS[mm.model.task].check(config)
    labels = optim.param_labels(mm.abstract_params, config.optim.rules)
    optim.make_optimizer(config.optim, config.total_steps, labels)
  except UserError as e:
    raise UserError(f"point {point['name']}: {e}") from None


# --- what a point's workdir holds ---

def collect(point: dict, split: str) -> dict:
  """A summary row from the point's workdir: status done / trained (no eval yet) / partial / pending."""
  config, wd = point["config"], workdir_path(point["workdir"])
  verbosity = logging.get_verbosity()
  logging.set_verbosity(logging.ERROR)  # orbax warns that a read-only manager is read-only
  try:
    ckpt = Checkpoints(point["workdir"], read_only=True)
    step = ckpt.latest_step()
    ckpt.close()
  finally:
    logging.set_verbosity(verbosity)
  row = {"point": point["name"], **{k: flag_value(v) for k, v in point["overrides"].items()},
         "status": "pending", "steps": step}
  if (wd / "metrics.jsonl").exists():
    lines = (wd / "metrics.jsonl").read_text().splitlines()
    row["train_loss"] = json.loads(lines[-1]).get("loss") if lines else None
  result_path = wd / "eval" / f"{split}.json"
  result = json.loads(result_path.read_text()) if result_path.exists() else {}
  if step is not None:
    row["status"] = "partial" if step < config.total_steps else "trained"
  seconds = wd / "sweep_point.json"
  if step == config.total_steps and seconds.exists():
    row.update(json.loads(seconds.read_text()))
  if step == config.total_steps and result.get("step") == step:
    row["status"] = "done"
    for k, v in result.items():  # floats only, nested ones (per question kind) flattened
      for kk, vv in (v.items() if isinstance(v, dict) else [(k, v)]):
        if isinstance(vv, float):
          row[f"{split}/{kk}"] = vv
  return row


def write_summary(sweep_dir: str, rows: list[dict], title: str) -> str:
  """Writes summary.csv (every column) and summary.md, one row per point; returns the Markdown."""
  seen = list(dict.fromkeys(c for r in rows for c in r))
  fixed = ("point", "status", "steps", "train_loss", "train_s", "eval_s", "error")
  overrides = [c for c in seen if c not in fixed and "/" not in c]
  columns = ["point", *overrides, "status", "steps", "train_loss", *[c for c in seen if "/" in c],
             "train_s", "eval_s", "error"]
  cell = lambda c, v: ("" if v is None else f"{v:.0f}" if c.endswith("_s") else f"{v:.4f}"
                       if isinstance(v, float) else str(v)).replace("|", r"\|")[:200]
  md = "\n".join([f"{title}\n", "| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
                 + ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]) + "\n"
  if jax.process_index() == 0:
    out = workdir_path(sweep_dir)
    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, columns, restval="", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    (out / "summary.csv").write_text(buf.getvalue())
    (out / "summary.md").write_text(md)
  return md


def _title(spec: str, sweep: str, workdir: str, common: dict, split: str) -> str:
  flags_ = " ".join(shlex.quote(f"--config.{k}={flag_value(v)}") for k, v in common.items())
  return (f"Sweep `{sweep}` of `{spec}`, eval split `{split}`: `python -m mm_jax.sweep --config={spec} "
          f"--sweep={sweep} --workdir={workdir}{' ' + flags_ if flags_ else ''}`")


# --- the three modes ---

def run(spec: str, sweep: str, workdir: str, *, common: dict | None = None,
        split: str = "validation") -> list[dict]:
  """Trains and evaluates every point not finished yet, in order; returns the summary rows. Raises
  UserError at the end, after the summary is written, if a point failed."""
  common = common or {}
  points = resolve_points(spec, sweep, workdir, common)
  for point in points:  # a typo in the last point fails before the first one trains
    check_builds(point)
  sweep_dir, title = os.path.join(workdir, sweep), _title(spec, sweep, workdir, common, split)
  rows = [collect(p, split) for p in points]
  for row in rows:
    row["status"] = "kept" if row["status"] == "done" else row["status"]
  md = write_summary(sweep_dir, rows, title)
  for i, point in enumerate(points):
    if rows[i]["status"] == "kept":
      print(f"[sweep {sweep} {i + 1}/{len(points)}] {point['name']}: finished earlier, kept", flush=True)
      continue
    config, wd = point["config"], point["workdir"]
    print(f"[sweep {sweep} {i + 1}/{len(points)}] {point['name']}: "
          f"{command('mm_jax.train', spec, point, common)}", flush=True)
    try:
      if jax.process_index() == 0:
        workdir_path(wd).mkdir(parents=True, exist_ok=True)
        (workdir_path(wd) / "config.json").write_text(json.dumps(_json(config), indent=1))
      t0 = time.time()
      if rows[i]["status"] != "trained":
        train(config, wd)
      t1 = time.time()
      evaluate(config, wd, split)
      # train_s: of the run that finished training (an eval-only rerun keeps it); compiling included
      seconds = {"train_s": rows[i].get("train_s", 0) if rows[i]["status"] == "trained" else
                 round(t1 - t0, 1), "eval_s": round(time.time() - t1, 1)}
      if jax.process_index() == 0:
        (workdir_path(wd) / "sweep_point.json").write_text(json.dumps(seconds))
      rows[i] = collect(point, split)
    except Exception as e:  # pylint: disable=broad-except  # recorded; the next point runs
      if not isinstance(e, UserError):
        traceback.print_exc()
      rows[i] = {**collect(point, split), "status": "failed", "error": cli.one_line(e)}
      print(f"[sweep {sweep}] {point['name']} failed: {rows[i]['error']}", flush=True)
    md = write_summary(sweep_dir, rows, title)
  print(f"\n{md}\nWrote {os.path.join(sweep_dir, 'summary.csv')} and summary.md", flush=True)
  failed = [r["point"] for r in rows if r["status"] == "failed"]
  if failed:
    raise UserError(f"sweep {sweep}: {len(failed)} of {len(rows)} points failed: {', '.join(failed)}; "
                    f"their errors are in {os.path.join(sweep_dir, 'summary.md')}")
  return rows


def _repo_relative(spec: str) -> str:
  """The config path as a pod worker sees it (it runs in its copy of the repository root)."""
  path, sep, arg = spec.partition(":")
  full = os.path.abspath(files.path(path))
  rel = os.path.relpath(full, files.REPO)
  return (path if rel.startswith("..") else rel) + sep + arg


def command(module: str, spec: str, point: dict, common: dict, extra: tuple = ()) -> str:
  """`python -m MODULE` for the point: the common flags, then its overrides (shell-quoted)."""
  args = ["python", "-m", module, f"--config={_repo_relative(spec)}", f"--workdir={point['workdir']}"]
  args += [f"--config.{k}={flag_value(v)}" for k, v in {**common, **point["overrides"]}.items()]
  return " ".join(shlex.quote(a) for a in [*args, *extra])


def print_commands(spec: str, sweep: str, workdir: str, *, common: dict | None = None,
                   split: str = "validation", launch_prefix: str = DEFAULT_LAUNCH) -> str:
  """Per point, its train and eval commands after `launch_prefix` (printed as given): a shell script."""
  common = common or {}
  points = resolve_points(spec, sweep, workdir, common, check_workdirs=False)  # gs:// need not be reachable here
  prefix = launch_prefix + " " if launch_prefix else ""
  lines = [f"# sweep {sweep} of {spec}: {len(points)} points, one workdir each under "
           f"{os.path.join(workdir, sweep)}"]
  if prefix and "://" not in workdir:
    lines.append("# every worker of a slice must see the workdir: give --workdir=gs://...")
  for p in points:
    lines += [f"# {p['name']}", prefix + command("mm_jax.train", spec, p, common),
              prefix + command("mm_jax.eval", spec, p, common, (f"--split={split}",))]
  flags_ = " ".join(shlex.quote(f"--config.{k}={flag_value(v)}") for k, v in common.items())
  lines.append(f"# then the summary: python -m mm_jax.sweep --config={_repo_relative(spec)} "
               f"--sweep={sweep} --workdir={workdir} --split={split} --summarize {flags_}".rstrip())
  return "\n".join(lines)


def summarize(spec: str, sweep: str, workdir: str, *, common: dict | None = None,
              split: str = "validation") -> list[dict]:
  """The summary of what the points' workdirs hold now (runs nothing)."""
  common = common or {}
  rows = [collect(p, split) for p in resolve_points(spec, sweep, workdir, common)]
  md = write_summary(os.path.join(workdir, sweep), rows, _title(spec, sweep, workdir, common, split))
  print(f"{md}\nWrote {os.path.join(workdir, sweep, 'summary.csv')} and summary.md", flush=True)
  return rows


def list_sweeps(spec: str) -> str:
  sweeps = declared_sweeps(spec)
  path = spec.partition(":")[0]
  if not sweeps:
    return f"{path} declares no sweeps (get_sweeps() returning {{name: points}})"
  lines = [f"Sweeps of {path} (python -m mm_jax.sweep --config={spec} --sweep=NAME --workdir=DIR):"]
  for name in sweeps:
    points = expand(spec, name)
    shown = " | ".join(", ".join(f"{k}={flag_value(v)}" for k, v in p.items()) or "(base)"
                       for p in points[:6])
    lines.append(f"  {name:<12} {len(points)} points: {shown}{' | ...' if len(points) > 6 else ''}")
  return "\n".join(lines)


def main() -> None:
  if _CONFIG.value is None:
    raise UserError("--config is required")
  spec = config_flags.get_config_filename(flags.FLAGS["config"])
  if _LIST.value:
    print(list_sweeps(spec))
    return
  if not _SWEEP.value or not _WORKDIR.value:
    raise UserError(f"--sweep and --workdir are required; --list shows the sweeps of {spec}")
  if _PRINT.value and _SUMMARIZE.value:
    raise UserError("--print_commands and --summarize exclude each other; give one")
  common = config_flags.get_override_values(flags.FLAGS["config"])
  kw = dict(common=common, split=_SPLIT.value)
  if _PRINT.value:
    print(print_commands(spec, _SWEEP.value, _WORKDIR.value, launch_prefix=_LAUNCH.value, **kw))
  elif _SUMMARIZE.value:
    summarize(spec, _SWEEP.value, _WORKDIR.value, **kw)
  else:
    run(spec, _SWEEP.value, _WORKDIR.value, **kw)


if __name__ == "__main__":
  _CONFIG = config_flags.DEFINE_config_file(
      "config", None, "Config file (configs/*.py[:variant]) whose get_sweeps() declares the sweep; "
      "--config.x=y flags apply to every point.", lock_config=True)
  _SWEEP = flags.DEFINE_string("sweep", None, "The sweep's name (--list shows them).")
  _WORKDIR = flags.DEFINE_string("workdir", None, "Point i trains in WORKDIR/SWEEP/<i>_<overrides>.")
  _SPLIT = flags.DEFINE_string("split", "validation", "The split each point is evaluated on.")
  _LIST = flags.DEFINE_bool("list", False, "List the config file's sweeps and their points.")
  _PRINT = flags.DEFINE_bool("print_commands", False,
                             "Print each point's train and eval commands after --launch_prefix; run none.")
  _LAUNCH = flags.DEFINE_string("launch_prefix", DEFAULT_LAUNCH,
                                "Printed before each command ('' for plain local commands).")
  _SUMMARIZE = flags.DEFINE_bool("summarize", False,
                                 "Write the summary from the points' workdirs; run nothing.")
  cli.run("mm_jax.sweep", main, steps=True)

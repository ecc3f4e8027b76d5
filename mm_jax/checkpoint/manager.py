"""Checkpoints in <workdir>/checkpoints through an orbax CheckpointManager: Checkpoints(workdir, ...).

Each step directory holds three items:
  state  params, optimizer state and step (restored onto any mesh by target shardings)
  data   the grain iterator state of every process, so a resumed run sees exactly the same batches
  meta   json: the config that wrote it, the parameter signature (path -> dtype[shape]), checked before
         restoring, and the layer layout of each stack ({"decoder": "scanned", "encoder": "unrolled"})

Loading params by name (init.parts, eval) converts between the layouts of models/stack.py; resuming a
run needs the layout that wrote it. A step is good when its files match the manifest that process 0
writes just before orbax commits it (mm_jax.integrity): restore, meta and restore_params refuse a
damaged step with a UserError naming it and why; newest_good() finds the newest good one. prune()
keeps the newest `keep` permanent checkpoints, every one at a multiple of `keep_every` and the newest
temporary one; nothing is deleted before a newer checkpoint has committed with its manifest.
"""
import json
import logging as std_logging
import os
import time

from etils import epath
import jax
import jax.numpy as jnp
import ml_collections as mlc
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mm_jax.data import pipeline
from mm_jax.errors import UserError
from mm_jax.models import stack
from mm_jax.checkpoint.integrity import MANIFEST, SaveFailed, manifest_problem, read_manifest, short_error, write_manifest
from mm_jax.models.stack import path_str


class _ReadOnlyNotices(std_logging.Filter):
  """Drops orbax's two warnings on every read-only manager (eval, predict): reading is the intent."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not record.getMessage().startswith(("CheckpointManagerOptions.read_only=True",
                                               "Given directory is read only"))


std_logging.getLogger("absl").addFilter(_ReadOnlyNotices())


def workdir_path(workdir: str) -> epath.Path:
  """Local paths made absolute (orbax wants them so); gs:// and other remote paths as they are."""
  return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


def signature(params) -> dict[str, str]:
  """path -> 'float32[128, 64]' for every parameter (arrays or ShapeDtypeStructs)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_str(p): f"{x.dtype}{list(x.shape)}" for p, x in flat}


def layout(sig: dict[str, str]) -> dict[str, str]:
  """{stack prefix: 'scanned' | 'unrolled'} of a signature, e.g. {'decoder': 'scanned'}."""
  out = {}
  for path in sig:
    for split, kind in ((stack.split_scanned, "scanned"), (stack.split_unrolled, "unrolled")):
      parts = split(path)
      if parts:
        out[parts[0].rstrip("/")] = kind
  return out


def _shape(sig_entry: str) -> list[int]:
  return json.loads("[" + sig_entry.split("[", 1)[1])


def relayout(path: str, shape: tuple[int, ...], saved: dict[str, str]):
  """Where param `path` of `shape` is in a checkpoint of the other layer layout (None if nowhere):
  ("stack", (P/block_0/R, ..)) for a scanned P/blocks/R; ("index", P/blocks/R, i, n) for P/block_i/R
  (n: the stack's length)."""
  scanned = stack.split_scanned(path)
  if scanned and shape:
    prefix, rest = scanned
    srcs = tuple(stack.unrolled_path(prefix, i, rest) for i in range(shape[0]))
    if all(src in saved and _shape(saved[src]) == list(shape[1:]) for src in srcs):
      return ("stack", srcs)
  unrolled = stack.split_unrolled(path)
  if unrolled:
    prefix, i, rest = unrolled
    src = stack.scanned_path(prefix, rest)
    if src in saved and _shape(saved[src])[1:] == list(shape) and i < _shape(saved[src])[0]:
      return ("index", src, i, _shape(saved[src])[0])
  return None


class OtherLayout(UserError):
  """The checkpoint holds the same params in the other layer layout (scanned vs unrolled)."""


def _is_dir_on_process_0(path: epath.Path) -> bool:
  """path.is_dir() as process 0 saw it: every process then takes the same branch (a manager's creation
  is collective), even when process 0 creates the directory while another is still checking."""
  found = path.is_dir()
  if jax.process_count() > 1:
    found = bool(multihost_utils.broadcast_one_to_all(int(found)))
  return found


_TMP_SUFFIX = ".orbax-checkpoint-tmp"  # orbax's atomic-rename temporary step directory


class Checkpoints:
  """A thin wrapper over one CheckpointManager: save / restore of state, data iterator and meta, with
  manifests, verification and retention (the module docstring)."""

  def __init__(self, workdir: str, *, keep: int = 2, keep_every: int = 0, read_only: bool = False,
               compress: bool = True, checksums: bool = True):
    """compress=False (for save_params only; mm_jax.convert) writes arrays without zstd: tensorstore
    then writes straight from them, where compressing buffers them again, up to their whole size.
    keep / keep_every: retention (prune). checksums: crc32 of every file in the manifest (False: sizes
    only, for huge checkpoints on slow storage: computing them reads each checkpoint back once)."""
    self.directory = workdir_path(workdir) / "checkpoints"
    self._mngr = None
    self._keep, self._keep_every, self._checksums, self._read_only = keep, keep_every, checksums, read_only
    self._pending = None  # (step, temporary) of the save in flight
    self._problems = {}  # step -> why it is damaged (None: complete), verified once per instance
    self._manifests = None  # whether any step has a manifest (else: written before manifests existed)
    self.last_save_time, self.last_saved_step = time.monotonic(), None  # for time-based saves
    self.last_good = None  # the step of this instance's last committed save
    self._params_save = ocp.args.StandardSave if compress else ocp.args.PyTreeSave  # its handler's args
    handlers = None if compress else {"state": ocp.PyTreeCheckpointHandler(use_compression=False),
                                      "meta": ocp.JsonCheckpointHandler()}
    if not read_only or _is_dir_on_process_0(self.directory):
      self._mngr = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=None, create=not read_only, read_only=read_only,
              enable_async_checkpointing=not read_only,
              # A writer holds the workdir (WorkdirLock): tmp dirs left by a killed save are garbage.
              cleanup_tmp_directories=not read_only,
              async_options=None if read_only else ocp.AsyncOptions(
                  post_finalization_callback=self._write_manifest)),
          item_handlers=handlers)

  def latest_step(self) -> int | None:
    """The newest committed step, complete or not (newest_good() verifies)."""
    return None if self._mngr is None else self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return [] if self._mngr is None else list(self._mngr.all_steps())

  # --- integrity ---

  def _write_manifest(self) -> None:
    """orbax's post-finalization callback: on process 0, after every process wrote, before the commit."""
    step, temporary = self._pending
    tmp = self.directory / f"{step}{_TMP_SUFFIX}"
    write_manifest(tmp if tmp.exists() else self.directory / str(step), temporary=temporary,
                   checksums=self._checksums)

  def problem(self, step: int) -> str | None:
    """Why the checkpoint at `step` must not be restored (None: it is complete). Process 0 checks."""
    if step not in self._problems:
      why = None
      if jax.process_index() == 0:
        step_dir = self.directory / str(step)
        if not step_dir.is_dir():
          why = "its directory is gone"
        elif (step_dir / MANIFEST).exists() or self._has_manifests():
          why = manifest_problem(step_dir)  # else: no manifest anywhere, written before manifests
      if jax.process_count() > 1:
        bad = bool(multihost_utils.broadcast_one_to_all(int(why is not None)))
        why = why or ("damaged (process 0 says why)" if bad else None)
      self._problems[step] = why
    return self._problems[step]

  def _has_manifests(self) -> bool:
    if self._manifests is None:
      self._manifests = any((self.directory / str(s) / MANIFEST).exists() for s in self.all_steps())
    return self._manifests

  def newest_good(self) -> tuple[int | None, list[tuple[int, str]]]:
    """(the newest complete step or None, [(newer damaged step, why)])."""
    skipped = []
    for step in sorted(self.all_steps(), reverse=True):
      why = self.problem(step)
      if why is None:
        return step, skipped
      skipped.append((step, why))
    return None, skipped

  def check_complete(self, step: int) -> None:
    """Raises UserError if the checkpoint at `step` is damaged, naming why and the newest complete one."""
    why = self.problem(step)
    if why is not None:
      good = [s for s in sorted(self.all_steps(), reverse=True) if s != step and self.problem(s) is None]
      raise UserError(
          f"the checkpoint at step {step} in {self.directory} is damaged ({why}), it cannot be "
          "restored; " + (f"the newest complete one is at step {good[0]}" if good else
                          "no other checkpoint there is complete"))

  def move_aside(self, steps: list[int]) -> epath.Path:
    """Moves damaged steps into <checkpoints>/damaged/ (kept for inspection; a resumed run writes them
    again). Process 0 moves; call it on every process before the writing manager is created."""
    aside = self.directory / "damaged"
    if jax.process_index() == 0:
      aside.mkdir(parents=True, exist_ok=True)
      for step in steps:
        (self.directory / str(step)).rename(aside / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}")
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("mm_jax:move_aside")
    return aside

  def meta(self, step: int) -> dict:
    self.check_complete(step)
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def check_compatible(self, step: int, params_abstract) -> None:
    """Raises UserError if the checkpoint at `step` was written by a model of another shape."""
    saved, now = self.meta(step)["signature"], signature(params_abstract)
    diff = sorted(set(saved) ^ set(now)) + sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
    if diff and layout(saved) != layout(now) and all(
        relayout(k, tuple(_shape(now[k])), saved) for k in now if k not in saved):
      stacks = sorted(k for k, v in layout(now).items() if layout(saved).get(k) != v)
      raise OtherLayout(
          f"the checkpoint at step {step} in {self.directory} stores the layers of {', '.join(stacks)} "
          f"{layout(saved)[stacks[0]]}, this config has them {layout(now)[stacks[0]]}; resume with "
          f"the model.*.scan setting that wrote it, or start a new --workdir from its params with "
          f"--config.init.parts=\"(('{self.directory.parent}', '', ''),)\" (which converts them)")
    if diff:
      first = diff[0]
      raise UserError(
          f"the checkpoint at step {step} in {self.directory} belongs to another architecture: "
          f"{len(diff)} parameters differ (first: {first}: {saved.get(first, 'absent')} in the "
          f"checkpoint, {now.get(first, 'absent')} in this config); use a new --workdir or the config "
          "that wrote it")

  # --- saving ---

  def save(self, step: int, state, data_iterator, config: mlc.ConfigDict, temporary: bool = False) -> None:
    """Starts an async save (after the previous one has committed). temporary: superseded by the next
    checkpoint (prune deletes it then)."""
    sig = signature(state["params"])
    meta = {"config": json.loads(config.to_json_best_effort()), "signature": sig, "layout": layout(sig)}
    self._save(step, temporary, ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=pipeline.IteratorSave(data_iterator),
        meta=ocp.args.JsonSave(meta)))

  def save_params(self, step: int, params, config: mlc.ConfigDict) -> None:
    """Params only (no optimizer state, no data iterator): what an import writes."""
    sig = signature(params)
    meta = {"config": json.loads(config.to_json_best_effort()), "signature": sig, "layout": layout(sig)}
    self._save(step, False, ocp.args.Composite(
        state=self._params_save({"params": params}), meta=ocp.args.JsonSave(meta)))

  def _save(self, step: int, temporary: bool, args) -> None:
    self.wait()  # the previous save commits (or fails) and is pruned before the callback is re-aimed
    self._pending = (step, temporary)
    self.last_save_time, self.last_saved_step = time.monotonic(), step
    try:
      if not self._mngr.save(step, args=args):  # orbax skips a step that exists
        self._pending = None
    except Exception as e:  # pylint: disable=broad-except
      self._failed(step, e)

  def _failed(self, step: int, error: BaseException | None):
    self._pending = None
    # Several processes: not checked again (a collective), the earlier steps were complete at their commit.
    good = self.newest_good()[0] if jax.process_count() == 1 else self.last_good
    raise SaveFailed(
        f"saving the checkpoint at step {step} to {self.directory} failed: "
        f"{short_error(error) if error else 'it was not committed (orbax logged why above)'}; "
        + (f"the checkpoint at step {good} is intact and the same command resumes from it"
           if good is not None else "no earlier checkpoint exists")
        + " once the cause (e.g. a full disk) is fixed") from error

  def poll(self) -> None:
    """Between steps (one process only): finishes a save that has completed in the background, so that
    a failure stops the run at once and superseded checkpoints go early."""
    if self._pending is not None and jax.process_count() == 1 and not self._mngr.is_saving_in_progress():
      self.wait()

  def wait(self) -> None:
    """Waits for the save in flight; raises SaveFailed if it did not commit; then prunes."""
    if self._mngr is None or self._read_only:
      return
    error = None
    try:
      self._mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      error = e
    if self._pending is None:
      if error is not None:
        raise error
      return
    step, _ = self._pending
    step_dir = self.directory / str(step)
    committed = error is None and (step_dir / MANIFEST).exists() and (
        step_dir / "commit_success.txt").exists()
    if jax.process_count() > 1:
      committed = bool(multihost_utils.broadcast_one_to_all(int(committed)))
    if not committed:
      self._failed(step, error)
    self._pending, self._manifests, self.last_good = None, True, step
    self._problems.pop(step, None)
    self.prune()

  def prune(self) -> None:
    """Deletes what retention does not keep (every process calls it; orbax deletes on process 0)."""
    steps = sorted(self.all_steps())
    temporary = {s for s in steps if (read_manifest(self.directory / str(s)) or {}).get("temporary")}
    permanent = [s for s in steps if s not in temporary]
    keep = set(permanent[-self._keep:]) if self._keep > 0 else set(permanent)
    keep |= {s for s in permanent if self._keep_every and s % self._keep_every == 0}
    if temporary and max(temporary) == steps[-1]:
      keep.add(steps[-1])
    for step in steps:
      if step not in keep:
        self._mngr.delete(step)
        self._problems.pop(step, None)

  # --- restoring ---

  def restore(self, step: int, abstract_state, data_iterator, verified: bool = False) -> dict:
    """Restores the state onto the shardings of `abstract_state` and the data iterator in place.
    verified: the caller has just checked the step (newest_good), so its files are not read twice."""
    if not verified:
      self.check_complete(step)
    numerics = None
    if self.check_state(step, abstract_state):  # written before the run kept a numerics state
      numerics = abstract_state["numerics"]  # (state.py): it starts from zeros
      abstract_state = {k: v for k, v in abstract_state.items() if k != "numerics"}
    r = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=pipeline.IteratorRestore(data_iterator)))
    state = dict(r.state)
    if numerics is not None:
      state["numerics"] = jax.tree.map(
          lambda a: jax.device_put(jnp.zeros(a.shape, a.dtype), a.sharding), numerics)
    return state

  def check_state(self, step: int, abstract_state) -> bool:
    """Raises UserError if the saved training state has other arrays than this run's (the params are
    checked by check_compatible, so the optimizer or its rules changed). Returns True if it lacks only
    state["numerics"] (written before runs kept one)."""
    tree = ocp.StandardCheckpointHandler().metadata(self.directory / str(step) / "state").tree
    saved = {x.name: tuple(x.shape) for x in jax.tree.leaves(tree) if hasattr(x, "shape")}
    old = "numerics" in abstract_state and not any(k.startswith("numerics.") for k in saved)
    if old:
      abstract_state = {k: v for k, v in abstract_state.items() if k != "numerics"}
    now = {".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path):
           tuple(x.shape) for path, x in jax.tree_util.tree_flatten_with_path(abstract_state)[0]}
    diff = sorted(set(saved) ^ set(now)) + sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
    if diff:
      first = diff[0]
      where = lambda d: f"shape {list(d[first])}" if first in d else "absent"
      raise UserError(
          f"the checkpoint at step {step} in {self.directory} holds another optimizer state than this "
          f"config makes: {len(diff)} arrays differ (first: {first}: {where(saved)} in the checkpoint, "
          f"{where(now)} in this config); the optimizer or optim.rules changed since it was written. "
          f"Resume with the config that wrote it, or start a new --workdir from its params with "
          f"--config.init.parts=\"(('{self.directory.parent}', '', ''),)\"")
    return old

  def restore_params(self, step: int, abstract_params) -> dict:
    """Only the params (no optimizer state is read), onto the shardings of `abstract_params`; a subtree
    of the saved params (by name) is fine, dtypes are cast to the target's."""
    self.check_complete(step)
    item = {"params": abstract_params}
    r = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
    return r.state["params"]

  def close(self, quiet: bool = False) -> None:
    """Waits for the save in flight (quiet: ignoring its failure, when another error is on its way)."""
    if self._mngr is None:
      return
    error = None
    for finish in (self.wait, self._mngr.close):  # close re-raises a failed save's error: once is enough
      try:
        finish()
      except Exception as e:  # pylint: disable=broad-except
        error = error or e
    self._mngr = None
    if error is not None and not quiet:
      raise error

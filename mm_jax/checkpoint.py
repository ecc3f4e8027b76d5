"""Checkpoints in <workdir>/checkpoints through an orbax CheckpointManager.

Each step directory holds three items:
  state  params, optimizer state and step (StandardSave: restored onto any mesh by target shardings)
  data   the grain iterator state of every process, so a resumed run sees exactly the same batches
  meta   json: the config that wrote it and the parameter signature (path -> dtype[shape]), which is
         checked before restoring, so another architecture's checkpoint gives a clear error.
"""
import json
import os

from etils import epath
import grain
import jax
import ml_collections as mlc
import orbax.checkpoint as ocp

from mm_jax.errors import UserError
from mm_jax.optim import path_str


def workdir_path(workdir: str) -> epath.Path:
  """Local paths made absolute (orbax wants them so); gs:// and other remote paths as they are."""
  return epath.Path(workdir if "://" in str(workdir) else os.path.abspath(workdir))


def signature(params) -> dict[str, str]:
  """path -> 'float32[128, 64]' for every parameter (arrays or ShapeDtypeStructs)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return {path_str(p): f"{x.dtype}{list(x.shape)}" for p, x in flat}


class Checkpoints:
  """A thin wrapper over one CheckpointManager: save / restore of state, data iterator and meta."""

  def __init__(self, workdir: str, *, keep: int = 2, read_only: bool = False, compress: bool = True):
    """compress=False (for save_params only; mm_jax.convert) writes arrays without zstd: tensorstore
    then writes straight from them, where compressing buffers them again, up to their whole size."""
    self.directory = workdir_path(workdir) / "checkpoints"
    self._mngr = None
    self._params_save = ocp.args.StandardSave if compress else ocp.args.PyTreeSave  # its handler's args
    handlers = None if compress else {"state": ocp.PyTreeCheckpointHandler(use_compression=False),
                                      "meta": ocp.JsonCheckpointHandler()}
    if not read_only or self.directory.is_dir():
      self._mngr = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(
              max_to_keep=keep, create=not read_only, read_only=read_only,
              enable_async_checkpointing=not read_only),
          item_handlers=handlers)

  def latest_step(self) -> int | None:
    return None if self._mngr is None else self._mngr.latest_step()

  def all_steps(self) -> list[int]:
    return [] if self._mngr is None else list(self._mngr.all_steps())

  def meta(self, step: int) -> dict:
    return self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore())).meta

  def check_compatible(self, step: int, params_abstract) -> None:
    """Raises UserError if the checkpoint at `step` was written by a model of another shape."""
    saved, now = self.meta(step)["signature"], signature(params_abstract)
    diff = sorted(set(saved) ^ set(now)) + sorted(k for k in set(saved) & set(now) if saved[k] != now[k])
    if diff:
      first = diff[0]
      raise UserError(
          f"the checkpoint at step {step} in {self.directory} belongs to another architecture: "
          f"{len(diff)} parameters differ (first: {first}: {saved.get(first, 'absent')} in the "
          f"checkpoint, {now.get(first, 'absent')} in this config); use a new --workdir or the config "
          "that wrote it")

  def save(self, step: int, state, data_iterator, config: mlc.ConfigDict) -> None:
    meta = {"config": json.loads(config.to_json_best_effort()), "signature": signature(state["params"])}
    self._mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=grain.checkpoint.CheckpointSave(data_iterator),
        meta=ocp.args.JsonSave(meta)))

  def save_params(self, step: int, params, config: mlc.ConfigDict) -> None:
    """Params only (no optimizer state, no data iterator): what an import writes."""
    meta = {"config": json.loads(config.to_json_best_effort()), "signature": signature(params)}
    self._mngr.save(step, args=ocp.args.Composite(
        state=self._params_save({"params": params}), meta=ocp.args.JsonSave(meta)))

  def restore(self, step: int, abstract_state, data_iterator) -> dict:
    """Restores the state onto the shardings of `abstract_state` and the data iterator in place."""
    r = self._mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=grain.checkpoint.CheckpointRestore(data_iterator)))
    return r.state

  def restore_params(self, step: int, abstract_params) -> dict:
    """Only the params (no optimizer state is read), onto the shardings of `abstract_params`; a subtree
    of the saved params (by name) is fine, dtypes are cast to the target's."""
    item = {"params": abstract_params}
    r = self._mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
        partial_restore=True)))
    return r.state["params"]

  def wait(self) -> None:
    if self._mngr is not None:
      self._mngr.wait_until_finished()

  def close(self) -> None:
    if self._mngr is not None:
      self._mngr.close()


def plan_parts(parts, abstract_params) -> list[dict]:
  """Checks config.init.parts against this model and the checkpoints; returns what load_parts reads.

  parts: ordered (checkpoint dir, source prefix, destination prefix). Every param of this model under
  the destination prefix is read from the newest checkpoint of the dir at source prefix + the rest of
  its path; a later part overrides an earlier one. Raises UserError naming the part and the param.
  """
  flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  plans = []
  for part in parts:
    if len(part) != 3:
      raise UserError(f"init.parts entry {part!r} is not (checkpoint dir, source prefix, destination "
                      "prefix), e.g. ('workdirs/siglip', 'encoder/', 'encoder/')")
    directory, src, dst = part
    ckpt = Checkpoints(directory, read_only=True)
    step = ckpt.latest_step()
    if step is None:
      raise UserError(f"init.parts: no checkpoint in {ckpt.directory}; train or convert it first")
    saved = ckpt.meta(step)["signature"]
    ckpt.close()
    mapping = {}
    for path, x in flat.items():
      if not path.startswith(dst):
        continue
      src_path = src + path[len(dst):]
      want = f"{x.dtype}{list(x.shape)}"
      if src_path not in saved:
        raise UserError(f"init.parts {part!r}: {src_path} (for {path}) is not in {ckpt.directory} at "
                        f"step {step}; it holds e.g. {', '.join(sorted(saved)[:3])}")
      if saved[src_path].split("[")[1] != want.split("[")[1]:
        raise UserError(f"init.parts {part!r}: {src_path} is {saved[src_path]} in the checkpoint but "
                        f"{path} is {want} in this model; the architectures differ")
      mapping[path] = src_path
    if not mapping:
      raise UserError(f"init.parts {part!r}: no parameter of this model starts with {dst!r}")
    unused = [p for p in saved if p.startswith(src) and p not in set(mapping.values())]
    plans.append({"directory": directory, "step": step, "mapping": mapping, "unused": unused})
  return plans


def load_parts(plans: list[dict], params) -> dict:
  """params with the planned parts read from their checkpoints (onto the params' shardings)."""
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  flat = {path_str(p): x for p, x in paths_leaves}
  for plan in plans:
    item = {}
    for path, src_path in plan["mapping"].items():
      node = item
      *parents, leaf = src_path.split("/")
      for key in parents:
        node = node.setdefault(key, {})
      x = flat[path]
      node[leaf] = jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    ckpt = Checkpoints(plan["directory"], read_only=True)
    restored = ckpt.restore_params(plan["step"], item)
    ckpt.close()
    by_src = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    for path, src_path in plan["mapping"].items():
      flat[path] = by_src[src_path]
    print(f"Loaded {len(plan['mapping'])} params from {plan['directory']} (step {plan['step']})"
          + (f"; {len(plan['unused'])} of its params under the prefix were not used" if plan["unused"]
             else "") + ".", flush=True)
  return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p)] for p, _ in paths_leaves])

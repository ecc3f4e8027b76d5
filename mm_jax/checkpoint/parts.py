"""Params loaded by name from other runs' checkpoints: config.init.parts (a stage starting from the
last one's encoder, connector, LLM ...) and eval of a checkpoint with the other layer layout.

A plan maps each param of this model to its source in a checkpoint: a path, or a relayout between an
unrolled stack (P/block_i/R) and a scanned one (P/blocks/R[i]); plans are checked against the saved
signature before anything is read, so a wrong prefix or size is one UserError naming the param.
"""
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from mm_jax.checkpoint import Checkpoints, relayout, workdir_path
from mm_jax.errors import UserError
from mm_jax.models.stack import path_str


def map_parts(parts, abstract_params) -> list[dict]:
  """Checks config.init.parts against this model and the checkpoints; returns what load_parts reads.

  parts: ordered (checkpoint dir, source prefix, destination prefix). Every param of this model under
  the destination prefix is read from the newest checkpoint of the dir at source prefix + the rest of
  its path (converted from the other layer layout if need be); a later part overrides an earlier one.
  Raises UserError naming the part and the param.
  """
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
    plans.append(_plan(f"init.parts {part!r}", directory, step, saved, abstract_params, src, dst))
  return plans


def _plan(what: str, directory: str, step: int, saved: dict, abstract_params, src: str, dst: str) -> dict:
  """{"mapping": param path -> its source in the checkpoint (a path, or a relayout), ...}."""
  flat = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  where = f"{workdir_path(directory) / 'checkpoints'} at step {step}"
  mapping = {}
  for path, x in flat.items():
    if not path.startswith(dst):
      continue
    src_path = src + path[len(dst):]
    want = f"{x.dtype}{list(x.shape)}"
    if src_path not in saved:
      mapping[path] = relayout(src_path, tuple(x.shape), saved)
      if mapping[path] is None:
        raise UserError(f"{what}: {src_path} (for {path}) is not in {where}; it holds e.g. "
                        f"{', '.join(sorted(saved)[:3])}")
      continue
    if saved[src_path].split("[")[1] != want.split("[")[1]:
      raise UserError(f"{what}: {src_path} is {saved[src_path]} in the checkpoint but {path} is {want} "
                      "in this model; the architectures differ")
    mapping[path] = src_path
  if not mapping:
    raise UserError(f"{what}: no parameter of this model starts with {dst!r}")
  used = {s for m in mapping.values() for s in _sources(m)}
  unused = [p for p in saved if p.startswith(src) and p not in used]
  return {"directory": directory, "step": step, "mapping": mapping, "unused": unused}


def _sources(m) -> tuple[str, ...]:
  return (m,) if isinstance(m, str) else m[1] if m[0] == "stack" else (m[1],)


def restore_params_by_name(directory: str, step: int, abstract_params) -> dict:
  """All params of the checkpoint at `step`, by name, converted from the other layer layout where the
  checkpoint's differs (a scanned run evaluated unrolled, or the reverse)."""
  ckpt = Checkpoints(directory, read_only=True)
  saved = ckpt.meta(step)["signature"]
  ckpt.close()
  plan = _plan(f"the checkpoint in {directory}", directory, step, saved, abstract_params, "", "")
  return load_parts([plan], abstract_params, quiet=True)


def load_parts(plans: list[dict], params, quiet: bool = False) -> dict:
  """params with the planned parts read from their checkpoints (onto the params' shardings)."""
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  flat = {path_str(p): x for p, x in paths_leaves}
  for plan in plans:
    item = {}
    for path, source in plan["mapping"].items():
      x = flat[path]
      spec = tuple(x.sharding.spec)
      if isinstance(source, str):
        wants = {source: (x.shape, spec)}
      elif source[0] == "stack":  # one layer each
        wants = {src: (x.shape[1:], spec[1:]) for src in source[1]}
      else:  # the whole stack, once
        wants = {source[1]: ((source[3],) + tuple(x.shape), (None,) + spec)}
      for src, (shape, src_spec) in wants.items():
        node = item
        *parents, leaf = src.split("/")
        for key in parents:
          node = node.setdefault(key, {})
        node[leaf] = jax.ShapeDtypeStruct(shape, x.dtype, sharding=NamedSharding(x.sharding.mesh,
                                                                                 P(*src_spec)))
    ckpt = Checkpoints(plan["directory"], read_only=True)
    restored = ckpt.restore_params(plan["step"], item)
    ckpt.close()
    by_src = {path_str(p): x for p, x in jax.tree_util.tree_flatten_with_path(restored)[0]}
    for path, source in plan["mapping"].items():
      out = flat[path].sharding
      if isinstance(source, str):
        flat[path] = by_src[source]
      elif source[0] == "stack":
        flat[path] = jax.jit(lambda *a: jnp.stack(a), out_shardings=out)(*(by_src[s] for s in source[1]))
      else:
        flat[path] = jax.jit(lambda a, i=source[2]: a[i], out_shardings=out)(by_src[source[1]])
    if not quiet:
      print(f"Loaded {len(plan['mapping'])} params from {plan['directory']} (step {plan['step']})"
            + (f"; {len(plan['unused'])} of its params under the prefix were not used" if plan["unused"]
               else "") + ".", flush=True)
  return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p)] for p, _ in paths_leaves])

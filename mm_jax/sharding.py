"""The device mesh, logical-to-mesh axis rules, and the shardings every jit states.

Params carry logical names (models/layers.py); `config.axis_rules` maps them to the mesh axes
("data", "fsdp", "tensor"). The batch is split over data x fsdp; each process feeds its own rows.
"""
import math
import os

import flax.linen as nn
import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mm_jax.errors import UserError

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")


def maybe_initialize_distributed() -> None:
  """Multi-host: launch_tpu.sh sets MM_JAX_DISTRIBUTED=1 on every worker (TPU pods find their peers)."""
  if os.environ.get("MM_JAX_DISTRIBUTED") == "1" and not jax.distributed.is_initialized():
    jax.distributed.initialize()


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh with axes data/fsdp/tensor from the config; one size may be -1 (the devices left over)."""
  devices = jax.devices() if devices is None else devices
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise UserError(f"unknown mesh axes {sorted(unknown)}; known: {', '.join(MESH_AXES)}")
  sizes = [int(mesh_cfg.get(a, 1)) for a in MESH_AXES]
  n = len(devices)
  if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
    raise UserError(f"mesh sizes {dict(zip(MESH_AXES, sizes))} are invalid: use positive sizes and "
                    "at most one -1 (--config.mesh.AXIS=SIZE)")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} does not divide the {n} devices; "
                      "set --config.mesh.* so that their product divides the device count")
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise UserError(f"mesh {dict(zip(MESH_AXES, sizes))} needs {math.prod(sizes)} devices but "
                    f"{n} are present; set --config.mesh.* (one may be -1)")
  # Auto axes: Linen's logical constraints need them (jax.make_mesh defaults to Explicit).
  return jax.make_mesh(tuple(sizes), MESH_AXES, axis_types=(AxisType.Auto,) * 3, devices=devices)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh, field: str = "global_batch_size") -> None:
  dp = data_parallel_size(mesh)
  if global_batch % dp:
    raise UserError(f"{field}={global_batch} is not divisible by the data-parallel size {dp} "
                    f"(mesh data x fsdp = {mesh.shape['data']} x {mesh.shape['fsdp']}); "
                    f"set --config.{field} to a multiple of {dp}")
  if global_batch % jax.process_count():
    raise UserError(f"{field}={global_batch} is not divisible by the {jax.process_count()} processes")


def _fit(spec: P, shape: tuple[int, ...], mesh: Mesh) -> P:
  """Drops mesh axes from dims they do not divide (e.g. 1 kv head on tensor=2): replicate instead."""
  out = []
  for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    out.append(axes if dim % math.prod(mesh.shape[a] for a in names) == 0 else None)
  return P(*out)


def param_shardings(boxed_abstract, mesh: Mesh, rules) -> dict:
  """NamedShardings for a tree of boxed (nn.LogicallyPartitioned) abstract params."""
  logical = nn.get_partition_spec(boxed_abstract)
  shapes = nn.meta.unbox(boxed_abstract)

  def one(spec, x):
    return NamedSharding(mesh, _fit(nn.logical_to_mesh_axes(spec, rules), x.shape, mesh))

  return jax.tree.map(one, logical, shapes, is_leaf=lambda s: isinstance(s, P))


def like_params(tree, abstract_params, mesh: Mesh):
  """Shardings for a tree of ShapeDtypeStructs (e.g. optimizer state) whose leaves mirror params.

  A leaf takes the sharding of the parameter whose path is the longest suffix of the leaf's dict-key
  path and whose shape equals the leaf's (Adam's mu/nu); any other leaf (counts, masked) is replicated.
  """
  by_path = {tuple(k.key for k in path): x for path, x in
             jax.tree_util.tree_flatten_with_path(abstract_params)[0]}

  def pick(path, leaf):
    keys = tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))
    for i in range(len(keys)):
      param = by_path.get(keys[i:])
      if param is not None and param.shape == leaf.shape:
        return param.sharding
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(pick, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim over data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's rows into global arrays sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)

r"""The device mesh, logical-to-mesh axis rules, multi-host setup, and the shardings every jit states.

Params carry logical names (models/layers.py); `config.axis_rules` maps them to the mesh axes
dcn x data x fsdp x tensor (outermost first); a name the rules do not list, or a dim its mesh axis
does not divide, is replicated. The batch is split over dcn x data x fsdp, one block of contiguous
rows per process (to_global). A strategy is mesh settings only (sizes multiply to the device count,
one may be -1): --config.mesh.data=-1 (data parallel, the default), --config.mesh.fsdp=-1
--config.mesh.data=1 (FSDP), --config.mesh.tensor=T (tensor parallel), their combinations, and
--config.mesh.dcn=S (data parallel across slices; on multi-slice TPUs a hybrid mesh).

Multi-host: maybe_initialize_distributed() (every entry point calls it) reads MM_JAX_DISTRIBUTED=1
(jax.distributed.initialize() finds its peers), or MM_JAX_COORDINATOR=host:port with
MM_JAX_NUM_PROCESSES=N and MM_JAX_PROCESS_ID=i (and MM_JAX_INIT_TIMEOUT). Each process feeds its own
rows, so the batch axes must split over the processes; check_batch says which setting to change.
"""
import math
import os
import socket
import time

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from mm_jax.errors import UserError

MESH_AXES = ("dcn", "data", "fsdp", "tensor")
BATCH_AXES = ("dcn", "data", "fsdp")
_ENV_COORDS = ("MM_JAX_COORDINATOR", "MM_JAX_NUM_PROCESSES", "MM_JAX_PROCESS_ID")


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() as the MM_JAX_* environment says (see the module docstring)."""
  env = os.environ
  given = [k for k in _ENV_COORDS if env.get(k)]
  if jax.distributed.is_initialized() or (not given and env.get("MM_JAX_DISTRIBUTED") != "1"):
    return
  if not given:
    jax.distributed.initialize()
    return
  address, num, pid, timeout = _coordinates(env, given)
  host, port = address.rsplit(":", 1)
  if pid:  # jax aborts the process when the coordinator cannot be reached: a clear error instead
    _wait_for(host.strip("[]"), int(port), timeout, f"process {pid} of {num}")
  loopback = host in ("localhost", "[::1]") or host.startswith("127.")
  jax.distributed.initialize(
      coordinator_address=address, num_processes=num, process_id=pid,
      coordinator_bind_address=address if loopback else None,  # None: every interface
      initialization_timeout=timeout, shutdown_timeout_seconds=min(timeout, 60))


def _coordinates(env, given: list[str]) -> tuple[str, int, int, int]:
  """(host:port, process count, process id, init timeout in s) from MM_JAX_*, checked."""
  if len(given) < len(_ENV_COORDS):
    missing = [k for k in _ENV_COORDS if k not in given]
    raise UserError(f"{', '.join(given)} set but {', '.join(missing)} not; set all of "
                    f"{', '.join(_ENV_COORDS)} (or none, with MM_JAX_DISTRIBUTED=1 where peers are found)")
  address, values = env["MM_JAX_COORDINATOR"], [env["MM_JAX_NUM_PROCESSES"], env["MM_JAX_PROCESS_ID"],
                                                 env.get("MM_JAX_INIT_TIMEOUT", "300")]
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit() or not all(v.isdigit() for v in values):
    raise UserError(f"MM_JAX_COORDINATOR={address!r} must be host:port and MM_JAX_NUM_PROCESSES, "
                    f"MM_JAX_PROCESS_ID, MM_JAX_INIT_TIMEOUT ({', '.join(values)}) must be integers")
  num, pid, timeout = map(int, values)
  if not 0 <= pid < num:
    raise UserError(f"MM_JAX_PROCESS_ID={pid} with MM_JAX_NUM_PROCESSES={num}: give an id in [0, count)")
  return address, num, pid, timeout


def _wait_for(host: str, port: int, timeout: int, who: str) -> None:
  """Returns once host:port accepts connections; UserError after `timeout` seconds."""
  deadline = time.time() + timeout
  while True:
    try:
      socket.create_connection((host, port), timeout=5).close()
      return
    except OSError as e:
      if time.time() > deadline:
        raise UserError(f"{who} could not reach the coordinator at {host}:{port} within {timeout} s "
                        f"({e}); start process 0 with the same MM_JAX_COORDINATOR, or raise "
                        "MM_JAX_INIT_TIMEOUT") from None
      time.sleep(0.5)


def _resolve(sizes: dict, n: int, where: str) -> dict:
  """Fills the one -1 in `sizes` so that their product is n (the devices `where`)."""
  if list(sizes.values()).count(-1) > 1 or any(s == 0 or s < -1 for s in sizes.values()):
    raise UserError(f"mesh sizes {sizes} are invalid: use positive sizes and at most one -1 "
                    "(--config.mesh.AXIS=SIZE)")
  known = math.prod(s for s in sizes.values() if s != -1)
  sizes = dict(sizes)
  for axis, s in sizes.items():
    if s == -1:
      if n % known:
        raise UserError(f"mesh {sizes} does not divide the {n} devices{where}; set --config.mesh.* "
                        "so that their product divides the device count")
      sizes[axis] = n // known
  if math.prod(sizes.values()) != n:
    raise UserError(f"mesh {sizes} needs {math.prod(sizes.values())} devices but {n} are present"
                    f"{where}; set --config.mesh.* (one may be -1)")
  return sizes


def mesh_shape(mesh_cfg, devices) -> tuple[dict, int]:
  """({axis: size} over MESH_AXES with the -1 filled, number of slices) for `devices`."""
  unknown = set(mesh_cfg) - set(MESH_AXES)
  if unknown:
    raise UserError(f"unknown mesh axes {sorted(unknown)}; known: {', '.join(MESH_AXES)}")
  sizes = {a: int(mesh_cfg.get(a, 1)) for a in MESH_AXES}
  slices = len({getattr(d, "slice_index", 0) for d in devices})
  if slices == 1:
    return _resolve(sizes, len(devices), ""), 1
  # Several slices: dcn is the slices; the other axes fill one slice (ICI).
  if sizes["dcn"] not in (1, -1, slices):
    raise UserError(f"mesh.dcn={sizes['dcn']} but the devices span {slices} slices; dcn is the "
                    f"slices: leave --config.mesh.dcn at 1 or set it to {slices}")
  if len(devices) % slices:
    raise UserError(f"{len(devices)} devices do not split evenly over {slices} slices")
  inner = _resolve({a: s for a, s in sizes.items() if a != "dcn"}, len(devices) // slices,
                   f" of each of the {slices} slices")
  return {"dcn": slices, **inner}, slices


def make_mesh(mesh_cfg, devices=None) -> Mesh:
  """A mesh with axes dcn/data/fsdp/tensor from the config over `devices` (default all).

  One size may be -1 (the devices left over). Devices of several TPU slices give a hybrid mesh
  whose dcn axis is the slices (jax.make_mesh refuses such device lists).
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes, slices = mesh_shape(mesh_cfg, devices)
  shape = tuple(sizes[a] for a in MESH_AXES)
  # Auto axes: Linen's logical constraints need them (jax.make_mesh defaults to Explicit).
  axis_types = (AxisType.Auto,) * len(MESH_AXES)
  if slices == 1:
    return jax.make_mesh(shape, MESH_AXES, axis_types=axis_types, devices=devices)
  # Split physical axes where needed (tensor=2 on a 4x4 slice), as jax.make_mesh does.
  grid = mesh_utils.create_hybrid_device_mesh((1,) + shape[1:], (slices,) + (1,) * (len(shape) - 1),
                                              devices=devices, allow_split_physical_axes=True)
  return Mesh(grid, MESH_AXES, axis_types=axis_types)


def data_parallel_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def check_batch(global_batch: int, mesh: Mesh, field: str = "global_batch_size") -> None:
  """The batch splits over the batch axes, and each process's devices hold one contiguous block of
  global_batch / process_count rows, in process order (what the pipelines feed)."""
  dp, procs = data_parallel_size(mesh), jax.process_count()
  if global_batch % dp:
    raise UserError(f"{field}={global_batch} is not divisible by the data-parallel size {dp} "
                    f"(mesh dcn x data x fsdp = {' x '.join(str(mesh.shape[a]) for a in BATCH_AXES)}); "
                    f"set --config.{field} to a multiple of {dp}")
  if global_batch % procs:
    raise UserError(f"{field}={global_batch} is not divisible by the {procs} processes")
  if procs == 1:  # one process feeds every row (compile-only devices may name other processes)
    return
  b = global_batch // procs
  rows = {}
  for device, index in batch_sharding(mesh).devices_indices_map((global_batch,)).items():
    rows.setdefault(device.process_index, set()).update(range(global_batch)[index[0]])
  for p, held in rows.items():
    if held != set(range(p * b, (p + 1) * b)):
      raise UserError(f"the mesh {dict(mesh.shape)} does not give each of the {procs} processes its "
                      f"own {b} rows of the batch; make dcn x data x fsdp a multiple of the process "
                      "count (fsdp or data across hosts, tensor inside a host)")


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
  """Leading (batch) dim over dcn x data x fsdp, the rest replicated."""
  return NamedSharding(mesh, P(BATCH_AXES))


def to_global(local_batch: dict, mesh: Mesh) -> dict:
  """Assembles each process's rows (its block of the global batch, check_batch) into global arrays
  sharded over the batch axes."""
  sharding = batch_sharding(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)

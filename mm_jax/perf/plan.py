r"""Plans a config on a TPU topology from this (CPU) host: AOT-compiles the real train step for that
topology and reports per-device memory against the chip's HBM, and the model FLOPs per step.

  python -m mm_jax.plan --config=configs/llava_7b.py --topology=v6e-32 [--json_out=plan.json]
  XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python -m mm_jax.plan --config=configs/shapes_tiny.py --topology=cpu-8   # host CPU devices

TPU topologies need libtpu (pip install -e '.[tpu]'; no TPU needed). Names as Cloud TPU's accelerator
types (v4-N, v5e-N, v5p-N, v6e-N, tpu7x-N), KxNAME for K slices joined by DCN (2xv5e-256), and cpu-N
for this host's CPU devices; an unknown name lists the known ones. The step (ModelOnMesh.train_step_jit)
is lowered with abstract inputs: no data, no tokenizer. Memory per device: params and optimizer state
from the shardings, the rest from compiled.memory_analysis(); total = arguments + outputs - aliased +
temporaries + generated code, an upper bound (XLA's peak is printed beside it). FLOPs: mm_jax.flops.
Exit status: 0 fits, 2 does not fit (an out-of-HBM compile error included), 1 bad input.
"""
import dataclasses
import functools
import importlib.metadata
import importlib.util
import math
import re
import time

import jax
import ml_collections as mlc

from mm_jax import cli
from mm_jax.perf import flops
from mm_jax.train import optim
from mm_jax.train import sharding
from mm_jax.config import files
from mm_jax.errors import UserError
from mm_jax import models
from mm_jax.tasks import TASKS
from mm_jax.train.state import ModelOnMesh

GiB = 1024 ** 3
INSTALL = "pip install -e '.[tpu]'"


@dataclasses.dataclass(frozen=True)
class Generation:
  libtpu_name: str     # get_topology_desc's name prefix
  chip_config: str
  counts_cores: bool   # the Cloud name counts TensorCores (2 per chip), not chips
  devices_per_chip: int
  hbm_gib: float       # usable HBM per device
  shapes: dict         # chips -> chip grid


_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}
_3D = {4: (2, 2, 1), 8: (2, 2, 2), 16: (2, 2, 4), 32: (2, 4, 4), 64: (4, 4, 4), 128: (4, 4, 8),
       256: (4, 8, 8), 512: (8, 8, 8), 1024: (8, 8, 16), 2048: (8, 16, 16), 4096: (16, 16, 16)}
GENERATIONS = {
    "v4": Generation("v4", "megacore", True, 1, 30.75, {k: v for k, v in _3D.items() if k <= 2048}),
    "v5p": Generation("v5", "megacore", True, 1, 95.0, _3D),
    "v5e": Generation("v5e", "default", False, 1, 15.75, _2D),
    "v6e": Generation("v6e", "default", False, 1, 31.25, _2D),
    "tpu7x": Generation("tpu7x", "default", True, 2, 96.0, {k: v for k, v in _3D.items() if k <= 64}),
}
ALIASES = {"v5litepod": "v5e"}


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str               # as given: "v5e-16", "2xv5p-128", "cpu-8"
  generation: str         # a GENERATIONS key, or "cpu"
  chips: int              # per slice
  slices: int = 1

  @property
  def devices(self) -> int:
    per_chip = 1 if self.generation == "cpu" else GENERATIONS[self.generation].devices_per_chip
    return self.chips * per_chip * self.slices

  def topology_desc_args(self) -> dict:
    """get_topology_desc's keyword arguments (MaxText's table, accelerator_to_spec_map)."""
    gen = GENERATIONS[self.generation]
    grid = gen.shapes[self.chips]
    # The wrap-around links of full pods: 3-D pods from 64 chips, 2-D ones along a side of 16.
    wrap = (self.chips >= 64,) * 3 if len(grid) == 3 else tuple(s == 16 for s in grid) + (False,)
    return dict(platform="tpu", topology_name=f"{gen.libtpu_name}:{'x'.join(map(str, grid))}",
                chip_config_name=gen.chip_config, chips_per_host_bounds=(1, 1, 1) if self.chips == 1
                else (2, 2, 1), num_slices=self.slices, wrap=wrap)


def known_topologies() -> str:
  out = []
  for name, gen in GENERATIONS.items():
    mult = 2 if gen.counts_cores else 1
    out.append(f"{name}-{{{','.join(str(c * mult) for c in gen.shapes)}}}")
  return "; ".join(out) + "; KxNAME for K slices (2xv5e-256); cpu-N (this host's CPU devices)"


def parse_topology(name: str) -> Topology:
  m = re.fullmatch(r"(?:(\d+)x)?([a-z0-9]+)-(\d+)", name.strip().lower())
  gen = ALIASES.get(m.group(2), m.group(2)) if m else None
  if m and gen == "cpu" and not m.group(1) and int(m.group(3)) >= 1:
    return Topology(name, "cpu", int(m.group(3)))
  if m and gen in GENERATIONS:
    g, n, slices = GENERATIONS[gen], int(m.group(3)), int(m.group(1) or 1)
    chips = n // 2 if g.counts_cores and n % 2 == 0 else (-1 if g.counts_cores else n)
    if chips in g.shapes and slices >= 1:
      return Topology(name, gen, chips, slices)
  raise UserError(f"unknown topology {name!r}; known: {known_topologies()}")


def topology_devices(topo: Topology) -> list:
  """The devices to compile for: compile-only TPU devices from libtpu, or this host's CPU devices."""
  if topo.generation == "cpu":
    devices = jax.devices("cpu")
    if len(devices) < topo.chips:
      raise UserError(f"{topo.name} needs {topo.chips} CPU devices but this process has {len(devices)}; "
                      f"set XLA_FLAGS=--xla_force_host_platform_device_count={topo.chips}")
    return devices[:topo.chips]
  if importlib.util.find_spec("libtpu") is None:
    raise UserError(f"compiling for {topo.name} needs libtpu, which is not installed: {INSTALL} "
                    "(the optional tpu extra; no TPU needed)")
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  try:
    return topologies.get_topology_desc(**topo.topology_desc_args()).devices
  except Exception as e:  # pylint: disable=broad-except
    raise UserError(f"libtpu could not describe {topo.name} ({cli.one_line(e)[:300]}); "
                    f"try another topology, or reinstall: {INSTALL}") from None


def _shard_bytes(tree) -> int:
  """Bytes on one device of a tree of ShapeDtypeStructs with shardings."""
  return sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(tree))


_SIZE = r"([\d.]+)\s*([KMGT]i?B?|B)"


def _bytes(num: str, unit: str) -> int:
  return int(float(num) * 1024 ** "BKMGT".index(unit[0]))


def parse_oom(message: str) -> dict:
  """What XLA:TPU's out-of-HBM message says: required and available bytes (per device) when stated."""
  out = {"message": cli.one_line(message)[:400]}
  for key, pattern in (("required", rf"Used {_SIZE} of"), ("available", rf"of {_SIZE} hbm"),
                       ("required", rf"temporaries \({_SIZE}\)"),
                       ("available", rf"available HBM \({_SIZE}\)"),
                       ("exceeded_by", rf"capacity by {_SIZE}")):
    m = re.search(pattern, message)
    if m and f"{key}_bytes" not in out:
      out[f"{key}_bytes"] = _bytes(*m.groups())
  return out


def is_oom(e: BaseException) -> bool:
  text = str(e).lower()
  return ("resource_exhausted" in text and "hbm" in text) or "ran out of memory" in text


def vocab_size(config: mlc.ConfigDict) -> int:
  """The tokenizer's size a plan assumes (no data is built): data.vocab_size. A model's own
  vocab_size (an imported one's, set in its tower's section) takes precedence in its builder."""
  return config.data.vocab_size


def plan(config: mlc.ConfigDict, topology: str, hbm_gib: float | None = None) -> dict:
  """Compiles config's train step for `topology`; returns the report (see the module docstring)."""
  config = files.complete(config)  # a config written before a field gets base's default
  topo = parse_topology(topology)
  devices = topology_devices(topo)
  mesh = sharding.make_mesh(config.mesh, devices)
  sharding.check_batch(config.global_batch_size, mesh)
  mm = ModelOnMesh.create(config, vocab_size(config), mesh)
  TASKS[mm.model.task].check(config)
  labels = optim.param_labels(mm.abstract_params, config.optim.rules)
  tx = optim.make_optimizer(config.optim, config.total_steps, labels)
  train_state = mm.abstract_train_state(tx)
  batch_sh = sharding.batch_sharding(mesh)
  shapes = jax.eval_shape(functools.partial(models.example_batch, config, TASKS[mm.model.task],
                                            config.global_batch_size))
  batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=batch_sh), shapes)
  sizes = [p.size for p in jax.tree.leaves(mm.abstract_params)]
  trainable = sum(s for s, lab in zip(sizes, jax.tree.leaves(labels)) if lab == "trainable")
  hbm = hbm_gib if hbm_gib is not None else (
      None if topo.generation == "cpu" else GENERATIONS[topo.generation].hbm_gib)
  report = {
      "topology": topo.name, "devices": len(devices), "chips": topo.chips * topo.slices,
      "slices": topo.slices, "device_kind": devices[0].device_kind,
      "mesh": {k: int(v) for k, v in mesh.shape.items()},
      "global_batch_size": config.global_batch_size,
      "params": {"total": sum(sizes), "trainable": trainable},
      "hbm_bytes": None if hbm is None else int(hbm * GiB),
      "memory": {"params_bytes": _shard_bytes(train_state["params"]),
                 "opt_state_bytes": _shard_bytes(train_state["opt_state"]),
                 "batch_bytes": _shard_bytes(batch)},
      "flops": flops.train_flops(config, mm.abstract_params, labels, model=mm.model),
      "jax": jax.__version__,  # the memory numbers depend on the libtpu version too
      "libtpu": None if topo.generation == "cpu" else importlib.metadata.version("libtpu"),
  }
  t0 = time.perf_counter()
  with mm.context():
    lowered = mm.train_step_jit(tx).lower(train_state, batch)
  try:
    compiled = lowered.compile()
  except Exception as e:  # pylint: disable=broad-except
    if not is_oom(e):
      raise
    report.update(compile_s=time.perf_counter() - t0, fits=False, oom=parse_oom(str(e)))
    return report
  report["compile_s"] = time.perf_counter() - t0
  m = compiled.memory_analysis()
  mem = report["memory"]
  for field in ("argument", "output", "alias", "temp", "generated_code"):
    mem[f"{field}_bytes"] = int(getattr(m, f"{field}_size_in_bytes"))
  peak = getattr(m, "peak_memory_in_bytes", None)
  mem["xla_peak_bytes"] = None if peak is None else int(peak)
  mem["total_bytes"] = (mem["argument_bytes"] + mem["output_bytes"] - mem["alias_bytes"]
                        + mem["temp_bytes"] + mem["generated_code_bytes"])
  report["fits"] = hbm is None or mem["total_bytes"] <= hbm * GiB
  return report


def _gib(n) -> str:
  if n is None:
    return "       -"
  return f"{n / GiB:8.2f} GiB" if n >= GiB else f"{n / 2 ** 20:8.1f} MiB"


def _note(r: dict) -> str:
  mem, hbm = r["memory"], r["hbm_bytes"]
  if hbm is None:
    return " (no HBM limit given)"
  if not r["fits"] and mem["xla_peak_bytes"] is not None and mem["xla_peak_bytes"] <= hbm:
    return " by the total; XLA compiled it and its peak is within HBM: marginal, expect an OOM risk"
  return ""


def format_report(r: dict, config_name: str = "") -> str:
  mesh = " ".join(f"{k}={v}" for k, v in r["mesh"].items())
  p, f, mem, hbm = r["params"], r["flops"], r["memory"], r["hbm_bytes"]
  lines = [
      f"{config_name} on {r['topology']}: {r['devices']} devices ({r['device_kind']}, {r['chips']} chips, "
      f"{r['slices']} slice{'s' * (r['slices'] > 1)}), mesh {mesh}",
      f"params {p['total'] / 1e9:.3f} B ({p['trainable'] / 1e9:.3f} B trainable); global batch "
      f"{r['global_batch_size']}; compile {r['compile_s']:.1f} s",
      "per device:",
      f"  parameters        {_gib(mem['params_bytes'])}",
      f"  optimizer state   {_gib(mem['opt_state_bytes'])}",
      f"  batch             {_gib(mem['batch_bytes'])}"]
  if "oom" in r:
    oom = r["oom"]
    lines += [f"  required (XLA)    {_gib(oom.get('required_bytes'))}",
              f"  HBM (XLA)         {_gib(oom.get('available_bytes', hbm))}",
              f"  -> DOES NOT FIT: XLA ran out of HBM at compile time: {oom['message']}"]
  else:
    used = "" if hbm is None else f"  ({100 * mem['total_bytes'] / hbm:.0f}% of HBM)"
    lines += [f"  temporaries       {_gib(mem['temp_bytes'])}",
              f"  generated code    {_gib(mem['generated_code_bytes'])}",
              f"  total             {_gib(mem['total_bytes'])}{used}   "
              "(arguments + outputs - aliased + temporaries + code)",
              f"  XLA peak          {_gib(mem['xla_peak_bytes'])}",
              f"  HBM (usable)      {_gib(hbm)}",
              "  -> " + ("fits" if r["fits"] else "DOES NOT FIT") + _note(r)]
  parts = ", ".join(f"{k} {v['total'] / 1e12:.4g}" for k, v in f["by_part"].items())
  lines += [f"model FLOPs per step: {f['total'] / 1e12:.4g} TFLOP (forward {f['forward'] / 1e12:.4g}, "
            f"backward {f['backward'] / 1e12:.4g}); per device {f['total'] / r['devices'] / 1e12:.4g}",
            f"  by part (TFLOP): {parts}"]
  return "\n".join(lines)

"""Lists the registries: `python -m mm_jax.models` (families, encoders, connectors, tasks, data sources)."""
import dataclasses
import sys

from mm_jax import data
from mm_jax.tasks import TASKS

from mm_jax.models import CONNECTORS, ENCODERS, FAMILIES, options, stack


def _summary(obj) -> str:
  """The docstring's first sentence."""
  para = " ".join((obj.__doc__ or "").strip().split("\n\n")[0].split())
  return para.split(". ")[0].rstrip(".") + "."


def _defaults(cls) -> str:
  fields = {f.name: f.default for f in dataclasses.fields(cls)}
  return ", ".join(f"{k}={fields[k]}" for k in options(cls, ("width", "dtype", "param_dtype"))) or "none"


def main() -> None:
  print("model.family:")
  for name, fam in sorted(FAMILIES.items()):
    opts = f"\n  {'':14s}options (model.family_options.{name}): {_defaults(fam.options)}" if fam.options else ""
    print(f"  {name:14s}{_summary(fam.build)}{opts}")
  print("encoders (a family's; model.encoder holds their fields):")
  for name, enc in sorted(ENCODERS.items()):
    print(f"  {name:14s}{_summary(enc.build)}")
  print("model.connector (options, with defaults: model.connector_options.<name>.<option>):")
  for name, cls in sorted(CONNECTORS.items()):
    print(f"  {name:14s}{_summary(cls)}\n  {'':14s}options: {_defaults(cls)}")
  print("model.task (a model's task attribute: mm_jax.tasks.TASKS):")
  for name in sorted(TASKS):
    print(f"  {name:14s}{_summary(sys.modules[TASKS[name].loss.__module__])}")
  print("data.name (mm_jax.data.SOURCES):")
  for name in sorted(data.SOURCES):
    print(f"  {name:14s}splits {', '.join(data.SOURCES[name].splits)}; question kinds "
          f"{', '.join(data.SOURCES[name].kinds)}")
  print("model.encoder / model.decoder layer stacks (models/stack.py):")
  print("  scan          True: one compiled block for the whole stack (params on a 'layers' axis)")
  print(f"  remat         {' | '.join(stack.REMAT)}; 'custom' keeps the tensors in remat_names")
  print(f"  remat_names   tags: {', '.join(stack.NAMES)}")


if __name__ == "__main__":
  main()

"""The repository's configs/*.py by name, for a config that builds on another (paligemma_3b on
shapes_tiny, bench_1b on paligemma_3b, ...) and for the converter's base config."""
import importlib.util
import os

import ml_collections as mlc

DIRECTORY = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs"))


def get_config(name: str, arg: str = "") -> mlc.ConfigDict:
  """configs/<name>.py's get_config(arg)."""
  spec = importlib.util.spec_from_file_location(f"_config_{name}", os.path.join(DIRECTORY, f"{name}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)

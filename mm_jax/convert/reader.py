"""A Hugging Face checkpoint directory: config.json and safetensors weights, in one file or sharded
(model.safetensors.index.json).

`headers` (name -> (shape, dtype)) comes from the files' headers alone, no tensor data; `read` loads one
tensor, or one block of its rows, at a time: a converter holds only the tensor it is working on.
Tensors come back as jax arrays on the default device (safetensors' "flax" framework: numpy has no
bfloat16).
"""
import json
import os

from safetensors import safe_open

from mm_jax.errors import UserError

FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")


class HFCheckpoint:
  """config.json (a dict) and the headers of the weights; `read` streams tensors."""

  def __init__(self, hf_dir: str):
    self.directory = hf_dir
    path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(path):
      raise UserError(f"--hf_dir={hf_dir} holds no config.json; give a directory written by "
                      "save_pretrained (or downloaded from the hub)")
    with open(path) as f:
      self.config = json.load(f)
    files, self._file_of = _weight_files(hf_dir)  # the files; tensor name -> file (from the index)
    self.headers: dict[str, tuple[tuple[int, ...], str]] = {}
    for file in files:
      with safe_open(file, framework="flax") as f:
        present = set(f.keys())
        for name in present:
          if self._file_of.setdefault(name, file) == file:
            s = f.get_slice(name)
            self.headers[name] = (tuple(s.get_shape()), s.get_dtype())
      absent = sorted(n for n, fl in self._file_of.items() if fl == file and n not in present)
      if absent:
        raise UserError(f"model.safetensors.index.json in {hf_dir} puts {absent[0]} in "
                        f"{os.path.basename(file)}, which does not hold it")
  def read(self, name: str, part: tuple[int, int] = (0, 1)):
    """Tensor `name`; with part=(i, n), only the i-th of n equal blocks of its rows.

    The file is opened (memory-mapped) for this one read: pages of a mapping stay in the process's
    resident set while it is open, so one open handle would add the whole file to the peak.
    """
    with safe_open(self._file_of[name], framework="flax") as f:
      i, n = part
      if n == 1:
        return f.get_tensor(name)
      rows = self.headers[name][0][0] // n
      return f.get_slice(name)[i * rows:(i + 1) * rows]


def _weight_files(hf_dir: str) -> tuple[list[str], dict[str, str]]:
  """(files, name -> file): from the index of a sharded checkpoint; for one file, {} (the header
  fills it)."""
  index = os.path.join(hf_dir, "model.safetensors.index.json")
  single = os.path.join(hf_dir, "model.safetensors")
  if os.path.isfile(index):
    with open(index) as f:
      weight_map = json.load(f).get("weight_map", {})
    files = {}
    for name, file in weight_map.items():
      files[name] = os.path.join(hf_dir, file)
      if not os.path.isfile(files[name]):
        raise UserError(f"{file} (listed in {index} for {name}) is missing")
    return sorted(set(files.values())), files
  if os.path.isfile(single):
    return [single], {}
  if any(n.endswith(".bin") for n in os.listdir(hf_dir)):
    raise UserError(f"--hf_dir={hf_dir} holds PyTorch .bin weights only; re-save them as safetensors "
                    "(model.save_pretrained(dir) writes safetensors by default)")
  raise UserError(f"--hf_dir={hf_dir} holds neither model.safetensors nor "
                  "model.safetensors.index.json")

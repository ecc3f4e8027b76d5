"""Where training reports go: the console, TensorBoard event files and <workdir>/metrics.jsonl.

Only process 0 writes. Also the parameter table printed at start.
"""
import json
import sys
import time
from typing import Callable

import jax
from absl import logging
from etils import epath


def _import_tensorboardx():
  """tensorboardX imports torch where it is installed (a second of every start, only so that it can
  take torch tensors); our scalars are floats, so torch is hidden from that one import."""
  if "torch" in sys.modules:
    import tensorboardX  # pylint: disable=g-import-not-at-top
    return tensorboardX
  sys.modules["torch"] = None  # makes `import torch` raise ImportError, which tensorboardX expects
  try:
    import tensorboardX  # pylint: disable=g-import-not-at-top
  finally:
    del sys.modules["torch"]
  return tensorboardX


def summary_writer(directory: epath.Path, suffix: str = ""):
  """A tensorboardX SummaryWriter into `directory` (process 0 only); its file is named by the second, so
  writers opened within one second need distinct suffixes."""
  return _import_tensorboardx().SummaryWriter(str(directory), filename_suffix=suffix)


def write_samples(directory: epath.Path, tag: str, step: int, scores: dict, samples: list[dict]) -> None:
  """An evaluation in TensorBoard: its scalar scores, and each sample's image(s) with its question,
  answer and prediction (an image summary and a text table)."""
  tb = summary_writer(directory, f".{tag}.{step}")
  for k, v in scores.items():
    if isinstance(v, (int, float)) and not isinstance(v, bool):
      tb.add_scalar(f"{tag}/{k}", v, step)
  for k, v in scores.get("per_kind", {}).items():
    tb.add_scalar(f"{tag}/per_kind/{k}", v, step)
  cell = lambda x: str(x).replace("|", "\\|").replace("\n", " ")
  table = ["| id | question | answer | prediction |", "| --- | --- | --- | --- |"]
  for i, r in enumerate(samples):
    tb.add_image(f"{tag}/sample_{i}", r["image"], step, dataformats="HWC")
    table.append(f"| {cell(r['id'])} | {cell(r['question'])} | {cell(r['answer'])} | {cell(r['prediction'])} |")
  if samples:
    tb.add_text(f"{tag}/samples", "\n".join(table), step)
  tb.close()


class MetricWriter:
  """throughput: steps/s -> more metrics (mfu.Throughput: tokens_per_s, mfu), called by process 0 only
  (the only writer) at each log step that knows its steps/s."""

  def __init__(self, workdir: epath.Path, total_steps: int,
               throughput: Callable[[float], dict[str, float]] | None = None):
    self._primary = jax.process_index() == 0
    self._total = total_steps
    self._throughput = throughput
    self._t0 = self._step0 = None
    if self._primary:
      self._tb = _import_tensorboardx().SummaryWriter(str(workdir / "tensorboard"))
      self._jsonl = (workdir / "metrics.jsonl").open("a")

  def write(self, step: int, metrics: dict[str, float], timed: bool = True) -> None:
    """Logs metrics of `step` (host floats) with steps/s (and the throughput's metrics) and ETA, measured
    since the first call; timed=False (an evaluation's scores): the metrics alone."""
    now = time.time()
    if not timed:
      pass
    elif self._t0 is None:
      self._t0, self._step0 = now, step
    elif step > self._step0:
      metrics = dict(metrics, steps_per_sec=(step - self._step0) / (now - self._t0))
    if not self._primary:
      return
    if self._throughput and "steps_per_sec" in metrics:
      start = time.time()
      metrics = dict(metrics, **self._throughput(metrics["steps_per_sec"]))
      self._t0 += time.time() - start  # its first call may measure the peak: not training time
    line = f"step {step}/{self._total}"
    for k, v in metrics.items():
      line += f" | {k} {v:.4g}"
    if "steps_per_sec" in metrics:
      eta = (self._total - step) / metrics["steps_per_sec"]
      line += f" | ETA {int(eta // 60)}m{int(eta % 60):02d}s"
    logging.info(line)
    print(line, flush=True)
    for k, v in metrics.items():
      self._tb.add_scalar(k, v, step)
    self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
    self._jsonl.flush()

  def pause(self, seconds: float) -> None:
    """Leaves `seconds` (an evaluation) out of steps/s."""
    if self._t0 is not None:
      self._t0 += seconds

  def text(self, tag: str, text: str, step: int = 0) -> None:
    """A text summary (e.g. the parameter table, as a code block so its columns stay aligned)."""
    if self._primary:
      self._tb.add_text(tag, "\n".join("    " + line for line in text.splitlines()), step)

  def close(self) -> None:
    if self._primary:
      self._tb.close()
      self._jsonl.close()


def parameter_table(params, labels) -> str:
  """Parameter counts per top-level subtree, trainable vs frozen."""
  rows = {}
  for (path, p), lab in zip(jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(labels)):
    row = rows.setdefault(path[0].key, {"trainable": 0, "frozen": 0})
    row[lab] += p.size
  lines = [f"{'subtree':<12}{'trainable':>14}{'frozen':>14}"]
  for name, row in list(rows.items()) + [("total", {k: sum(r[k] for r in rows.values())
                                                     for k in ("trainable", "frozen")})]:
    lines.append(f"{name:<12}{row['trainable']:>14,}{row['frozen']:>14,}")
  return "\n".join(lines)

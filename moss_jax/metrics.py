"""Training metrics: host-side aggregation between log points, and the three writers.

Every step returns sums (loss sums, token counts per task, ...) rather than means, so a log
interval's loss is the true token-weighted mean over all its steps. Only process 0 writes:
a console progress line, TensorBoard event files (tensorboardX) and `metrics.jsonl` in the
workdir, one JSON object per log point. The workdir may be a bucket (gs://): both files are
written through moss_jax.paths.
"""

from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from moss_jax import batch as batch_lib
from moss_jax import paths

# Per-step metrics summed over a log interval; everything else keeps its latest value, except
# grad_norm which is averaged over the steps that produced a finite one.
SUMMED = ("ce_sum", "z_loss_sum", "tokens", "correct", "task_ce_sum", "task_tokens",
          "task_correct", "audio_seconds", "input_tokens")


def summarize_stats(sums: Mapping[str, np.ndarray],
                    tasks: Sequence[str] = batch_lib.TASKS) -> dict[str, float]:
  """Token-weighted loss and accuracy, overall and per task, from summed step statistics."""
  tokens = max(float(sums["tokens"]), 1.0)
  out = {"loss": float(sums["ce_sum"]) / tokens, "accuracy": float(sums["correct"]) / tokens,
         "label_tokens": float(sums["tokens"])}
  for i, task in enumerate(tasks):
    n = float(sums["task_tokens"][i])
    if n > 0:
      out[f"loss/{task}"] = float(sums["task_ce_sum"][i]) / n
      out[f"accuracy/{task}"] = float(sums["task_correct"][i]) / n
  return out


class Accumulator:
  """Collects the device metric dicts of the steps since the last log point."""

  def __init__(self):
    self._pending: list[Mapping[str, Any]] = []
    self._t0 = time.perf_counter()

  def exclude(self, seconds: float) -> None:
    """Leaves time spent outside training (evaluation) out of the interval's throughput."""
    self._t0 += seconds

  def add(self, metrics: Mapping[str, Any]) -> None:
    self._pending.append(metrics)  # device arrays: fetched only at `summary` (no per-step sync)

  def __len__(self) -> int:
    return len(self._pending)

  def summary(self, tasks: Sequence[str] = batch_lib.TASKS) -> dict[str, float]:
    """Token-weighted losses, accuracy, per-task losses and throughput; resets the interval."""
    host = jax.device_get(self._pending)
    elapsed = time.perf_counter() - self._t0
    n = len(host)
    self._pending, self._t0 = [], time.perf_counter()
    if not n:
      return {}
    sums = {k: np.sum([np.asarray(m[k], np.float64) for m in host], axis=0)
            for k in SUMMED if k in host[0]}
    last = host[-1]
    tokens = max(float(sums["tokens"]), 1.0)
    out = summarize_stats(sums, tasks)
    out.update({
        "steps_in_interval": float(n),
        "interval_seconds": elapsed,
        "step_seconds": elapsed / n,
        "tokens_per_second": float(sums["input_tokens"]) / max(elapsed, 1e-9),
        "audio_seconds_per_second": float(sums["audio_seconds"]) / max(elapsed, 1e-9),
    })
    if "z_loss_sum" in sums:
      out["z_loss"] = float(sums["z_loss_sum"]) / tokens
    norms = [float(m["grad_norm"]) for m in host if math.isfinite(float(m["grad_norm"]))]
    out["grad_norm"] = float(np.mean(norms)) if norms else float("nan")
    for key in ("lr", "skipped_total", "consecutive_skipped"):
      if key in last:
        out[key] = float(last[key])
    return out


def format_eta(seconds: float) -> str:
  if not math.isfinite(seconds) or seconds < 0:
    return "?"
  seconds = int(round(seconds))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"


def progress_line(step: int, total: int, m: Mapping[str, float]) -> str:
  """The console line: step, loss, lr, throughput, MFU and ETA."""
  eta = (total - step) * m.get("step_seconds", float("nan"))
  parts = [
      f"step {step}/{total}",
      f"loss {m.get('loss', float('nan')):.4f}",
      f"acc {m.get('accuracy', float('nan')):.3f}",
      f"lr {m.get('lr', float('nan')):.3g}",
      f"gnorm {m.get('grad_norm', float('nan')):.3g}",
      f"tok/s {m.get('tokens_per_second', 0):.0f}",
      f"audio s/s {m.get('audio_seconds_per_second', 0):.1f}",
      f"mfu {100 * m.get('mfu', 0):.2f}%",
      f"eta {format_eta(eta)}",
  ]
  if m.get("skipped_total"):
    parts.append(f"skipped {int(m['skipped_total'])}")
  return " | ".join(parts)


def _jsonable(value):
  if isinstance(value, (np.floating, np.integer)):
    value = value.item()
  if isinstance(value, float) and not math.isfinite(value):
    return str(value)  # JSON has no NaN/inf; keep them visible as strings
  return value


def summary_writer_class():
  """tensorboardX's SummaryWriter, imported without importing torch.

  Imported on first use: only process 0 writes event files, and tensorboardX loads protobuf.
  Its writer module imports torch when torch is installed (the [torch] extra), only to accept
  torch tensors as values; that import is 1.5-2 s of every run's start-up, and we write floats.
  While tensorboardX loads, `sys.modules["torch"] = None` makes `import torch` fail (Python's
  documented way to block an import); torch stays importable afterwards.
  """
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    return SummaryWriter
  sys.modules["torch"] = None
  try:
    from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


class MetricWriter:
  """Writes scalars to the console, TensorBoard and JSONL (on process 0 only)."""

  def __init__(self, workdir: str, enabled: bool = True, tensorboard: bool = True,
               stream=None):
    self.enabled = enabled
    self._stream = stream or sys.stdout
    self._jsonl = None
    self._tb = None
    if not enabled:
      return
    self._jsonl = paths.AppendFile(paths.run_path(workdir) / "metrics.jsonl")
    if tensorboard:
      writer_class = summary_writer_class()  # before paths imports any of tensorboardX
      paths.register_tensorboard_schemes()
      self._tb = writer_class(logdir=paths.join(workdir, "tensorboard"))

  def console(self, line: str) -> None:
    if self.enabled:
      print(line, file=self._stream, flush=True)

  def write(self, step: int, split: str, scalars: Mapping[str, Any]) -> None:
    """One JSONL record {"step", "split", **scalars} and one TensorBoard scalar each."""
    if not self.enabled:
      return
    record = {"step": int(step), "split": split, "time": time.time()}
    record.update({k: _jsonable(v) for k, v in scalars.items()})
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None:
      for key, value in scalars.items():
        if isinstance(value, (int, float, np.floating, np.integer)):
          self._tb.add_scalar(f"{split}/{key}", float(value), int(step))
      self._tb.flush()

  def truncate_after(self, step: int) -> None:
    """Drops the JSONL records of steps after `step`: a run resumed there (after a kill) redoes
    them and writes them again, and a reader should see each step once."""
    if not self.enabled:
      return
    path = self._jsonl.path
    self._jsonl.flush()
    lines = path.read_text().splitlines(keepends=True) if path.exists() else []
    kept = []
    for line in lines:
      try:
        if int(json.loads(line)["step"]) > step:
          continue
      except (ValueError, KeyError, TypeError):
        continue  # a line cut short by the kill
      kept.append(line if line.endswith("\n") else line + "\n")
    if len(kept) == len(lines):
      return
    self._jsonl.close()
    if paths.is_uri(path):
      path.write_text("".join(kept))  # an object is replaced whole anyway
    else:
      tmp = path.parent / (path.name + ".tmp")  # no half-written file if killed now
      tmp.write_text("".join(kept))
      tmp.replace(path)
    self._jsonl = paths.AppendFile(path)

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None

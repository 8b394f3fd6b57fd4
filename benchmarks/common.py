"""The output format every benchmark shares: one JSON line per figure, beside its comparison.

A figure line is a JSON object with at least

  benchmark   the module's name (e.g. "train_step_vs_torch")
  figure      what was measured (e.g. "mid_jax_step_s")
  value, unit the measurement
  vs, vs_value  the comparison measured in the same run (a baseline, a peak, a reference)

plus any context the reader needs (shapes, load average, all samples). `benchmarks/run.py`
prints these lines unchanged, so a reader can grep one file for every figure.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _round(x: Any) -> Any:
  if isinstance(x, float):
    return round(x, 4) if abs(x) >= 1e-3 else x
  return x


def figure(benchmark: str, name: str, value: float, unit: str, vs: str, vs_value: float,
           **context: Any) -> dict:
  """One figure record (see the module docstring)."""
  rec = {"benchmark": benchmark, "figure": name, "value": _round(value), "unit": unit,
         "vs": vs, "vs_value": _round(vs_value)}
  rec.update({k: _round(v) for k, v in context.items()})
  return rec


def emit(record: dict, stream=None) -> None:
  """Prints a record as one JSON line and flushes (run.py reads the lines as they come)."""
  stream = stream or sys.stdout
  stream.write(json.dumps(record) + "\n")
  stream.flush()


def shape_list(parser, text: str, known) -> list[str]:
  """`--shapes a,b` -> ["a", "b"], every name checked before anything runs (a typo in the last
  shape used to surface only after the first shapes' minutes of work)."""
  shapes = [s for s in text.split(",") if s]
  unknown = [s for s in shapes if s not in known]
  if unknown or not shapes:
    parser.error(f"--shapes: unknown shape(s) {unknown or [text]}; choose from {sorted(known)}")
  return shapes


def run_main(main) -> None:
  """`sys.exit(main())` for a benchmark's `__main__`, with Ctrl-C as one line and exit 130.

  An interrupt can land while XLA compiles on its own threads; the interpreter's normal teardown
  would then free JAX's client under that compile (a segmentation fault), so the process ends
  the way `moss_jax` commands end after Ctrl-C (`cli.exit_without_teardown`).
  """
  try:
    code = main()
  except KeyboardInterrupt:
    from moss_jax import cli  # pylint: disable=import-outside-toplevel
    print("interrupted", file=sys.stderr, flush=True)
    cli.exit_without_teardown(130)
  sys.exit(code)

"""Runs every benchmark in benchmarks/ and prints one JSON line per figure.

    python -m benchmarks.run [--quick] [--only train_step_vs_torch,export] [--timeout 3600]

Convention (what makes a module a benchmark): a module `benchmarks/NAME.py` (not starting with
`_`, not `run`/`common`) that defines a top-level `main(argv)`, and should accept `--quick` (a
short smoke-sized run; a module whose source never mentions "--quick" runs in full, and its
lines say `"quick": false`). It is run as `python -m benchmarks.NAME [--quick]` in its own process (each
sets its own XLA flags and device count) and prints JSON on stdout: ideally one line per figure
made with `benchmarks.common.figure` (value beside the comparison measured in the same run).
Other JSON objects it prints (even indented ones) are passed on as one compact line each, tagged
with the benchmark's name; anything else on stdout goes to stderr. A benchmark that fails gives
one line {"benchmark": NAME, "error": ...} and the run exits 1 after the others finished.
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import subprocess
import sys
import time

from benchmarks import common

HERE = os.path.dirname(os.path.abspath(__file__))
NOT_BENCHMARKS = ("run", "common")


def discover() -> dict[str, bool]:
  """{module name: whether it accepts --quick} for modules in benchmarks/ with a top-level main()."""
  names = {}
  for fname in sorted(os.listdir(HERE)):
    name, ext = os.path.splitext(fname)
    if ext != ".py" or name.startswith("_") or name in NOT_BENCHMARKS:
      continue
    with open(os.path.join(HERE, fname), encoding="utf-8") as f:
      source = f.read()
    tree = ast.parse(source, fname)
    if any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body):
      names[name] = '"--quick"' in source
  return names


def json_values(text: str) -> tuple[list, list[str]]:
  """(every JSON object in `text`, in order, one-line or indented; the non-JSON lines)."""
  decoder = json.JSONDecoder()
  values, other, i = [], [], 0
  while i < len(text):
    if text[i].isspace():
      i += 1
      continue
    if text[i] == "{":
      try:
        value, end = decoder.raw_decode(text, i)
        values.append(value)
        i = end
        continue
      except json.JSONDecodeError:
        pass
    end = text.find("\n", i)
    end = len(text) if end < 0 else end
    other.append(text[i:end])
    i = end
  return values, other


def run_one(name: str, quick: bool, timeout: float) -> tuple[list[dict], bool]:
  cmd = [sys.executable, "-m", f"benchmarks.{name}"] + (["--quick"] if quick else [])
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [common.REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  start = time.perf_counter()
  try:
    out = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True,
                         timeout=timeout, check=False)
  except subprocess.TimeoutExpired:
    return [{"benchmark": name, "error": f"timed out after {timeout:.0f} s"}], False
  values, other = json_values(out.stdout)
  for line in other:
    print(f"[{name}] {line}", file=sys.stderr)
  records = []
  for v in values:
    if isinstance(v, dict):
      v.setdefault("benchmark", name)
      records.append(v)
  if out.returncode != 0:
    tail = out.stderr.strip().splitlines()[-5:]
    records.append({"benchmark": name, "error": f"exit {out.returncode}", "stderr_tail": tail})
  records.append({"benchmark": name, "figure": "wall_s",
                  "value": round(time.perf_counter() - start, 1), "unit": "s",
                  "quick": quick})
  return records, out.returncode == 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="pass --quick to every benchmark")
  parser.add_argument("--only", default="", help="comma-separated module names")
  parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per benchmark")
  args = parser.parse_args(argv)
  benchmarks = discover()
  names = list(benchmarks)
  if args.only:
    wanted = args.only.split(",")
    unknown = sorted(set(wanted) - set(names))
    if unknown:
      print(f"error: no benchmark named {', '.join(unknown)} (have {', '.join(names)})",
            file=sys.stderr)
      return 2
    names = [n for n in names if n in wanted]
  ok = True
  for name in names:
    records, good = run_one(name, args.quick and benchmarks[name], args.timeout)
    ok &= good
    for rec in records:
      common.emit(rec)
  return 0 if ok else 1


if __name__ == "__main__":
  common.run_main(main)

"""Wall time of the README's main command, the demo, from a cold and from a warm compile cache.

    python -m benchmarks.demo_wall [--quick] [--rounds 1] [--keep DIR]

Runs `python -m moss_jax.train --config configs/pretrain.py:demo --workdir NEW_DIR` as a new
user would, in a fresh process each time: first with an empty compilation cache
(MOSS_JAX_CACHE_DIR pointed at a new directory: every program compiles, as on a first run), then
again in another new workdir with that cache filled (what every later run of the demo, or of any
program already compiled on the machine, costs). Each output line is timestamped, so the figures
split the wall time into the start (until the `parameters:` line, which follows the parameter
init and the train step's compile), the time to step 10, and the whole run. `--quick` trains 20
steps (evaluation at step 10) instead of 200. The demo's workdirs and cache are deleted afterwards
unless `--keep` names a directory for them.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time

from benchmarks import common

NAME = "demo_wall"


def run_demo(workdir: str, cache_dir: str, extra: list[str]) -> dict[str, float]:
  """One demo run -> {"wall", "start", "step10"} in seconds (NaN where a line never came)."""
  env = dict(os.environ, MOSS_JAX_CACHE_DIR=cache_dir, PYTHONUNBUFFERED="1")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)  # the demo's own default cache, as a user gets it
  cmd = [sys.executable, "-m", "moss_jax.train", "--config", "configs/pretrain.py:demo",
         "--workdir", workdir, *extra]
  marks = {"start": float("nan"), "step10": float("nan")}
  t0 = time.perf_counter()
  with subprocess.Popen(cmd, cwd=common.REPO, env=env, stdout=subprocess.PIPE,
                        stderr=subprocess.STDOUT, text=True) as proc:
    tail = []
    for line in proc.stdout:
      now = time.perf_counter() - t0
      tail = (tail + [line])[-20:]
      if line.startswith("parameters:") and math.isnan(marks["start"]):
        marks["start"] = now
      if line.startswith("step 10/"):
        marks["step10"] = now
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    raise RuntimeError(f"demo run failed (rc {proc.returncode}):\n{''.join(tail)}")
  return {"wall": wall, **marks}


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="20 steps instead of the demo's 200")
  ap.add_argument("--rounds", type=int, default=1, help="cold + warm pairs")
  ap.add_argument("--keep", default="", help="directory for the workdirs and cache (kept)")
  args = ap.parse_args(argv)
  extra = (["--config.train.steps=20", "--config.optim.warmup_steps=2",
            "--config.train.eval_every=10"] if args.quick else [])
  root = args.keep or tempfile.mkdtemp(prefix="moss_jax_demo_wall_")
  os.makedirs(root, exist_ok=True)
  try:
    for r in range(args.rounds):
      cache = os.path.join(root, f"cache_{r}")
      shutil.rmtree(cache, ignore_errors=True)
      cold = run_demo(os.path.join(root, f"cold_{r}"), cache, extra)
      warm = run_demo(os.path.join(root, f"warm_{r}"), cache, extra)
      context = dict(round=r, quick=args.quick, load=os.getloadavg()[0],
                     cpus=os.cpu_count(), command="python -m moss_jax.train --config "
                     "configs/pretrain.py:demo --workdir NEW_DIR" + "".join(f" {e}" for e in extra))
      for key, what in (("wall", "whole run"), ("start", "until the parameters: line"),
                        ("step10", "until step 10")):
        common.emit(common.figure(NAME, f"warm_cache_{key}_s", warm[key], "s",
                                  f"cold cache, {what}", cold[key], **context))
  finally:
    if not args.keep:
      shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  common.run_main(main)

"""Config variants of one train step, in one process, their steps interleaved: paired timings.

    python -m benchmarks.step_variants [--shape mid|demo] [--steps 12]
        [--variants "conv:model.audio.conv_stem_impl=conv;b:model.audio.conv_stem_impl=..."]
        [--quick]

For settings whose effect is a few percent, which separate processes on a shared machine cannot
resolve (`train_step_vs_torch --variants` alternates processes: its samples spread by 30%). Every
variant of the `train_step_vs_torch` shape is compiled in this process, then the variants take
turns, one step each, `--steps` times, so neighbouring steps see the same machine load. Prints
per variant the median wall and CPU (process) time of a step and, against the first variant,
the median of the paired wall-time ratios and how many pairs it won.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchmarks import common
from benchmarks import train_step_vs_torch as vs_torch

DEFAULT_VARIANTS = ("conv:model.audio.conv_stem_impl=conv;"
                    "conv_matmul_bwd:model.audio.conv_stem_impl=conv_matmul_bwd")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="mid", choices=vs_torch.SHAPES)
  parser.add_argument("--steps", type=int, default=12, help="timed steps per variant")
  parser.add_argument("--variants", default=DEFAULT_VARIANTS,
                      help="';'-separated NAME[:KEY=VALUE,...]; the first is the baseline")
  parser.add_argument("--quick", action="store_true", help="the demo shape, 3 steps each")
  args = parser.parse_args(argv)
  if args.quick:
    args.shape, args.steps = "demo", 3
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, common.REPO)
  variants, configs = vs_torch.checked_configs(parser, [args.shape], args.variants)
  from moss_jax import host_memory
  host_memory.retain_freed_memory_on_cpu()

  runs = {name: {"step": vs_torch.JaxStep(configs[args.shape, name]), "wall": [], "cpu": [],
                 "overrides": overrides} for name, overrides in variants.items()}
  for _ in range(args.steps):
    for run in runs.values():
      wall, cpu = time.perf_counter(), time.process_time()
      run["step"].run()
      run["wall"].append(time.perf_counter() - wall)
      run["cpu"].append(time.process_time() - cpu)
  base_name = next(iter(runs))
  base = runs[base_name]
  for name, run in runs.items():
    ratios = [b / r for b, r in zip(base["wall"], run["wall"])]
    common.emit(common.figure(
        "step_variants", f"{args.shape}_{name}_step_s", statistics.median(run["wall"]), "s",
        f"{base_name}_step_s", statistics.median(base["wall"]),
        paired_speedup_median=statistics.median(ratios),
        pairs_won=sum(r > 1 for r in ratios), pairs=len(ratios),
        cpu_s=statistics.median(run["cpu"]), vs_cpu_s=statistics.median(base["cpu"]),
        overrides=run["overrides"], wall_s_all=run["wall"], loadavg_1m=os.getloadavg()[0]))
  return 0


if __name__ == "__main__":
  common.run_main(main)

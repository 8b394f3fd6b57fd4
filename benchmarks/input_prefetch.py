"""Training-loop step time with and without device prefetching, side by side.

    python benchmarks/input_prefetch.py [--models demo,mid] [--rounds 3] [--steps 6] [--devices 8]

Runs the loop exactly as moss_jax/train.py does (the real Grain pipeline on the shipped sample
corpus -> placement on the devices -> the jitted train step, metrics read one step late) for:
  place_in_loop   train.prefetch_to_device=0: the batch is encoded and placed between steps
  prefetch        train.prefetch_to_device=2: a thread places the next batches during the step
  prefetch_int16  as prefetch, with data.waveform_transfer=int16 (waveform configs only)
for the demo config and the mid-size model of benchmarks/train_step.py (host mel). The variants
alternate round by round (this machine is shared, its load drifts), and the figure of each is the
median over rounds of that round's mean step time. The load average is printed beside them.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def model_config(name: str):
  sys.path.insert(0, REPO)
  sys.path.insert(0, os.path.join(REPO, "benchmarks"))
  from configs import pretrain
  if name == "demo":
    c = pretrain.get_config("demo")
  elif name == "mid":
    from train_step import mid_config  # pylint: disable=import-outside-toplevel  # sibling script
    c = mid_config("full", (1, -1, 1), 1)
    demo = pretrain.get_config("demo")
    c.data.update(train_manifests=demo.data.train_manifests, tokenizer=demo.data.tokenizer)
    c.model.text.vocab_size = max(c.model.text.vocab_size, demo.model.text.vocab_size)
  else:
    raise SystemExit(f"unknown model {name!r}: demo or mid")
  c.train.steps = 10_000
  return c


def run_variant(prog, state, config, prefetch: int, steps: int):
  """(state, mean seconds per step over `steps` steps after 2 warm-up steps)."""
  from data_pipelines.loader import ShardedLoader
  from moss_jax import train_step as ts
  loader = ts.DevicePrefetch(ShardedLoader(config, 0, 1), prog.global_batch, prefetch)
  pending = None
  try:
    for i in range(steps + 2):
      if i == 2:
        t0 = time.perf_counter()
      state, m = prog.step(state, next(loader))
      if pending is not None:
        int(pending["consecutive_skipped"])  # the loop's one-step-late read
      pending = m
    int(pending["consecutive_skipped"])
    return state, (time.perf_counter() - t0) / steps
  finally:
    loader.close()


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--models", default="demo,mid")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
  parser.add_argument("--devices", type=int, default=8, help="forced host CPU devices")
  args = parser.parse_args(argv)
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from moss_jax import sharding
  from moss_jax import train_step as ts

  results = []
  for name in args.models.split(","):
    base = model_config(name)
    variants = {"place_in_loop": ("float32", 0), "prefetch": ("float32", 2)}
    if base.data.feature_mode == "waveform":
      variants["prefetch_int16"] = ("int16", 2)
    mesh = sharding.make_mesh(base.mesh)
    progs, configs = {}, {}
    for v, (form, _) in variants.items():
      c = model_config(name)
      c.data.waveform_transfer = form
      configs[v] = c
      progs[v] = progs.get(form) or ts.build_program(c, mesh)
      progs[form] = progs[v]
    state = progs["prefetch"].init_state(jax.random.key(0))
    per_round = {v: [] for v in variants}
    load = [os.getloadavg()[0]]
    for r in range(args.rounds):
      order = list(variants) if r % 2 == 0 else list(variants)[::-1]
      for v in order:
        state, sec = run_variant(progs[v], state, configs[v], variants[v][1], args.steps)
        per_round[v].append(sec)
      load.append(os.getloadavg()[0])
    shapes = ts.transfer_shapes(base)
    row = {"model": name, "feature_mode": base.data.feature_mode,
           "batch": f"{base.data.batch_size} x {base.data.max_tokens} tokens, "
                    f"{base.data.max_audio_chunks} chunks",
           "load_average_1min": [round(x, 1) for x in load]}
    for v in variants:
      row[f"{v}_step_s_median"] = round(statistics.median(per_round[v]), 4)
      row[f"{v}_step_s_rounds"] = [round(x, 4) for x in per_round[v]]
    wave = shapes.get("audio_waveform")
    if wave is not None:
      n = 1
      for d in wave[0]:
        n *= d
      row["waveform_bytes_per_batch"] = {"float32": 4 * n, "int16": 2 * n}
    row["speedup_prefetch"] = round(row["place_in_loop_step_s_median"] /
                                    row["prefetch_step_s_median"], 3)
    results.append(row)
    print(json.dumps(row, indent=2), flush=True)
  print("\nmodel  " + "  ".join(f"{v:>16}" for v in ("place_in_loop", "prefetch", "prefetch_int16"))
        + "   (median s/step)")
  for row in results:
    cells = [f"{row.get(f'{v}_step_s_median', float('nan')):>16.4f}"
             for v in ("place_in_loop", "prefetch", "prefetch_int16")]
    print(f"{row['model']:<6} " + "  ".join(cells))
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Export speed and peak memory of `python -m moss_jax.export` on a >1 GB model, beside raw writes.

    python benchmarks/export.py [--dir /tmp] [--dtype bfloat16] [--keep]

Builds a mid-size model (~640 M parameters: a 2.5 GB float32 checkpoint, 1.3 GB in bfloat16)
from abstract shapes with random weights, saves it as a training run's Orbax checkpoint, then
exports it in a fresh process and prints one JSON object:
  export MB/s (output bytes / wall time, fsync included), the same machine's raw sequential write
  speed for the same number of bytes (64 MB blocks + fsync) measured in the same run, their
  ratio, the export process's peak RSS, its Python/JAX baseline (RSS after the imports) and the
  model's size (the bytes written). Goals: ratio >= 0.5 and peak RSS < baseline + model size / 2.
  The export is CPU-bound (decompressing the Orbax chunks, casting, transposing) where the raw
  write is not, so its CPU seconds (MB per CPU second: its speed with one core of its own) and the
  machine's load average are printed too: on a shared machine the wall-clock ratio says more
  about the other processes than about the export.
The files (about 5 GB in all) are deleted at the end unless --keep.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Run in the export's own process: RSS after the imports (the baseline), then the peak. VmHWM,
# not ru_maxrss: Linux carries ru_maxrss over fork + exec from the parent.
_CHILD = """
import json, sys, time
sys.path.insert(0, {repo!r})
from moss_jax import export

def hwm_kb():
  for line in open("/proc/self/status"):
    if line.startswith("VmHWM:"):
      return int(line.split()[1])

def cpu_seconds():
  import resource
  u = resource.getrusage(resource.RUSAGE_SELF)
  return u.ru_utime + u.ru_stime

base, cpu = hwm_kb(), cpu_seconds()
t = time.perf_counter()
r = export.export_run({workdir!r}, {out!r}, dtype={dtype!r}, show_progress=False)
print(json.dumps(dict(seconds=time.perf_counter() - t, bytes=r.tensor_bytes, files=len(r.files),
                      baseline_kb=base, peak_kb=hwm_kb(), cpu_seconds=cpu_seconds() - cpu)))
"""


def mid_config():
  sys.path.insert(0, REPO)
  from configs import pretrain
  c = pretrain.get_config("4b")
  a, t = c.model.audio, c.model.text
  a.update(d_model=768, encoder_layers=12, encoder_attention_heads=12, encoder_ffn_dim=3072,
           downsample_hidden_size=256, deepstack_encoder_layer_indexes=(3, 6, 9))
  t.update(vocab_size=64000, hidden_size=1536, intermediate_size=4096, num_hidden_layers=12,
           num_attention_heads=12, num_key_value_heads=4, head_dim=128)
  c.model.adapter_hidden_size = 4096
  c.data.tokenizer.path = ""
  return c


def make_run(workdir: str) -> int:
  """A run directory with one checkpoint of random float32 weights; returns the parameter count."""
  import jax
  import jax.numpy as jnp
  from moss_jax import checkpoint, sharding
  from moss_jax import train_step as ts
  from moss_jax.train import write_config
  config = mid_config()
  rng = np.random.default_rng(0)
  # Sharded over 8 devices as a training run saves it (fsdp): Orbax writes a chunk per shard.
  mesh = sharding.make_mesh(config.mesh)
  params = jax.tree.map(
      lambda a: jax.device_put(rng.standard_normal(a.shape, np.float32) * 0.02, a.sharding),
      ts.abstract_params_with_shardings(config.model, mesh))
  n = sum(int(x.size) for x in jax.tree.leaves(params))
  write_config(config, workdir)
  ckpt = checkpoint.Checkpointer(os.path.join(workdir, "checkpoints"), every=1, async_save=False)
  state = {"step": jnp.asarray(1, jnp.int32), "params": params, "frozen": {}}
  ckpt.save(1, state, {}, config.to_dict(), force=True)
  ckpt.close()
  return n


def raw_write_mb_s(path: str, nbytes: int) -> float:
  """Sequential write of `nbytes` in 64 MB blocks, fsync included (what the export pays too)."""
  block = np.random.default_rng(1).integers(0, 255, 64 << 20, dtype=np.uint8).tobytes()
  t = time.perf_counter()
  with open(path, "wb") as f:
    left = nbytes
    while left > 0:
      f.write(block[:min(left, len(block))])
      left -= len(block)
    f.flush()
    os.fsync(f.fileno())
  seconds = time.perf_counter() - t
  os.remove(path)
  return nbytes / 1e6 / seconds


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dir", default=tempfile.gettempdir(), help="where the files go")
  parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
  parser.add_argument("--keep", action="store_true", help="keep the run and export")
  parser.add_argument("--make_run", help=argparse.SUPPRESS)  # internal: write the run only
  args = parser.parse_args(argv)
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  if args.make_run:
    print(make_run(args.make_run))
    return 0
  root = tempfile.mkdtemp(prefix="moss_jax_export_bench_", dir=args.dir)
  try:
    workdir, out = os.path.join(root, "run"), os.path.join(root, "hf")
    t = time.perf_counter()
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    # In a process of its own, so this one stays small while the export runs.
    made = subprocess.run([sys.executable, os.path.abspath(__file__), "--make_run", workdir],
                          env=dict(env, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
                          capture_output=True, text=True, check=False)
    if made.returncode:
      print(made.stderr[-4000:], file=sys.stderr)
      return 1
    n_params = int(made.stdout.strip().splitlines()[-1])
    make_seconds = time.perf_counter() - t
    child = subprocess.run([sys.executable, "-c", _CHILD.format(
        repo=REPO, workdir=workdir, out=out, dtype=args.dtype)], env=env, capture_output=True,
        text=True, check=False)
    if child.returncode:
      print(child.stderr[-4000:], file=sys.stderr)
      return 1
    r = json.loads(child.stdout.strip().splitlines()[-1])
    raw = raw_write_mb_s(os.path.join(root, "raw.bin"), r["bytes"])
    export_mb_s = r["bytes"] / 1e6 / r["seconds"]
    model_mb = r["bytes"] / 1e6
    baseline_mb, peak_mb = r["baseline_kb"] / 1e3, r["peak_kb"] / 1e3
    print(json.dumps(dict(
        params=n_params, dtype=args.dtype, model_mb=round(model_mb, 1),
        checkpoint_float32_mb=round(n_params * 4 / 1e6, 1), weight_files=r["files"],
        export_seconds=round(r["seconds"], 2), export_mb_s=round(export_mb_s, 1),
        export_cpu_seconds=round(r["cpu_seconds"], 1),
        export_mb_per_cpu_second=round(r["bytes"] / 1e6 / r["cpu_seconds"], 1),
        load_average_1min=round(os.getloadavg()[0], 1), cpu_cores=os.cpu_count(),
        raw_write_mb_s=round(raw, 1), ratio_to_raw=round(export_mb_s / raw, 3),
        peak_rss_mb=round(peak_mb, 1), baseline_rss_mb=round(baseline_mb, 1),
        rss_above_baseline_mb=round(peak_mb - baseline_mb, 1),
        rss_goal_mb=round(baseline_mb + model_mb / 2, 1),
        goals_met=dict(speed=export_mb_s >= 0.5 * raw, memory=peak_mb < baseline_mb + model_mb / 2),
        make_run_seconds=round(make_seconds, 1)), indent=2))
  finally:
    if args.keep:
      print(f"kept {root}", file=sys.stderr)
    else:
      shutil.rmtree(root, ignore_errors=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())

"""Train-step time and MFU of a mid-size model on the CPU mesh, beside this machine's matmul peak.

    python benchmarks/train_step.py [--devices 8] [--mesh 1,-1,1] [--steps 5] [--stage full]

Prints one JSON object: the median step time, tokens/s, the analytic FLOPs of a step
(moss_jax/flops.py), the achieved FLOP/s, the peak of an
f32 matmul measured in the same process (the figure MFU is relative to), and MFU.
The batch is synthetic (no corpus), so only the model and the step are measured.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def mid_config(stage: str, mesh: tuple[int, ...], grad_accum: int):
  """~12 M parameters, ~120 GFLOP a step: matmuls dominate, yet a 2-core CPU steps in seconds."""
  sys.path.insert(0, REPO)
  from configs import pretrain
  c = pretrain.get_config("demo")
  a, t = c.model.audio, c.model.text
  a.update(d_model=256, encoder_layers=4, encoder_attention_heads=4, encoder_ffn_dim=1024,
           downsample_hidden_size=32, deepstack_encoder_layer_indexes=(1, 2))
  t.update(vocab_size=2048, hidden_size=384, intermediate_size=1024, num_hidden_layers=4,
           num_attention_heads=6, num_key_value_heads=2, head_dim=64)
  c.model.adapter_hidden_size = 768
  c.data.update(batch_size=8, max_tokens=256, max_audio_chunks=2, feature_mode="mel")
  c.train.update(stage=stage, grad_accum=grad_accum, steps=1000)
  c.mesh.shape = mesh
  return c


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--devices", type=int, default=8, help="forced host CPU devices")
  parser.add_argument("--mesh", default="1,-1,1", help="data,fsdp,tensor")
  parser.add_argument("--steps", type=int, default=3, help="timed steps (after one warm-up)")
  parser.add_argument("--stage", default="full", choices=("full", "adapter", "encoder_frozen"))
  parser.add_argument("--grad_accum", type=int, default=1)
  parser.add_argument("--quick", action="store_true", help="1 timed step (a smoke run)")
  args = parser.parse_args(argv)
  if args.quick:
    args.steps = 1
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             f" --xla_force_host_platform_device_count={args.devices}").strip()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

  import jax
  from moss_jax import flops, host_memory, sharding
  from moss_jax import train_step as ts
  from moss_jax.model import count_params

  host_memory.retain_freed_memory_on_cpu()  # as `moss_jax.train` does
  mesh_shape = tuple(int(x) for x in args.mesh.split(","))
  config = mid_config(args.stage, mesh_shape, args.grad_accum)
  mesh = sharding.make_mesh(config.mesh)
  prog = ts.build_program(config, mesh)
  state = prog.init_state(jax.random.key(0))
  batch = prog.global_batch(ts.synthetic_batch(config, seed=0))

  t0 = time.perf_counter()
  compiled = prog.train_step.lower(prog.abstract_state, prog.abstract_batch).compile()
  compile_s = time.perf_counter() - t0

  times = []
  with sharding.use_mesh(mesh):
    state, m = compiled(state, batch)  # warm-up
    jax.block_until_ready(m)
    for _ in range(args.steps):
      t0 = time.perf_counter()
      state, m = compiled(state, batch)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)

  analytic = flops.step_flops(config.model, config.data.batch_size, config.data.max_tokens,
                              config.data.max_audio_chunks, args.stage)["total"]
  peak = flops.measure_matmul_peak(n=1024)
  tokens = float(jax.device_get(m["input_tokens"]))
  print(json.dumps({
      "benchmark": "train_step",
      "device": f"{jax.devices()[0].platform} x {jax.device_count()} (mesh {dict(mesh.shape)})",
      "stage": args.stage,
      "params": count_params(state["params"]) + count_params(state["frozen"]),
      "batch": {"rows": config.data.batch_size, "tokens_per_row": config.data.max_tokens,
                "audio_chunks_per_row": config.data.max_audio_chunks},
      "compile_s": round(compile_s, 2),
      "step_s_median": round(step_s, 4),
      "step_s_all": [round(t, 4) for t in times],
      "tokens_per_s": round(tokens / step_s, 1),
      "analytic_gflop_per_step": round(analytic / 1e9, 3),
      "achieved_gflop_per_s": round(analytic / step_s / 1e9, 2),
      "matmul_peak_gflop_per_s_f32_measured": round(peak / 1e9, 2),
      "mfu": round(flops.mfu(analytic, step_s, peak), 4),
      "loss": float(jax.device_get(m["loss"])),
  }, indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())

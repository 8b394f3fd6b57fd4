"""The audio encoder's conv stem, forward + backward, in each `model.audio.conv_stem_impl`.

    python -m benchmarks.conv_stem [--shapes demo,mid] [--rounds 5] [--calls 5] [--quick]

Runs the real stem (`AudioEncoder.stem`: three 3x3 stride-2 convolutions with GELU, then the
projection) of the demo model (16 channels, 32 chunk slots: 8 rows x 4 chunks) and of the
`train_step_vs_torch` mid shape (64 channels, 16 chunk slots) on one device: value and gradient
with respect to the parameters (training never differentiates the mel). The implementations
alternate call by call within one process, so both see the same machine load; the figure is
each one's median, beside `conv` (XLA's own convolution gradients), with the largest gradient
difference from it.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from benchmarks import common

SHAPES = {"demo": (32, 16), "mid": (16, 64)}  # chunk slots, stem channels
IMPLS = ("conv", "conv_matmul_bwd")


def stem_grad_fn(impl: str, channels: int):
  """jit(value_and_grad) of the stem's mean square with respect to the params, and the params."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  from configs import pretrain
  from moss_jax.model import encoder

  class StemOnly(encoder.AudioEncoder):
    @nn.compact
    def __call__(self, mel):
      return self.stem(mel)

  cfg = pretrain.get_config("demo").model.audio
  cfg.downsample_hidden_size = channels
  cfg.conv_stem_impl = impl
  module = StemOnly(cfg)
  params = module.init(jax.random.key(0), jnp.zeros((1, 128, 400), jnp.float32))["params"]

  def loss(p, m):
    return jnp.mean(jnp.square(module.apply({"params": p}, m)))

  return jax.jit(jax.value_and_grad(loss)), params


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shapes", default="demo,mid")
  parser.add_argument("--rounds", type=int, default=5)
  parser.add_argument("--calls", type=int, default=5, help="timed calls per implementation a round")
  parser.add_argument("--quick", action="store_true", help="2 rounds of 2 calls")
  args = parser.parse_args(argv)
  shapes = common.shape_list(parser, args.shapes, SHAPES)
  if args.quick:
    args.rounds, args.calls = 2, 2
  sys.path.insert(0, common.REPO)
  from moss_jax import host_memory
  host_memory.retain_freed_memory_on_cpu()
  import jax
  import numpy as np

  for shape in shapes:
    chunks, channels = SHAPES[shape]
    mel = np.random.default_rng(0).normal(size=(chunks, 128, 400)).astype(np.float32)
    fns, grads, times = {}, {}, {impl: [] for impl in IMPLS}
    for impl in IMPLS:
      fn, params = stem_grad_fn(impl, channels)
      fns[impl] = (fn, params)
      grads[impl] = jax.block_until_ready(fn(params, mel))
    for _ in range(args.rounds):
      for impl, (fn, params) in fns.items():
        start = time.perf_counter()
        for _ in range(args.calls):
          jax.block_until_ready(fn(params, mel))
        times[impl].append((time.perf_counter() - start) / args.calls)
    base = statistics.median(times["conv"])
    for impl in IMPLS:
      diff = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                 for a, b in zip(jax.tree.leaves(grads[impl]), jax.tree.leaves(grads["conv"])))
      value = statistics.median(times[impl])
      common.emit(common.figure(
          "conv_stem", f"{shape}_{impl}_fwd_bwd_s", value, "s", "conv_fwd_bwd_s", base,
          speedup_vs_conv=base / value, chunks=chunks, channels=channels,
          max_abs_grad_diff_vs_conv=diff, samples_s=times[impl], loadavg_1m=os.getloadavg()[0]))
  return 0


if __name__ == "__main__":
  common.run_main(main)

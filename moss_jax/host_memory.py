"""Keep freed host memory for reuse when XLA runs on the CPU: no page faults on every step.

XLA:CPU allocates each execution's temporary buffer (1.3 GB for the benchmark's mid shape) with
malloc and frees it when the step ends. glibc serves an allocation that large with a fresh mmap
from a thread's arena, so every step faults in (and the kernel zeroes) every page again: about
336,000 minor faults and 1.1 s of system CPU per step of the benchmark's mid shape on a 2-core
machine, ~13% of its wall time (docs/training.md, "Benchmarks", has the figures).

`retain_freed_memory()` tells glibc to serve every allocation from the main heap (one arena, no
mmap) and never to trim it, so the next step's buffers land on pages already mapped. The price:
the process keeps its peak heap for its lifetime (the steps reuse it), and all threads share one
malloc arena. That trade suits a CPU training process; on TPU/GPU hosts the step's memory lives
on the accelerator, so `train` applies this only when JAX will run on the CPU
(`expects_cpu_backend`). It must run before JAX starts its backend: threads that allocated
before keep their own arenas. Set MOSS_JAX_HOST_MALLOC=default to leave malloc alone.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os

from absl import logging

# mallopt parameters (glibc's malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

# Packages whose presence makes JAX pick an accelerator when JAX_PLATFORMS is unset.
_ACCELERATOR_PLUGINS = ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin",
                        "jax_rocm7_plugin")


def expects_cpu_backend(platforms: str | None = None) -> bool:
  """True when JAX will run on the CPU: `platforms` (default: JAX_PLATFORMS, jax.config) starts
  with cpu, or, unset, no TPU/GPU plugin is installed. Does not start a backend."""
  if platforms is None:
    import jax  # pylint: disable=import-outside-toplevel
    platforms = jax.config.jax_platforms
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  return not any(importlib.util.find_spec(name) for name in _ACCELERATOR_PLUGINS)


def retain_freed_memory() -> bool:
  """Sets glibc's malloc to one arena, no mmap, no trimming. True when applied.

  Does nothing (and returns False) off glibc, or with MOSS_JAX_HOST_MALLOC=default.
  """
  if os.environ.get("MOSS_JAX_HOST_MALLOC", "") == "default":
    return False
  try:
    libc = ctypes.CDLL("libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
  done = all(mallopt(param, value) == 1 for param, value in (
      (_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1)))
  if not done:
    logging.warning("host_memory: glibc refused a mallopt setting; malloc left as it was")
  return done


def retain_freed_memory_on_cpu() -> bool:
  """`retain_freed_memory()` when JAX will run on the CPU; True when applied."""
  return expects_cpu_backend() and retain_freed_memory()

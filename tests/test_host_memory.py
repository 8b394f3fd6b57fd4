"""moss_jax.host_memory: freed host memory is reused without page faults (glibc only)."""

import os
import platform
import subprocess
import sys

import pytest

from moss_jax import host_memory

# A child process allocating and freeing a 64 MiB buffer (the way XLA:CPU's per-step temporary
# buffer behaves), printing the minor page faults of the last rounds.
_CHILD = """
import ctypes, resource, sys
from moss_jax import host_memory
applied = host_memory.retain_freed_memory() if sys.argv[1] == "retain" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, (ctypes.c_size_t,)
libc.free.argtypes = (ctypes.c_void_p,)
faults = []
for i in range(6):
  before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  buf = libc.malloc(64 << 20)
  ctypes.memset(buf, 1, 64 << 20)
  libc.free(buf)
  faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(applied, sum(faults[2:]))
"""

glibc_only = pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc",
                                reason="mallopt is glibc's")


def _faults(mode: str) -> tuple[str, int]:
  env = dict(os.environ)
  env.pop("MOSS_JAX_HOST_MALLOC", None)
  out = subprocess.run([sys.executable, "-c", _CHILD, mode], capture_output=True, text=True,
                       check=True, env=env).stdout.split()
  return out[0], int(out[1])


@glibc_only
def test_retained_memory_is_reused_without_page_faults():
  applied, retained = _faults("retain")
  assert applied == "True"
  _, default = _faults("default")
  pages = (64 << 20) // 4096
  # glibc's default mmaps a buffer this large afresh each time: every page faults again.
  assert default >= 3 * pages
  assert retained < pages // 10


def test_expects_cpu_backend_follows_jax_platforms():
  assert host_memory.expects_cpu_backend("cpu")
  assert not host_memory.expects_cpu_backend("tpu,cpu")
  assert not host_memory.expects_cpu_backend("cuda")


def test_opt_out_leaves_malloc_alone(monkeypatch):
  monkeypatch.setenv("MOSS_JAX_HOST_MALLOC", "default")
  assert host_memory.retain_freed_memory() is False

"""The shared command-line layer: rate-limited warnings (one per bad record would flood a log)."""

from __future__ import annotations

import logging

from moss_jax import cli


def test_repeated_warnings_are_rate_limited_per_kind(caplog):
  w = cli.LimitedWarnings(first=2, every=5)
  with caplog.at_level(logging.WARNING):
    for i in range(12):
      w.warn("too_long", "skipping record %d", i)
    w.warn("missing_file", "skipping record %s", "x")
  assert [r.getMessage() for r in caplog.records] == [
      "skipping record 0", "skipping record 1",
      "(further 'too_long' warnings are shown once every 5)",
      "skipping record 4 [5 so far]", "skipping record 9 [10 so far]",
      "skipping record x"]
  assert w.counts == {"too_long": 12, "missing_file": 1}


_COMPILING_WHEN_INTERRUPTED = r'''
import sys, threading
import jax, jax.numpy as jnp
from moss_jax import cli

def many_ops(x):  # ~1,500 distinct ops: XLA:CPU needs seconds to compile it
  for i in range(1500):
    x = jnp.sin(x * (i + 1.0)) + x[::-1]
  return x

def main(argv):
  started = threading.Event()
  def compile_it():
    started.set()
    jax.jit(many_ops).lower(jnp.ones(1024)).compile()
  threading.Thread(target=compile_it, daemon=True).start()
  started.wait()
  raise KeyboardInterrupt  # what Ctrl-C does to the main thread while XLA compiles

cli.run(main)
'''


def test_ctrl_c_while_xla_compiles_exits_130_without_a_crash(tmp_path):
  """The interpreter's teardown under an unfinished compile crashed (SIGSEGV) after Ctrl-C;
  cli.run ends the process without it."""
  import os
  import subprocess
  import sys
  script = tmp_path / "interrupted.py"
  script.write_text(_COMPILING_WHEN_INTERRUPTED)
  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=repo, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="0")
  for _ in range(2):
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == "interrupted", proc.stderr[-3000:]
    assert "Fatal Python error" not in proc.stderr

"""The watchdog, the step profiler and the compilation-cache default (moss_jax/diagnostics.py)."""

from __future__ import annotations

import os
import threading
import time

import jax
import jax.numpy as jnp
import pytest

from moss_jax import diagnostics


def _stuck_in_a_collective(release: threading.Event) -> None:
  release.wait(30)


def test_watchdog_logs_every_thread_when_a_step_stalls():
  messages = []
  dog = diagnostics.Watchdog(factor=5.0, min_seconds=0.2, min_intervals=3, poll_seconds=0.05,
                             log=lambda msg, *args: messages.append(msg % args))
  release = threading.Event()
  worker = threading.Thread(target=_stuck_in_a_collective, args=(release,), name="data_worker")
  worker.start()
  try:
    for step in range(1, 7):  # steady 20 ms steps
      dog.beat(step)
      time.sleep(0.02)
    assert not messages and dog.limit() == pytest.approx(0.2)
    time.sleep(0.6)  # step 7 stalls
    assert len(messages) == 1, messages  # reported once per stall
    report = messages[0]
    assert "step 7 has taken" in report
    assert "data_worker" in report and "_stuck_in_a_collective" in report
    assert "MainThread" in report
    dog.beat(7)
    with dog.paused():  # evaluation: not a step
      time.sleep(0.4)
    assert len(messages) == 1
  finally:
    release.set()
    worker.join()
    dog.close()


def test_profiler_writes_a_trace_tensorboard_reads(tmp_path):
  prof = diagnostics.StepProfiler(tmp_path, start=2, num_steps=2)
  f = jax.jit(lambda x: jnp.tanh(x @ x))
  x = jnp.ones((64, 64))
  for step in range(4):
    prof.before_step(step + 1)
    x = f(x)
    prof.after_step(step + 1, x)
  prof.close()
  traces = list((tmp_path / "tensorboard" / "plugins" / "profile").glob("*/*.xplane.pb"))
  assert len(traces) == 1 and traces[0].stat().st_size > 0


def test_compilation_cache_defaults_to_the_workdir(tmp_path, monkeypatch):
  old = jax.config.jax_compilation_cache_dir
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    got = diagnostics.setup_compilation_cache("", tmp_path / "run")
    assert got == os.fspath(tmp_path / "run" / "compilation_cache")
    assert jax.config.jax_compilation_cache_dir == got
    # An explicit JAX setting (JAX_COMPILATION_CACHE_DIR) wins over the default.
    assert diagnostics.setup_compilation_cache("", tmp_path / "other") == got
    assert diagnostics.setup_compilation_cache("off", tmp_path / "run") is None
  finally:
    jax.config.update("jax_compilation_cache_dir", old)

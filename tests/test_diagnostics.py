"""The watchdog, the step profiler and the compilation-cache default (moss_jax/diagnostics.py)."""

from __future__ import annotations

import os
import threading
import time

import jax
import jax.numpy as jnp

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
    limit = dog.limit()  # max(0.2 s, 5 x median); steps run slower on a loaded machine
    assert not messages and limit is not None and limit >= 0.2
    time.sleep(2 * limit + 0.3)  # step 7 stalls
    assert len(messages) == 1, messages  # reported once per stall
    report = messages[0]
    assert "step 7 has taken" in report
    assert "data_worker" in report and "_stuck_in_a_collective" in report
    assert "MainThread" in report
    dog.beat(7)
    with dog.paused():  # evaluation: not a step
      time.sleep(2 * limit + 0.3)
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


def test_compilation_cache_default_is_the_users_cache_or_the_buckets(tmp_path, monkeypatch):
  old = jax.config.jax_compilation_cache_dir
  monkeypatch.setenv(diagnostics.USER_CACHE_ENV, str(tmp_path / "mine"))
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    # A local workdir (or none: the evaluate/generate commands): the user's cache, for every run.
    got = diagnostics.setup_compilation_cache("", tmp_path / "run")
    assert got == os.fspath(tmp_path / "mine" / "xla")
    assert jax.config.jax_compilation_cache_dir == got
    jax.config.update("jax_compilation_cache_dir", None)
    assert diagnostics.setup_compilation_cache("", None) == got
    # A bucket workdir: its own cache, which the pod's hosts share and preemption keeps.
    jax.config.update("jax_compilation_cache_dir", None)
    assert diagnostics.setup_compilation_cache("", "gs://bucket/run") == (
        "gs://bucket/run/compilation_cache")
    # An explicit JAX setting (JAX_COMPILATION_CACHE_DIR) wins over the default.
    jax.config.update("jax_compilation_cache_dir", os.fspath(tmp_path / "team"))
    assert diagnostics.setup_compilation_cache("", tmp_path / "other") == os.fspath(
        tmp_path / "team")
    assert diagnostics.setup_compilation_cache(os.fspath(tmp_path / "x"), tmp_path / "run") == (
        os.fspath(tmp_path / "x"))
    assert diagnostics.setup_compilation_cache("off", tmp_path / "run") is None
  finally:
    jax.config.update("jax_compilation_cache_dir", old)


def test_users_cache_follows_xdg(monkeypatch, tmp_path):
  monkeypatch.delenv(diagnostics.USER_CACHE_ENV, raising=False)
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert diagnostics.user_cache_dir() == os.fspath(tmp_path / "xdg" / "moss_jax")
  monkeypatch.delenv("XDG_CACHE_HOME")
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  assert diagnostics.user_cache_dir() == os.fspath(tmp_path / "home" / ".cache" / "moss_jax")


def test_unusable_cache_directory_is_one_warning_and_no_cache(tmp_path, monkeypatch, caplog):
  old = jax.config.jax_compilation_cache_dir
  blocker = tmp_path / "a_file"
  blocker.write_text("not a directory")
  monkeypatch.setenv(diagnostics.USER_CACHE_ENV, str(blocker))
  try:
    jax.config.update("jax_compilation_cache_dir", None)
    assert diagnostics.setup_compilation_cache("", tmp_path / "run") is None
    assert jax.config.jax_compilation_cache_dir is None
    assert "is not usable" in caplog.text
  finally:
    jax.config.update("jax_compilation_cache_dir", old)

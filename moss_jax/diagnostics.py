"""What a long run on a real cluster needs to be debuggable: compile cache, profiles, a watchdog.

  * `setup_compilation_cache`: a persistent XLA compilation cache (train.compilation_cache_dir),
    so a preempted run restarts without recompiling and a second run of the same program on a
    machine skips its compiles (the demo's 180 s on 2 cores are ~40% compiling).
  * `StepProfiler`: a jax.profiler trace of train.profile_steps steps starting at
    train.profile_start, written where TensorBoard's profile tab finds it
    (WORKDIR/tensorboard/plugins/profile/...). The profiler writes local files only, so for a
    bucket workdir the trace is made in a temporary directory and copied up when it stops.
  * `Watchdog`: when a step takes far longer than the median step (a hung collective, a stuck
    data worker, a dead host), it logs every thread's Python stack, once per stall.
"""

from __future__ import annotations

import contextlib
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback

import jax
from absl import logging

from moss_jax import paths

CACHE_OFF = "off"


USER_CACHE_ENV = "MOSS_JAX_CACHE_DIR"


def user_cache_dir() -> str:
  """This user's moss_jax cache: $MOSS_JAX_CACHE_DIR, else $XDG_CACHE_HOME/moss_jax, else
  ~/.cache/moss_jax (XDG's default). Safe to delete at any time."""
  explicit = os.environ.get(USER_CACHE_ENV)
  if explicit:
    return os.path.expanduser(explicit)
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "moss_jax")


def setup_compilation_cache(cache_dir: str, workdir: str | os.PathLike | None) -> str | None:
  """Points JAX's persistent compilation cache at a directory and returns it ("off": None).

  `cache_dir` "" picks where the next run that needs these programs will look:
    * a bucket workdir (gs://...): WORKDIR/compilation_cache, shared by the pod's hosts and
      still there when preempted VMs are recreated;
    * a local workdir, or none (the evaluate and generate commands): the user's cache
      (`user_cache_dir()`/xla), shared by every run on this machine, so the demo run again in a
      new workdir, a test run or an evaluation of the same model skip compiling.
  An explicit JAX_COMPILATION_CACHE_DIR (or jax.config setting) wins over the default, so shared
  caches (tests, a team cache bucket) keep working. Entries are keyed by the program, the
  compile options and the jax/XLA versions, so a stale entry is never used.
  """
  if cache_dir == CACHE_OFF:
    return None
  if not cache_dir:
    current = jax.config.jax_compilation_cache_dir
    if current:
      return current
    if workdir is not None and paths.is_uri(workdir):
      cache_dir = os.fspath(paths.run_path(workdir) / "compilation_cache")
    else:
      cache_dir = os.path.join(user_cache_dir(), "xla")
  else:
    cache_dir = os.fspath(paths.run_path(cache_dir))
  if not paths.is_uri(cache_dir):
    try:
      os.makedirs(cache_dir, exist_ok=True)
    except OSError as e:  # else JAX warns at every compile and caches nothing
      logging.warning("compilation cache %s is not usable (%s); compiling without it", cache_dir,
                      e.strerror or e)
      return None
  jax.config.update("jax_compilation_cache_dir", cache_dir)
  return cache_dir


class StepProfiler:
  """Traces steps [start, start + num_steps) with jax.profiler; `num_steps` 0 disables it."""

  def __init__(self, workdir: str | os.PathLike, start: int, num_steps: int):
    self.logdir = paths.run_path(workdir) / "tensorboard"
    self.start, self.stop = int(start), int(start) + int(num_steps)
    self.enabled = num_steps > 0
    self._active = False
    self._local_dir: str | None = None

  def before_step(self, step: int) -> None:
    """Call with the number of the step about to run (1-based)."""
    if self.enabled and not self._active and self.start <= step < self.stop:
      if paths.is_uri(self.logdir):
        self._local_dir = tempfile.mkdtemp(prefix="moss_jax_profile_")
        target = self._local_dir
      else:
        self.logdir.mkdir(parents=True, exist_ok=True)
        target = os.fspath(self.logdir)
      jax.profiler.start_trace(target)
      self._active = True
      logging.warning("profiling steps %d..%d into %s", step, self.stop - 1, self.logdir)

  def after_step(self, step: int, outputs=None) -> None:
    """Call after dispatching step `step`; stops (waiting for `outputs`) after the last one."""
    if self._active and step >= self.stop - 1:
      if outputs is not None:
        jax.block_until_ready(outputs)
      self.close()

  def close(self) -> None:
    if not self._active:
      return
    jax.profiler.stop_trace()
    self._active = False
    if self._local_dir is not None:
      paths.copy_tree(self._local_dir, self.logdir)
      self._local_dir = None


def thread_stacks() -> str:
  """Every Python thread's current stack, named."""
  names = {t.ident: t.name for t in threading.enumerate()}
  parts = []
  for ident, frame in sys._current_frames().items():  # pylint: disable=protected-access
    parts.append(f"--- thread {names.get(ident, '?')} ({ident})\n" +
                 "".join(traceback.format_stack(frame)))
  return "\n".join(parts)


class Watchdog:
  """Logs all thread stacks when the time since the last `beat` exceeds factor x median step.

  The median is over the last `window` completed intervals and needs `min_intervals` of them
  (compile-time steps are excluded by only counting from the second beat). A stall is reported
  once; the next beat re-arms it. `paused()` covers work that is not a step (evaluation).
  """

  def __init__(self, factor: float = 10.0, min_seconds: float = 60.0, window: int = 50,
               min_intervals: int = 5, poll_seconds: float = 1.0, log=logging.error):
    self.factor, self.min_seconds = float(factor), float(min_seconds)
    self.window, self.min_intervals = int(window), int(min_intervals)
    self._log = log
    self._intervals: list[float] = []
    self._last: float | None = None
    self._beats = 0
    self._step = 0
    self._reported = False
    self._paused = 0
    self._lock = threading.Lock()
    self._stop = threading.Event()
    self.reports = 0
    self._thread = None
    if self.factor > 0:
      self._thread = threading.Thread(target=self._run, args=(poll_seconds,),
                                      name="moss_jax_watchdog", daemon=True)
      self._thread.start()

  def beat(self, step: int) -> None:
    now = time.monotonic()
    with self._lock:
      if self._last is not None and self._beats >= 2 and not self._paused:
        self._intervals = (self._intervals + [now - self._last])[-self.window:]
      self._last, self._step, self._reported = now, step, False
      self._beats += 1

  @contextlib.contextmanager
  def paused(self):
    with self._lock:
      self._paused += 1
    try:
      yield
    finally:
      with self._lock:
        self._paused -= 1
        self._last = time.monotonic()

  def limit(self) -> float | None:
    """Seconds after which the current step counts as stalled (None: not enough history)."""
    if len(self._intervals) < self.min_intervals:
      return None
    return max(self.min_seconds, self.factor * statistics.median(self._intervals))

  def _run(self, poll_seconds: float) -> None:
    while not self._stop.wait(poll_seconds):
      with self._lock:
        limit = self.limit()
        if (limit is None or self._last is None or self._reported or self._paused):
          continue
        waited = time.monotonic() - self._last
        if waited <= limit:
          continue
        self._reported = True
        step, median = self._step, statistics.median(self._intervals)
      self.reports += 1
      self._log("watchdog: step %d has taken %.0f s (median step %.2f s, limit %.0f s); "
                "stacks of all threads:\n%s", step + 1, waited, median, limit, thread_stacks())

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)

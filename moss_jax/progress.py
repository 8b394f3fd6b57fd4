"""Progress bars for long steps (restores, exports, validation, evaluation).

Shown on stderr by process 0 only, and only when stderr is a terminal: logs of batch jobs and CI
stay free of carriage-return noise. No JAX import here, so the data pipeline can use it too; the
process index is read from JAX only if the program already imported it.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Iterable, Iterator, TypeVar

T = TypeVar("T")


def _is_main_process() -> bool:
  jax = sys.modules.get("jax")
  if jax is None:
    return True
  try:
    return jax.process_index() == 0
  except Exception:  # pylint: disable=broad-except  (backend not initialised yet: single process)
    return True


def _human(n: float) -> str:
  for unit in ("", "k", "M", "G", "T"):
    if abs(n) < 1000:
      return f"{n:.0f}{unit}" if unit == "" else f"{n:.1f}{unit}"
    n /= 1000
  return f"{n:.1f}P"


class Progress:
  """`with Progress(total, "exporting", unit="B") as p: ... p.update(n)`; redraws at most 10x/s."""

  def __init__(self, total: int | None, desc: str, unit: str = "", enabled: bool | None = None,
               stream=None):
    self.total = total
    self.desc = desc
    self.unit = unit
    self.stream = stream or sys.stderr
    if enabled is None:
      enabled = _is_main_process() and getattr(self.stream, "isatty", lambda: False)()
    self.enabled = enabled
    self.count = 0
    self._start = time.monotonic()
    self._last_draw = 0.0

  def __enter__(self) -> "Progress":
    self._draw(force=True)
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def update(self, n: int = 1) -> None:
    self.count += n
    self._draw()

  def line(self) -> str:
    elapsed = max(time.monotonic() - self._start, 1e-9)
    done = _human(self.count) + self.unit
    if self.total:
      pct = 100.0 * self.count / self.total
      text = f"{self.desc}: {done}/{_human(self.total)}{self.unit} ({pct:.0f}%)"
      if self.count:
        left = elapsed * (self.total - self.count) / self.count
        text += f", {left:.0f} s left"
    else:
      text = f"{self.desc}: {done}"
    return text + f", {_human(self.count / elapsed)}{self.unit}/s"

  def _draw(self, force: bool = False) -> None:
    if not self.enabled:
      return
    now = time.monotonic()
    if not force and now - self._last_draw < 0.1 and self.count != self.total:
      return
    self._last_draw = now
    self.stream.write("\r\033[K" + self.line())
    self.stream.flush()

  def close(self) -> None:
    if self.enabled:
      self._draw(force=True)
      self.stream.write("\n")
      self.stream.flush()
      self.enabled = False


def track(items: Iterable[T], desc: str, total: int | None = None, unit: str = "",
          enabled: bool | None = None, stream=None) -> Iterator[T]:
  """Yields `items`, advancing a progress bar by one per item."""
  if total is None and hasattr(items, "__len__"):
    total = len(items)  # type: ignore[arg-type]
  with Progress(total, desc, unit=unit, enabled=enabled, stream=stream) as bar:
    for item in items:
      yield item
      bar.update(1)


class Waiting:
  """`with Waiting("restoring checkpoint 200"): ...`: elapsed seconds for one long call that
  reports no progress of its own (an Orbax restore); redrawn twice a second from a thread."""

  def __init__(self, desc: str, enabled: bool | None = None, stream=None):
    self.desc = desc
    self.stream = stream or sys.stderr
    if enabled is None:
      enabled = _is_main_process() and getattr(self.stream, "isatty", lambda: False)()
    self.enabled = enabled
    self._start = time.monotonic()
    self._done = threading.Event()
    self._thread = threading.Thread(target=self._tick, daemon=True)

  def line(self) -> str:
    return f"{self.desc}: {time.monotonic() - self._start:.0f} s"

  def _tick(self) -> None:
    while not self._done.wait(0.5):
      self.stream.write("\r\033[K" + self.line())
      self.stream.flush()

  def __enter__(self) -> "Waiting":
    self._start = time.monotonic()
    if self.enabled:
      self.stream.write(self.line())
      self.stream.flush()
      self._thread.start()
    return self

  def __exit__(self, *exc) -> None:
    if not self.enabled:
      return
    self._done.set()
    self._thread.join()
    self.stream.write("\r\033[K" + self.line() + "\n")
    self.stream.flush()

"""Progress bars: drawn only where asked (a terminal, process 0), with counts, rate and time left."""

from __future__ import annotations

import io
import re
import time

from moss_jax import progress


def test_bar_counts_and_finishes_its_line():
  out = io.StringIO()
  items = list(progress.track(range(5), "decoding files", enabled=True, stream=out))
  assert items == list(range(5))
  last = out.getvalue().split("\r\033[K")[-1]
  assert last.startswith("decoding files: 5/5 (100%)") and last.endswith("/s\n")


def test_silent_when_not_a_terminal():
  out = io.StringIO()  # isatty() is False: logs of batch jobs stay clean
  assert list(progress.track(range(3), "x", stream=out)) == [0, 1, 2]
  with progress.Waiting("restoring", stream=out):
    pass
  assert out.getvalue() == ""


def test_waiting_shows_elapsed_seconds():
  out = io.StringIO()
  with progress.Waiting("restoring step 7", enabled=True, stream=out):
    time.sleep(1.2)  # at least one redraw from the ticking thread
  lines = out.getvalue().split("\r\033[K")
  assert len(lines) >= 3 and re.fullmatch(r"restoring step 7: \d+ s\n", lines[-1])

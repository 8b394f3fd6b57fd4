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

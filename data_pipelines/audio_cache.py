"""A bounded in-memory cache of decoded records, for corpora that are read many times over.

A run that goes through a small corpus for many epochs (the demo: 64 clips, ~30 epochs in 200
steps; a fine-tune on a few hours of audio) decodes the same files again every epoch: on the
2-core demo machine the pipeline spent ~18 s of CPU per 200 batches, most of it decoding flac/ogg,
CPU the training step wants. `data.audio_cache_mb` > 0 keeps the parsed sample and its decoded
waveforms of each manifest line, least recently used out first, up to that many MiB per process
(each Grain worker process has its own). Records that fail to load are never cached: they are
re-read, and counted, every time. Cached waveforms are read-only, so no later stage can change
what another epoch will get.
"""

from __future__ import annotations

import collections
import threading
from typing import Any, Callable, Hashable

import numpy as np


class DecodedCache:
  """key -> (sample, waveforms) with an LRU byte budget; thread-safe; empty after pickling."""

  def __init__(self, max_bytes: int):
    self.max_bytes = int(max_bytes)
    self._init_state()

  def _init_state(self) -> None:
    self._entries: collections.OrderedDict[Hashable, tuple[Any, list[np.ndarray]]] = (
        collections.OrderedDict())
    self._bytes = 0
    self._lock = threading.Lock()
    self.hits = self.misses = 0

  def __getstate__(self) -> dict:
    # Grain pickles the map step into its worker processes: each starts with an empty cache.
    return {"max_bytes": self.max_bytes}

  def __setstate__(self, state: dict) -> None:
    self.max_bytes = state["max_bytes"]
    self._init_state()

  def get_or_load(self, key: Hashable, load: Callable[[], tuple[Any, list[np.ndarray]]]
                  ) -> tuple[Any, list[np.ndarray]]:
    """The cached value of `key`, or `load()`'s (cached when it fits the budget)."""
    if self.max_bytes <= 0:
      return load()
    with self._lock:
      entry = self._entries.get(key)
      if entry is not None:
        self._entries.move_to_end(key)
        self.hits += 1
        return entry
      self.misses += 1
    sample, waves = load()  # outside the lock: decoding threads run in parallel
    for wave in waves:
      wave.flags.writeable = False
    size = sum(w.nbytes for w in waves)
    if size <= self.max_bytes:
      with self._lock:
        if key not in self._entries:
          self._entries[key] = (sample, waves)
          self._bytes += size
          while self._bytes > self.max_bytes:
            _, (_, old) = self._entries.popitem(last=False)
            self._bytes -= sum(w.nbytes for w in old)
    return sample, waves

  @property
  def size_bytes(self) -> int:
    return self._bytes

  def __len__(self) -> int:
    return len(self._entries)

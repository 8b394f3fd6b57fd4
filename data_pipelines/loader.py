"""The training loader of one process in a multi-process run: shard-aware, resumable anywhere.

`ShardedLoader` reads this process's data shards through data_pipelines/pipeline.py and stacks
their rows; `global_bad_record_counts` sums the skipped-record counts over all processes (a
collective: every process calls it at the same step).
"""

from __future__ import annotations

from typing import Any, Iterator, Mapping

import jax
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines import errors, pipeline
from moss_jax.errors import UserError


class ShardedLoader:
  """This process's slice of the training data, as `num_shards` independent shard loaders.

  The data order depends only on data.seed and the shard count (train.data_shards, default the
  process count), never on how many processes read the shards: process p reads shards
  [p*k, (p+1)*k) and stacks their rows. So a 1-process run with data_shards=2 sees exactly the
  batches of a 2-process run, and a run may resume on a different process count.
  """

  def __init__(self, config, process_index: int, process_count: int):
    shards = int(config.train.data_shards) or process_count
    if shards % process_count:
      raise ValueError(f"train.data_shards={shards} is not divisible by {process_count} processes")
    per = shards // process_count
    self.num_shards = shards
    self.shard_ids = list(range(process_index * per, (process_index + 1) * per))
    self.loaders = [pipeline.make_train_loader(config, process_index=s, process_count=shards)
                    for s in self.shard_ids]

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(loader) for loader in self.loaders]
    if len(parts) == 1:
      return parts[0]
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  def get_state(self) -> dict[str, Any]:
    return {"num_shards": self.num_shards,
            "shards": {str(s): l.get_state() for s, l in zip(self.shard_ids, self.loaders)}}

  def set_state(self, process_states: list[Mapping[str, Any]]) -> None:
    """Restores from the states every process saved (any process count, same shard count)."""
    merged: dict[str, Any] = {}
    for st in process_states:
      # Wrong content is a damaged checkpoint (ValueError: the reader falls back to an older
      # one); another shard count is the user's config (UserError: stop and say so).
      if not (isinstance(st.get("num_shards"), int) and isinstance(st.get("shards"), dict)):
        raise ValueError(f"malformed data iterator state (keys {sorted(st)})")
      if st["num_shards"] != self.num_shards:
        raise UserError(f"checkpoint data state has {st['num_shards']} shards, this run "
                        f"{self.num_shards}: set train.data_shards to match")
      merged.update(st["shards"])
    missing = [s for s in self.shard_ids if str(s) not in merged]
    if missing:
      raise ValueError(f"data iterator state lacks shards {missing}")
    for s, loader in zip(self.shard_ids, self.loaders):
      loader.set_state(merged[str(s)])

  def bad_record_counts(self) -> dict[str, int]:
    """Records this process skipped in the batches it consumed, per reason."""
    total: dict[str, int] = {}
    for loader in self.loaders:
      for k, v in loader.bad_record_counts().items():
        total[k] = total.get(k, 0) + int(v)
    return total

  def close(self) -> None:
    for loader in self.loaders:
      loader.close()


def global_bad_record_counts(local: Mapping[str, int]) -> dict[str, int]:
  """Sums the per-reason counts over processes (a collective when there are several)."""
  if jax.process_count() == 1:
    return dict(local)
  vec = np.array([local.get(r, 0) for r in errors.REASONS], np.int64)
  total = np.sum(multihost_utils.process_allgather(vec), axis=0)
  return {r: int(n) for r, n in zip(errors.REASONS, total) if n}

"""Orbax checkpoints of a training run: state, every process's data iterator state, the config.

Layout of `WORKDIR/checkpoints/STEP/` (one Orbax CheckpointManager step):
  state/   the train state pytree (params, frozen params, optimizer state, counters), sharded
  data/    process_{i}-of-{n}.json: the data iterator state of every process (restore reads
           them all, so the shard states can be redistributed over another process count)
  config/  the resolved config (JSON)

Saves are asynchronous (the arrays are copied off the device, then written in a background
thread while training continues). A step directory counts only when Orbax committed it (its
`_CHECKPOINT_METADATA` has a commit timestamp and `commit_success.txt` exists); a directory a crash
left half-written is renamed aside (`STEP.incomplete-*`) and the previous complete step is used.
If restoring the newest step still fails, older complete steps are tried in turn.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Mapping

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from moss_jax import optim
from moss_jax import paths

STATE, DATA, CONFIG = "state", "data", "config"
_COMMIT_FILE = "commit_success.txt"
_METADATA_FILE = "_CHECKPOINT_METADATA"


# ----------------------------------------------------------------------------- data state item

class DataStateHandler(ocp.CheckpointHandler):
  """Writes this process's data iterator state as JSON; each process restores its own file."""

  def save(self, directory: epath.Path, args: "DataStateSave"):
    index, count = jax.process_index(), jax.process_count()
    (directory / f"process_{index}-of-{count}.json").write_text(json.dumps(args.state))

  def restore(self, directory: epath.Path, args: "DataStateRestore | None" = None):
    """{"processes": [state of process 0, 1, ...]}: every process's file, so a run may resume
    on another process count when its loader can redistribute the states
    (data_pipelines/loader.py ShardedLoader)."""
    files = sorted(directory.glob("process_*-of-*.json"),
                   key=lambda p: int(p.name.split("_")[1].split("-")[0]))
    if not files:
      raise ValueError(f"no data iterator state in {directory}")
    return {"processes": [json.loads(p.read_text()) for p in files]}

  def metadata(self, directory: epath.Path):
    return None

  def finalize(self, directory: epath.Path):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(DataStateHandler, for_save=True)
@dataclasses.dataclass
class DataStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(DataStateHandler, for_restore=True)
@dataclasses.dataclass
class DataStateRestore(ocp.args.CheckpointArgs):
  pass


# ----------------------------------------------------------------------------- completeness

def is_complete(step_dir: str | os.PathLike) -> bool:
  """True when Orbax finished committing this step directory."""
  step_dir = epath.Path(step_dir)
  meta = step_dir / _METADATA_FILE
  if not (meta.exists() and (step_dir / _COMMIT_FILE).exists()):
    return False
  try:
    return bool(json.loads(meta.read_text()).get("commit_timestamp_nsecs"))
  except (ValueError, OSError):
    return False


def step_dirs(directory: str | os.PathLike) -> dict[int, epath.Path]:
  """{step: path} of every directory whose name is a plain step number."""
  directory = epath.Path(directory)
  if not directory.exists():
    return {}
  return {int(p.name): p for p in directory.iterdir() if p.name.isdigit() and p.is_dir()}


def complete_steps(directory: str | os.PathLike) -> list[int]:
  return sorted(s for s, p in step_dirs(directory).items() if is_complete(p))


def quarantine_incomplete(directory: str | os.PathLike) -> list[str]:
  """Renames half-written step directories aside (process 0 only) so Orbax never lists them."""
  moved = []
  if jax.process_index() == 0:
    for step, path in sorted(step_dirs(directory).items()):
      if not is_complete(path):
        target = path.parent / f"{path.name}.incomplete-{int(time.time())}"
        path.rename(target)
        logging.warning("checkpoint %s is incomplete (crash during save?); moved to %s",
                        path, target)
        moved.append(str(target))
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("moss_jax_checkpoint_quarantine")
  return moved


# ----------------------------------------------------------------------------- manager

@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data_state: Any
  config: dict | None


class Checkpointer:
  """Saves every `every` steps (asynchronously), keeps the last `keep`, restores the latest."""

  def __init__(self, directory: str | os.PathLike, every: int, keep: int = 3,
               async_save: bool = True):
    self.directory = paths.run_path(directory)  # local or gs://
    self.every = int(every)
    quarantine_incomplete(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep if keep and keep > 0 else None,
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(
        self.directory, options=options, item_names=(STATE, DATA, CONFIG),
        item_handlers={STATE: ocp.StandardCheckpointHandler(), DATA: DataStateHandler(),
                       CONFIG: ocp.JsonCheckpointHandler()})

  def should_save(self, step: int) -> bool:
    return self.every > 0 and step > 0 and step % self.every == 0

  def save(self, step: int, state: Any, data_state: Any = None, config: Mapping | None = None,
           force: bool = False) -> bool:
    """Starts an asynchronous save of `state` at `step`; True if a save was started."""
    if not (force or self.should_save(step)):
      return False
    if step in self._manager.all_steps():
      return False  # already saved (e.g. a preemption save right after a periodic one)
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: DataStateSave(data_state if data_state is not None else {}),
        CONFIG: ocp.args.JsonSave(dict(config or {})),
    })
    return bool(self._manager.save(step, args=args, force=True))

  def restore(self, abstract_state: Any, step: int | None = None) -> Restored | None:
    """Restores `step` (default: the newest complete one, falling back to older ones on error).

    `abstract_state` is a ShapeDtypeStruct tree carrying the shardings wanted now, so a run may
    resume on a different mesh shape than the one that saved.
    """
    candidates = [step] if step is not None else complete_steps(self.directory)[::-1]
    errors = []
    for s in candidates:
      try:
        out = self._manager.restore(s, args=ocp.args.Composite(**{
            STATE: ocp.args.StandardRestore(abstract_state),
            DATA: DataStateRestore(),
            CONFIG: ocp.args.JsonRestore(),
        }))
        return Restored(s, out[STATE], out[DATA], out[CONFIG])
      except Exception as e:  # pylint: disable=broad-except
        if step is not None:
          raise
        logging.warning("could not restore checkpoint step %d (%s); trying an older one", s, e)
        errors.append(f"{s}: {e}")
    if errors:
      raise RuntimeError("no checkpoint could be restored: " + "; ".join(errors))
    return None

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def restore_params(directory: str, abstract_params: Any, step: int | None = None) -> dict:
  """The whole parameter tree (trainable and frozen halves merged) of a run's checkpoint.

  For moving between stages (stage 1 -> stage 2): the saved split may differ from the new one,
  so both halves are read without the optimizer state and placed as `abstract_params` says.
  """
  directory = paths.run_path(directory)  # local or gs://
  steps = complete_steps(directory)
  if step is None:
    if not steps:
      raise FileNotFoundError(f"no complete checkpoint under {directory}")
    step = steps[-1]
  path = directory / str(step) / STATE
  with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
    meta = ckptr.metadata(path)
    tree = meta.item_metadata.tree if hasattr(meta, "item_metadata") else meta.tree
    saved = {k: tree[k] for k in ("params", "frozen")}
    target_sharding = _shardings_by_path(abstract_params)

    def restore_arg(p, m):
      key = optim.path_str(p[1:])  # drop the 'params' / 'frozen' level
      if key not in target_sharding:
        raise ValueError(f"checkpoint parameter {key} is not in the model")
      sds = target_sharding[key]
      return ocp.ArrayRestoreArgs(sharding=sds.sharding, global_shape=sds.shape, dtype=sds.dtype)

    restore_args = jax.tree_util.tree_map_with_path(restore_arg, saved)
    out = ckptr.restore(path, args=ocp.args.PyTreeRestore(
        item=saved, restore_args=restore_args, partial_restore=True))
  return optim.merge(out["params"], out["frozen"])


def _shardings_by_path(abstract_params: Any) -> dict[str, jax.ShapeDtypeStruct]:
  flat, _ = jax.tree_util.tree_flatten_with_path(abstract_params)
  return {optim.path_str(p): leaf for p, leaf in flat}

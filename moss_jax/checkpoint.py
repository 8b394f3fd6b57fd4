"""Orbax checkpoints of a training run: state, every process's data iterator state, the config.

Layout of `WORKDIR/checkpoints/STEP/` (one Orbax CheckpointManager step):
  state/   the train state pytree (params, frozen params, optimizer state, counters), sharded
  data/    process_{i}-of-{n}.json: the data iterator state of every process (restore reads
           them all, so the shard states can be redistributed over another process count)
  config/  the resolved config (JSON)

Saves are asynchronous (the arrays are copied off the device, then written in a background
thread while training continues); `Checkpointer.check()` turns a failed background write into
`SaveFailed` at the next step, naming the step and the last good checkpoint. Which steps exist is
Orbax's answer (`NameFormat.find_all`: only finalized steps; a crash mid-save leaves a temporary
directory that Orbax ignores and cleans up).

Every reader (training's resume, `restore_params` for generate/export/stage changes) goes through
`restore_newest`: the newest complete step is tried first; one that cannot be read is renamed
aside (`STEP.unreadable-TIME`, never deleted) so the next save of that step writes a fresh one and
no later run trips over it again, and the next older step is tried. A checkpoint written by a
different model is not "unreadable": it raises `CheckpointMismatch` naming the config fields and
parameters that differ, and nothing is renamed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import time
from typing import Any, Callable, Mapping, TypeVar

import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

from moss_jax import optim, paths
from moss_jax.errors import UserError

STATE, DATA, CONFIG = "state", "data", "config"
ASIDE = "unreadable"  # STEP.unreadable-TIME: a step that failed to restore, kept for inspection
T = TypeVar("T")


class CheckpointMismatch(UserError):
  """The run's checkpoint was written by another model shape than the config describes."""


class NoCheckpoint(UserError):
  """A run directory without any readable checkpoint."""


class SaveFailed(UserError):
  """A checkpoint could not be written (disk full, permissions): the run must stop."""


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
    states = [json.loads(p.read_text()) for p in files]
    bad = [p.name for p, st in zip(files, states) if not isinstance(st, dict)]
    if bad:
      raise ValueError(f"data iterator state {', '.join(bad)} in {directory} is not an object")
    return {"processes": states}

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


# ----------------------------------------------------------------------------- which steps exist

def complete_steps(directory: str | epath.PathLike) -> list[int]:
  """Steps Orbax finalized under `directory` (half-written and set-aside ones excluded)."""
  directory = epath.Path(directory)
  if not directory.is_dir():
    return []
  return sorted(m.step for m in ocp.path.step.standard_name_format().find_all(directory))


def latest_complete_step(directory: str | epath.PathLike) -> int | None:
  steps = complete_steps(directory)
  return steps[-1] if steps else None


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def set_aside(directory: str | epath.PathLike, step: int, reason: str) -> epath.Path | None:
  """Renames step `step` to STEP.unreadable-TIME (process 0) so it is no longer listed."""
  path = epath.Path(directory) / str(step)
  target = path.parent / f"{path.name}.{ASIDE}-{int(time.time())}"
  moved = None
  if jax.process_index() == 0:
    try:
      path.rename(target)
      moved = target
      logging.warning("checkpoint step %d cannot be read (%s); moved it to %s", step, reason,
                      target)
    except OSError as e:  # a read-only copy of a run: fall back without moving
      logging.warning("checkpoint step %d cannot be read (%s); could not move it aside: %s",
                      step, reason, e)
  _sync(f"moss_jax_set_aside_{step}")
  return moved


def _one_line(e: BaseException, limit: int = 200) -> str:
  """The most telling line of an exception: the OS error in its chain or in TensorStore's text
  (disk full, file too large, permission denied) first, then the start of its message."""
  seen, cur = [], e
  while cur is not None and cur not in seen:
    seen.append(cur)
    if isinstance(cur, OSError) and cur.strerror:
      return f"{cur.strerror} ({type(cur).__name__}: {cur})"[:limit * 2]
    cur = cur.__cause__ or cur.__context__
  text = " ".join(str(e).split())
  first = f"{type(e).__name__}: {text}"
  if len(first) > limit:
    first = first[:limit] + " [...]"
  code = re.search(r"os_error_code='?(\d+)", text)  # TensorStore's errors carry the errno
  return f"{os.strerror(int(code.group(1)))} ({first})" if code else first


def restore_newest(directory: str | epath.PathLike, restore_step: Callable[[int], T], *,
                   step: int | None = None, after_set_aside: Callable[[], None] | None = None
                   ) -> tuple[int, T] | None:
  """(step, restore_step(step)) of the newest step that restores; None when there is no step.

  The one fallback every reader shares. A step whose restore raises is set aside (see
  `set_aside`) and the next older one tried; a `UserError` (a checkpoint of another model, a
  data-shard count to change) is the user's to fix and propagates at once. An explicit `step`
  is restored or raises, without fallback.
  """
  if step is not None:
    return step, restore_step(step)
  failed = []
  for s in reversed(complete_steps(directory)):
    try:
      return s, restore_step(s)
    except UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      reason = _one_line(e)
      failed.append(f"step {s}: {reason}")
      set_aside(directory, s, reason)
      if after_set_aside is not None:
        after_set_aside()
  if failed:
    raise NoCheckpoint(f"no checkpoint under {directory} could be read ({'; '.join(failed)}); "
                       f"they were renamed to STEP.{ASIDE}-TIME (rename one back to retry it)")
  return None


# ----------------------------------------------------------------------------- shape checks

def _shapes(tree: Any) -> dict[str, tuple]:
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {optim.path_str(p): tuple(leaf.shape) for p, leaf in flat if hasattr(leaf, "shape")}


def _flat_config(config: Mapping | None, prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in (config or {}).items():
    if isinstance(v, Mapping):
      out.update(_flat_config(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = tuple(v) if isinstance(v, list) else v
  return out


def mismatch_message(saved: Any, wanted: Any, saved_config: Mapping | None = None,
                     config: Mapping | None = None, limit: int = 6) -> str | None:
  """A few lines naming what differs between a checkpoint's tree and the one wanted; None if
  every array has the wanted shape. Config fields are compared under model.* and train.stage,
  which are what decide the shapes and the trainable/frozen split."""
  have, want = _shapes(saved), _shapes(wanted)
  diffs = [f"{k}: {have[k]} in the checkpoint, {want[k]} now"
           for k in sorted(have.keys() & want.keys()) if have[k] != want[k]]
  diffs += [f"{k}: only in the checkpoint" for k in sorted(have.keys() - want.keys())]
  diffs += [f"{k}: not in the checkpoint" for k in sorted(want.keys() - have.keys())]
  if not diffs:
    return None
  lines = []
  if saved_config is not None and config is not None:
    a, b = _flat_config(saved_config), _flat_config(config)
    fields = [f"{k}: {a.get(k, '(unset)')!r} in the checkpoint, {b.get(k, '(unset)')!r} now"
              for k in sorted(a.keys() | b.keys())
              if (k.startswith("model.") or k == "train.stage") and a.get(k) != b.get(k)]
    if fields:
      lines.append("config fields that differ: " + "; ".join(fields[:limit]) +
                   (f" (+{len(fields) - limit} more)" if len(fields) > limit else ""))
  lines.append(f"{len(diffs)} arrays differ: " + "; ".join(diffs[:limit]) +
               (f" (+{len(diffs) - limit} more)" if len(diffs) > limit else ""))
  return "\n  ".join(lines)


# ----------------------------------------------------------------------------- manager

@dataclasses.dataclass
class Restored:
  step: int
  state: Any
  data_state: Any
  config: dict | None


class Checkpointer:
  """Saves every `every` steps (asynchronously), keeps the last `keep`, restores the newest."""

  def __init__(self, directory: str | epath.PathLike, every: int, keep: int = 3,
               async_save: bool = True):
    self.directory = paths.run_path(directory)  # local or gs://
    self.every = int(every)
    self._pending: int | None = None  # the step whose background write is not yet checked
    self._failed = False  # a SaveFailed was raised: close() must not raise it again
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
    """Starts an asynchronous save of `state` at `step`; True if a save was started.

    Raises SaveFailed when the previous save's background write failed or this one cannot
    start: a run must not compute steps it can no longer keep.
    """
    if not (force or self.should_save(step)):
      return False
    if self._pending is not None:
      self.wait()  # Orbax would wait for it anyway; this way its failure is ours to report
    if step in self._manager.all_steps():
      return False  # already saved (e.g. a preemption save right after a periodic one)
    args = ocp.args.Composite(**{
        STATE: ocp.args.StandardSave(state),
        DATA: DataStateSave(data_state if data_state is not None else {}),
        CONFIG: ocp.args.JsonSave(dict(config or {})),
    })
    try:
      started = bool(self._manager.save(step, args=args, force=True))
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step, e) from e
    if started:
      self._pending = step
    return started

  def check(self) -> None:
    """Raises SaveFailed if the last save's background write has ended in an error (cheap:
    it only waits when that write has already finished).

    Single-process only: processes could see the write end at different steps, and all must
    stop at the same one; with several, the next save (which waits everywhere) reports it.
    """
    if (self._pending is None or jax.process_count() > 1 or
        self._manager.is_saving_in_progress()):
      return
    self.wait()

  def _save_failed(self, step: int, e: BaseException) -> SaveFailed:
    self._failed = True
    good = [s for s in complete_steps(self.directory) if s != step]
    last = (f"step {good[-1]} ({self.directory / str(good[-1])})" if good
            else "none: no checkpoint of this run was completed")
    return SaveFailed(
        f"saving checkpoint step {step} in {self.directory} failed: {_one_line(e)}. The last "
        f"good checkpoint is {last}. Training stops here; fix the cause (free space, "
        f"permissions) and rerun the same command to resume.")

  def restore(self, abstract_state: Any, step: int | None = None, config: Mapping | None = None,
              apply_data_state: Callable[[Any], None] | None = None) -> Restored | None:
    """Restores `step` (default: the newest one that reads, setting unreadable ones aside).

    `abstract_state` is a ShapeDtypeStruct tree carrying the shardings wanted now, so a run may
    resume on a different mesh shape than the one that saved. Before any array is read the
    saved shapes are compared with it: a difference raises CheckpointMismatch (naming the
    `config` fields that changed). `apply_data_state(data_state)` runs inside the fallback, so a
    data state that does not load counts as an unreadable checkpoint too.
    """

    def restore_step(s: int) -> Restored:
      saved = self._manager.item_metadata(s)[STATE]
      problem = mismatch_message(saved, abstract_state, self._saved_config(s), config)
      if problem:
        raise CheckpointMismatch(
            f"checkpoint step {s} in {self.directory} was written by a different model than "
            f"the config describes:\n  {problem}\nResume with the run's own config or use a "
            "new --workdir; nothing in the run directory was changed.")
      out = self._manager.restore(s, args=ocp.args.Composite(**{
          STATE: ocp.args.StandardRestore(abstract_state),
          DATA: DataStateRestore(),
          CONFIG: ocp.args.JsonRestore(),
      }))
      if apply_data_state is not None:
        apply_data_state(out[DATA])
      return Restored(s, out[STATE], out[DATA], out[CONFIG])

    found = restore_newest(self.directory, restore_step, step=step,
                           after_set_aside=self._manager.reload)
    return None if found is None else found[1]

  def _saved_config(self, step: int) -> dict | None:
    try:
      return json.loads((self.directory / str(step) / CONFIG / "metadata").read_text())
    except (OSError, ValueError):
      return None

  def wait(self) -> None:
    """Waits for the background write; SaveFailed if it failed."""
    step, self._pending = self._pending, None
    try:
      self._manager.wait_until_finished()
      self._manager.check_for_errors()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_failed(step if step is not None else -1, e) from e

  def close(self) -> None:
    """Waits for the last save (SaveFailed if it failed, unless a failure was already raised)."""
    try:
      if not self._failed:
        self.wait()
    finally:
      try:
        self._manager.close()
      except Exception:  # pylint: disable=broad-except
        if not self._failed:
          raise


# ----------------------------------------------------------------------------- parameters only

def restore_params(directory: str | epath.PathLike, abstract_params: Any,
                   step: int | None = None) -> dict:
  """The whole parameter tree (trainable and frozen halves merged) of a run's checkpoint.

  For generate, export and moving between stages (stage 1 -> stage 2): the saved split may differ
  from the new one, so both halves are read without the optimizer state and placed as
  `abstract_params` says. Falls back past unreadable steps like training's resume
  (`restore_newest`); raises NoCheckpoint when there is none, CheckpointMismatch when the
  checkpoint holds another model.
  """
  directory = paths.run_path(directory)  # local or gs://
  target = {optim.path_str(p): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(abstract_params)[0]}
  options = ocp.CheckpointManagerOptions(read_only=True, create=False)
  manager = ocp.CheckpointManager(directory, options=options, item_names=(STATE,),
                                  item_handlers={STATE: ocp.PyTreeCheckpointHandler()})

  def restore_step(s: int) -> dict:
    tree = manager.item_metadata(s)[STATE]
    tree = tree.tree if hasattr(tree, "tree") else tree
    saved = {k: tree[k] for k in ("params", "frozen")}
    merged = optim.merge(saved["params"], saved["frozen"])
    problem = mismatch_message(merged, abstract_params)
    if problem:
      raise CheckpointMismatch(f"checkpoint step {s} in {directory} holds a different model "
                               f"than its config describes:\n  {problem}")

    def restore_arg(p, m):  # pylint: disable=unused-argument
      sds = target[optim.path_str(p[1:])]  # drop the 'params' / 'frozen' level
      return ocp.ArrayRestoreArgs(sharding=sds.sharding, global_shape=sds.shape, dtype=sds.dtype)

    restore_args = jax.tree_util.tree_map_with_path(restore_arg, saved)
    out = manager.restore(s, args=ocp.args.Composite(**{STATE: ocp.args.PyTreeRestore(
        item=saved, restore_args=restore_args, partial_restore=True)}))[STATE]
    return optim.merge(out["params"], out["frozen"])

  try:
    found = restore_newest(directory, restore_step, step=step, after_set_aside=manager.reload)
  finally:
    manager.close()
  if found is None:
    raise NoCheckpoint(f"no complete checkpoint under {directory}")
  return found[1]

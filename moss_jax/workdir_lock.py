"""One training run per run directory: `WORKDIR/lock`, held for the whole run.

Two runs on one workdir would interleave checkpoints, double the metrics rows and leave
config.json to whichever started last. The lock is an exclusive `fcntl.flock` on WORKDIR/lock,
which the kernel drops when the holder exits in any way (kill -9, OOM, crash): a lock left by a
dead process is simply taken over, with no stale-lock heuristics. The file also records who holds
it (host, pid, start time), so the refusal can say which run is in the way.

Only process 0 of a multi-process run takes it (all processes of a run share the workdir).
Object-store workdirs (gs://) have no flock; they are not locked (logged once).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time

from absl import logging

from moss_jax.errors import UserError

LOCK_FILE = "lock"


class WorkdirBusy(UserError):
  """Another live process holds the workdir's lock."""


class WorkdirLock:
  """Takes the lock on construction (raises WorkdirBusy or UserError); `release()` ends it."""

  def __init__(self, workdir: str):
    self.path = os.path.join(str(workdir), LOCK_FILE)
    self._fd = None
    if "://" in str(workdir):
      logging.info("%s is not a local directory: no lock against a second run", workdir)
      return
    try:
      os.makedirs(str(workdir), exist_ok=True)
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
      raise UserError(f"cannot write to the run directory {workdir}: {e.strerror} "
                      f"({e.filename or workdir}); choose a writable --workdir") from None
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _describe(fd)
      os.close(fd)
      raise WorkdirBusy(f"run directory {workdir} is in use by another training run "
                        f"({holder}); wait for it to end, stop it, or use another --workdir"
                        ) from None
    previous = _describe(fd)
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                              "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode(), 0)
    os.fsync(fd)
    if previous != "unknown holder":
      logging.info("took over the lock of %s (its holder, %s, has ended)", workdir, previous)
    self._fd = fd

  def release(self) -> None:
    if self._fd is not None:
      fcntl.flock(self._fd, fcntl.LOCK_UN)
      os.close(self._fd)
      self._fd = None


def _describe(fd: int) -> str:
  try:
    info = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    return f"pid {info['pid']} on {info['host']}, started {info['started']}"
  except (ValueError, KeyError, OSError, UnicodeDecodeError):
    return "unknown holder"

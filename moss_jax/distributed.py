"""Multi-process start-up and the cross-process stop signal (preemption).

`initialize` calls `jax.distributed.initialize` when the run spans several processes, taking
the coordinator from, in order: explicit arguments (the train.py flags), the MOSS_JAX_* variables
set by launch/local.sh, or JAX's own cluster detection (TPU VM metadata, SLURM, Open MPI, ...).
A single process with none of these skips it, so a laptop run needs nothing.
"""

from __future__ import annotations

import os
import signal
import threading

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

ENV_COORDINATOR = "MOSS_JAX_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "MOSS_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MOSS_JAX_PROCESS_ID"


def _in_cluster() -> bool:
  """True where JAX's auto-detection should find a multi-process cluster."""
  slurm = int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ
  ompi = int(os.environ.get("OMPI_COMM_WORLD_SIZE", "1")) > 1
  # Multi-host TPU VMs list their workers here; single-host TPUs need no initialize.
  tpu_hosts = len([h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1
  return slurm or ompi or tpu_hosts


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               cpu_collectives: str = "gloo") -> bool:
  """Joins the run's processes; returns True when jax.distributed was initialised."""
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR, "")
  if not num_processes and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id < 0 and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])

  explicit = bool(coordinator_address) and num_processes > 1
  if not explicit and not _in_cluster():
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if cpu_collectives and (platforms in ("cpu", "") or "cpu" in platforms.split(",")):
    # Cross-process collectives of CPU devices need an implementation (none by default).
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  if explicit:
    if process_id < 0:
      raise ValueError(f"{ENV_PROCESS_ID} / --process_id is required with a coordinator")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
  else:
    jax.distributed.initialize()  # TPU VM / SLURM / MPI auto-detection
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


class StopSignal:
  """Turns SIGTERM (TPU/cluster preemption) into a flag the training loop polls every step.

  With several processes the flag is OR-ed across them, so all stop at the same step and write
  the same checkpoint together.
  """

  def __init__(self, signals=(signal.SIGTERM,)):
    self._event = threading.Event()
    self._previous = {}
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. tests calling the loop from a thread)
        pass

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("received signal %d: checkpointing and stopping", signum)
    self._event.set()

  def should_stop(self, step: int, every: int = 10) -> bool:
    """Whether any process received the signal.

    With several processes this is a collective, so it runs only every `every` steps (the same
    steps everywhere): a host round trip per step would stall the device pipeline, and
    preemption notices leave tens of seconds.
    """
    flag = self._event.is_set()
    if jax.process_count() == 1:
      return flag
    if step % every:
      return False
    flags = multihost_utils.process_allgather(np.array([flag], np.int32))
    return bool(np.any(flags))

  def restore(self) -> None:
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

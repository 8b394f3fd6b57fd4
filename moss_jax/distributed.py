"""Multi-process start-up and the cross-process stop signal (preemption).

`initialize` joins the run's processes with `jax.distributed.initialize`. `--distributed`:
  auto  (default) join when the run spans several processes: explicit flags or the MOSS_JAX_*
        variables of launch/local.sh, else JAX's own cluster detection (Cloud TPU VM metadata,
        GKE TPU, SLURM, Open MPI, Kubernetes; `detect_cluster`). A laptop run needs nothing.
  on    always join (a single-host TPU VM too); an error when no cluster is found.
  off   never join: a single-process run even inside a cluster allocation.

Before handing over to JAX, the processes meet at a small rendezvous on the coordinator host
(the coordinator's port + 1, or MOSS_JAX_RENDEZVOUS_PORT): JAX's own start-up aborts the process
on a timeout without saying who is missing, this one raises a `StartupError` naming them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import threading
import time

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from moss_jax.errors import UserError

ENV_COORDINATOR = "MOSS_JAX_COORDINATOR"  # host:port of process 0
ENV_NUM_PROCESSES = "MOSS_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "MOSS_JAX_PROCESS_ID"
ENV_RENDEZVOUS_PORT = "MOSS_JAX_RENDEZVOUS_PORT"
MODES = ("auto", "on", "off")


class StartupError(UserError):
  """The processes of a multi-process run did not all start, or could not reach each other."""


@dataclasses.dataclass
class Cluster:
  """Where this process sits in the run, and who said so."""
  source: str  # "flags" (or MOSS_JAX_* variables), or JAX's cluster name: gcetpu, slurm, ...
  coordinator_address: str
  num_processes: int
  process_id: int
  local_device_ids: list[int] | None = None


def detect_cluster() -> str | None:
  """The name of the JAX cluster environment this process runs in (None outside any).

  Uses JAX's own list (the one `jax.distributed.initialize()` consults without arguments): Cloud
  TPU VMs ("gcetpu", found through the metadata server, not environment variables), GKE TPU
  ("gketpu"), SLURM ("slurm"), Open MPI ("ompi"), Kubernetes ("k8s"). Opt-in methods (mpi4py)
  are skipped, as JAX does.
  """
  from jax._src import clusters  # pylint: disable=g-import-not-at-top  # JAX's detection list (private)
  for env in clusters.ClusterEnv._cluster_types:  # pylint: disable=protected-access
    if env.opt_in_only_method:
      continue
    try:
      if env.is_env_present():
        return env.name
    except Exception as e:  # pylint: disable=broad-except  # a probe failing means "not here"
      logging.info("cluster probe %s failed: %s", env.name, e)
  return None


def resolve(mode: str = "auto", coordinator_address: str = "", num_processes: int = 0,
            process_id: int = -1, timeout_s: int = 300) -> Cluster | None:
  """Which processes make up the run (None: a single process, nothing to join)."""
  if mode not in MODES:
    raise UserError(f"--distributed={mode!r}: choose one of {', '.join(MODES)}")
  if mode == "off":
    return None
  coordinator_address = coordinator_address or os.environ.get(ENV_COORDINATOR, "")
  if not num_processes and os.environ.get(ENV_NUM_PROCESSES):
    num_processes = int(os.environ[ENV_NUM_PROCESSES])
  if process_id < 0 and os.environ.get(ENV_PROCESS_ID):
    process_id = int(os.environ[ENV_PROCESS_ID])
  if coordinator_address and num_processes >= 1:
    if not 0 <= process_id < num_processes:
      raise UserError(f"--process_id / {ENV_PROCESS_ID} must be in [0, {num_processes}) with a "
                      f"coordinator, got {process_id}")
    if num_processes == 1 and mode == "auto":
      return None
    return Cluster("flags", coordinator_address, num_processes, process_id)
  name = detect_cluster()
  if name is None:
    if mode == "on":
      raise StartupError(
          "--distributed=on but no cluster was found: pass --coordinator_address, "
          "--num_processes and --process_id, or start under a Cloud TPU VM slice, GKE, SLURM "
          "or Open MPI")
    return None
  from jax._src import clusters  # pylint: disable=g-import-not-at-top  # JAX's detection (private)
  address, count, pid, local_ids = clusters.ClusterEnv.auto_detect_unset_distributed_params(
      None, None, None, None, name, timeout_s)
  if mode == "auto" and (count or 1) <= 1:
    return None  # a single-host TPU VM or a 1-task allocation: nothing to join
  if local_ids and _tasks_per_node() == 1:
    # JAX assumes one process per GPU under SLURM / MPI and would hide all but one GPU; with one
    # task per node (launch/slurm.sbatch) the process drives all of the node's devices.
    local_ids = None
  return Cluster(name, address, int(count), int(pid), list(local_ids) if local_ids else None)


def _tasks_per_node() -> int | None:
  """Processes per node as SLURM or Open MPI report it (None when unknown)."""
  for var in ("SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE", "OMPI_COMM_WORLD_LOCAL_SIZE"):
    value = os.environ.get(var, "")
    digits = value.split("(")[0].split(",")[0]  # SLURM_TASKS_PER_NODE looks like "8(x4)"
    if digits.isdigit():
      return int(digits)
  return None


def _rendezvous_address(cluster: Cluster) -> tuple[str, int]:
  host, _, port = cluster.coordinator_address.rpartition(":")
  port = int(os.environ.get(ENV_RENDEZVOUS_PORT) or int(port) + 1)
  return host.strip("[]"), port


def rendezvous(cluster: Cluster, timeout_s: float) -> None:
  """Waits until every process has checked in with process 0; raises naming the missing ones."""
  host, port = _rendezvous_address(cluster)
  n, me = cluster.num_processes, cluster.process_id
  deadline = time.monotonic() + timeout_s
  where = f"the coordinator {host}:{port} (process 0; source: {cluster.source})"
  if me == 0:
    joined: dict[int, socket.socket] = {}
    try:
      server = socket.create_server(("", port))
    except OSError as e:
      raise StartupError(f"process 0 cannot listen on rendezvous port {port} ({e}); set "
                         f"{ENV_RENDEZVOUS_PORT} to a free port on every process") from None
    with server:
      while len(joined) < n - 1 and time.monotonic() < deadline:
        server.settimeout(max(0.1, min(1.0, deadline - time.monotonic())))
        try:
          conn, _ = server.accept()
        except socket.timeout:
          continue
        conn.settimeout(10)
        try:
          pid = int(conn.makefile().readline().strip())
        except (OSError, ValueError):
          conn.close()
          continue
        if pid in joined or not 0 < pid < n:
          conn.sendall(f"error process id {pid} is duplicated or not in [1, {n})\n".encode())
          conn.close()
          continue
        joined[pid] = conn
      missing = [p for p in range(1, n) if p not in joined]
      reply = "ok" if not missing else "missing " + ",".join(map(str, missing))
      for conn in joined.values():
        try:
          conn.sendall((reply + "\n").encode())
        except OSError:
          pass
        conn.close()
    if missing:
      raise StartupError(
          f"processes {', '.join(map(str, missing))} of {n} did not reach {where} within "
          f"{timeout_s:.0f} s (joined: 0{''.join(f', {p}' for p in sorted(joined))}). Start the "
          "same command on every host, or raise --distributed_timeout.")
    return
  while True:
    try:
      conn = socket.create_connection((host, port), timeout=5)
      break
    except OSError:
      if time.monotonic() > deadline:
        raise StartupError(f"process {me} of {n} could not reach {where} within "
                           f"{timeout_s:.0f} s: is process 0 running?") from None
      time.sleep(0.5)
  with conn:
    conn.sendall(f"{me}\n".encode())
    conn.settimeout(max(1.0, deadline - time.monotonic()) + 30)
    try:
      reply = conn.makefile().readline().strip()
    except OSError:
      reply = ""
  if reply != "ok":
    detail = reply.replace("missing ", "processes ") + " did not start" if reply else "no answer"
    raise StartupError(f"process {me} of {n}: start-up failed at {where}: {detail}")


def initialize(coordinator_address: str = "", num_processes: int = 0, process_id: int = -1,
               cpu_collectives: str = "gloo", mode: str = "auto", timeout_s: int = 300) -> bool:
  """Joins the run's processes; returns True when jax.distributed was initialised."""
  cluster = resolve(mode, coordinator_address, num_processes, process_id, timeout_s)
  if cluster is None:
    return False
  platforms = os.environ.get("JAX_PLATFORMS", "")
  if cpu_collectives and (platforms in ("cpu", "") or "cpu" in platforms.split(",")):
    # Cross-process collectives of CPU devices need an implementation (none by default).
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
  logging.info("joining %d processes as process %d via %s (coordinator %s)",
               cluster.num_processes, cluster.process_id, cluster.source,
               cluster.coordinator_address)
  if cluster.num_processes > 1:
    rendezvous(cluster, timeout_s)
  jax.distributed.initialize(coordinator_address=cluster.coordinator_address,
                             num_processes=cluster.num_processes, process_id=cluster.process_id,
                             local_device_ids=cluster.local_device_ids,
                             initialization_timeout=int(timeout_s))
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


class Stopped(BaseException):
  """Raised out of a wait that a stop signal interrupted (see StopSignal.interruptible).

  A BaseException like KeyboardInterrupt, so no `except Exception` on the way (a checkpoint
  restore trying older steps, a data pipeline) mistakes it for a failure of its own.
  """


class StopSignal:
  """Turns SIGTERM (TPU/cluster preemption) into a stop the training loop honours within seconds.

  A signal always sets a flag that the loop polls after every step, so a step in progress ends and
  its checkpoint is written. Where the process may be waiting without bound (set-up, which has
  nothing to save yet; the data loader, which may be reading a slow or failing source; evaluation),
  the code runs inside `interruptible()` and the signal raises `Stopped` there at once. A second
  signal ends the process immediately (status 128 + signal), whatever it is doing: the
  checkpoints on disk survive that like a kill -9.

  With several processes the flag is OR-ed across them, so all stop at the same step and write
  the same checkpoint together.
  """

  def __init__(self, signals=(signal.SIGTERM,), interruptible: bool = True):
    self._event = threading.Event()
    self._previous = {}
    self._interruptible = interruptible
    for sig in signals:
      try:
        self._previous[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. tests calling the loop from a thread)
        pass

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    if self._event.is_set():
      logging.warning("received signal %d again: exiting now", signum)
      logging.flush()
      os._exit(128 + signum)  # pylint: disable=protected-access
    self._event.set()
    if self._interruptible:
      logging.warning("received signal %d: stopping", signum)
      raise Stopped(signum)
    logging.warning("received signal %d: checkpointing and stopping", signum)

  def set_interruptible(self, value: bool) -> None:
    """Whether a signal interrupts the code now running (True) or waits for the next poll."""
    self._interruptible = value

  @contextlib.contextmanager
  def interruptible(self):
    """A wait a signal may cut short: raises Stopped at once if a stop is (or was) requested."""
    previous = self._interruptible
    if self._event.is_set():
      raise Stopped(signal.SIGTERM)
    self._interruptible = True
    try:
      yield
    finally:
      self._interruptible = previous

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

"""Multi-process start-up (moss_jax.distributed.initialize) in simulated clusters.

Each simulation starts two real processes on localhost that join through JAX's own cluster
detection, then run a cross-process collective:
  * SLURM: the SLURM_* variables srun sets (JAX's SlurmCluster).
  * Cloud TPU VM: a metadata server on localhost (GCE_METADATA_IP) answering the worker number and
    the worker endpoints, as a TPU VM's does (JAX's GceTpuCluster). JAX only probes it on a
    machine with TPU chips, so the probe script sets JAX's "running on a Cloud TPU VM" flag.
And the errors: a run whose other processes never start names them.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap

import pytest

from moss_jax import distributed
from test_train_helpers import REPO

PROBE = textwrap.dedent("""
    import http.server, os, sys, threading
    worker, tpu = int(sys.argv[1]), sys.argv[2] == "tpu"
    if tpu:
      class Metadata(http.server.BaseHTTPRequestHandler):
        ANSWERS = {"agent-worker-number": str(worker), "worker-network-endpoints": "127.0.0.1,127.0.0.1",
                   "tpu-env": ""}
        def do_GET(self):
          key = self.path.rsplit("/", 1)[-1]
          body = self.ANSWERS.get(key)
          self.send_response(200 if body is not None else 404)
          self.end_headers()
          self.wfile.write((body or "").encode())
        def log_message(self, *args):
          pass
      server = http.server.HTTPServer(("127.0.0.1", 0), Metadata)
      threading.Thread(target=server.serve_forever, daemon=True).start()
      os.environ["GCE_METADATA_IP"] = f"127.0.0.1:{server.server_port}"
      from jax._src.clusters import cloud_tpu_cluster, cluster
      # What importing JAX on a machine with TPU chips records (no chips here: it set the skip).
      cloud_tpu_cluster.running_in_cloud_tpu_vm = cluster.running_in_cloud_tpu_vm = True
      os.environ.pop("TPU_SKIP_MDS_QUERY", None)
    import jax, numpy as np
    from jax.experimental import multihost_utils
    from moss_jax import distributed
    print("detected", distributed.detect_cluster(), flush=True)
    assert distributed.initialize(timeout_s=60)
    ids = multihost_utils.process_allgather(np.array([jax.process_index()]))
    print("joined", jax.process_index(), jax.process_count(), sorted(ids.ravel().tolist()), flush=True)
""")


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _clean_env(**extra) -> dict:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("SLURM_", "OMPI_", "TPU_", "MOSS_JAX_", "MEGASCALE_"))}
  env.update(JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
             PYTHONPATH=REPO + os.pathsep + env.get("PYTHONPATH", ""))
  env.update(extra)
  return env


def _run_pair(kind: str, envs: list[dict]) -> list[str]:
  procs = [subprocess.Popen([sys.executable, "-c", PROBE, str(i), kind], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i, env in enumerate(envs)]
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=240)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      pytest.fail(f"{kind} start-up hung")
    assert p.returncode == 0, out[-2000:] + err[-4000:]
    outs.append(out)
  return outs


def test_slurm_environment_starts_through_jax_detection():
  port = _free_port()
  envs = [_clean_env(SLURM_JOB_ID="4242", SLURM_STEP_NODELIST="localhost", SLURM_NTASKS="2",
                     SLURM_PROCID=str(i), SLURM_LOCALID=str(i), JAX_COORDINATOR_PORT=str(port))
          for i in range(2)]
  outs = _run_pair("slurm", envs)
  for i, out in enumerate(outs):
    assert "detected slurm" in out, out
    assert f"joined {i} 2 [0, 1]" in out, out


def test_cloud_tpu_vm_starts_through_jax_detection():
  port = _free_port()
  envs = [_clean_env(JAX_COORDINATOR_PORT=str(port)) for _ in range(2)]
  outs = _run_pair("tpu", envs)
  for i, out in enumerate(outs):
    assert "detected gcetpu" in out, out
    assert f"joined {i} 2 [0, 1]" in out, out


def test_no_cluster_means_single_process(monkeypatch):
  for k in list(os.environ):
    if k.startswith(("SLURM_", "OMPI_", "MOSS_JAX_")):
      monkeypatch.delenv(k)
  assert distributed.resolve("auto") is None
  assert distributed.resolve("off", "127.0.0.1:1234", 2, 0) is None
  with pytest.raises(distributed.StartupError, match="no cluster was found"):
    distributed.resolve("on")
  with pytest.raises(distributed.UserError, match="choose one of auto, on, off"):
    distributed.resolve("sometimes")


def test_missing_processes_are_named():
  port = _free_port()
  cluster = distributed.Cluster("flags", f"127.0.0.1:{port}", 3, 0)
  with pytest.raises(distributed.StartupError, match=r"processes 1, 2 of 3 did not reach"):
    distributed.rendezvous(cluster, timeout_s=2)
  worker = distributed.Cluster("flags", f"127.0.0.1:{port}", 3, 2)
  with pytest.raises(distributed.StartupError, match=r"process 2 of 3 could not reach .* process 0"):
    distributed.rendezvous(worker, timeout_s=2)


def test_train_command_reports_missing_processes_in_one_line(tmp_path):
  port = _free_port()
  env = _clean_env(MOSS_JAX_COORDINATOR=f"127.0.0.1:{port}", MOSS_JAX_NUM_PROCESSES="2",
                   MOSS_JAX_PROCESS_ID="0")
  proc = subprocess.run([sys.executable, "-m", "moss_jax.train", "--config",
                         os.path.join(REPO, "configs", "pretrain.py") + ":demo",
                         "--workdir", str(tmp_path / "run"), "--distributed_timeout=3"],
                        env=env, capture_output=True, text=True, timeout=120)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "error: processes 1 of 2 did not reach the coordinator" in proc.stderr, proc.stderr[-3000:]

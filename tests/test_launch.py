"""launch/ scripts: --dry_run prints what would run, and arguments survive the remote shell."""

from __future__ import annotations

import os
import shlex
import subprocess

from test_train_helpers import REPO

LAUNCH = os.path.join(REPO, "launch")
TRICKY = ["--config.data.train_manifests=/data/a b.jsonl,/data/c.jsonl", "$(touch /tmp/pwned)",
          "it's", 'say "hi"; exit 1']


def _dry_run(script: str, *args: str, **env) -> str:
  proc = subprocess.run(["bash", os.path.join(LAUNCH, script), "--dry_run", *args],
                        env=dict(os.environ, **env), capture_output=True, text=True, timeout=60)
  assert proc.returncode == 0, proc.stderr
  return proc.stdout


def _argv_in_shell(command: str) -> list[str]:
  """The argv `python3` gets when a POSIX shell runs `command` (cd and python3 intercepted)."""
  script = ('cd() { :; }; python3() { printf "%s\\0" "$@"; }; ' + command)
  out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=30,
                       check=True).stdout
  return out.split("\0")[:-1]


def test_tpu_vm_dry_run_quotes_every_argument_for_the_remote_shell():
  out = _dry_run("tpu_vm.sh", "configs/pretrain.py:4b_stage1", *TRICKY, TPU="my tpu",
                 ZONE="us-east5-a", BUCKET="gs://bucket/")
  remote_line, gcloud_line = out.strip().splitlines()
  remote = remote_line.removeprefix("# on every worker: ")
  assert _argv_in_shell(remote) == [
      "-m", "moss_jax.train", "--config", "configs/pretrain.py:4b_stage1", "--workdir",
      "gs://bucket/runs/pretrain_4b_stage1", *TRICKY]
  gcloud = shlex.split(gcloud_line)
  assert gcloud[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "my tpu"]
  assert gcloud[gcloud.index("--command") + 1] == remote  # one argument, passed intact
  assert not os.path.exists("/tmp/pwned")


def test_slurm_dry_run_prints_the_srun_command():
  out = _dry_run("slurm.sbatch", *TRICKY, CONFIG="configs/pretrain.py:8b", WORKDIR="/shared/r 1")
  argv = shlex.split(out)
  assert argv[:2] == ["srun", "--kill-on-bad-exit=1"]
  assert argv[argv.index("--workdir") + 1] == "/shared/r 1"
  assert "--distributed=on" in argv and argv[-len(TRICKY):] == TRICKY


def test_local_dry_run_prints_one_command_per_process():
  out = _dry_run("local.sh", "2", "4", "python", "-m", "moss_jax.train", "--workdir", "/tmp/a b",
                 LOG_DIR="/tmp/moss logs")
  lines = out.strip().splitlines()
  assert len(lines) == 2
  for i, line in enumerate(lines):
    argv = shlex.split(line.rstrip("&"))
    assert f"MOSS_JAX_PROCESS_ID={i}" in argv and "MOSS_JAX_NUM_PROCESSES=2" in argv
    assert argv[argv.index("--workdir") + 1] == "/tmp/a b"
  assert "/tmp/moss\\ logs/moss_jax_process_1.log" in lines[1]

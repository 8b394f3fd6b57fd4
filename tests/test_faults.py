"""Faults injected into real `python -m moss_jax.train` runs (issue 8): each must end in one
clear line and a non-zero exit, or a recovery, never a spin, a lost checkpoint or a traceback.

Each run is a subprocess on the shipped sample corpus with the tiny model of test_train_helpers;
the runs share a JAX compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import time

import pytest

from moss_jax import checkpoint
from moss_jax import workdir_lock
from test_train_helpers import (read_metrics, run_config, train_command, train_env,
                                write_run_config)

pytestmark = pytest.mark.slow

TIMEOUT = 600  # a hang detector, not a speed requirement


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _run(cmd, env, **kwargs) -> subprocess.CompletedProcess:
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=TIMEOUT, **kwargs)


def _ok(proc):
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  return proc


def _error_line(proc) -> str:
  """The one `error: ...` line of a failed run (and there is exactly one, with no traceback)."""
  assert "Traceback" not in proc.stderr, proc.stderr[-5000:]
  lines = [l for l in proc.stderr.splitlines() if l.startswith("error: ")]
  assert len(lines) == 1, proc.stderr[-5000:]
  return lines[0]


def _bad_manifest(path, n: int) -> str:
  with open(path, "w", encoding="utf-8") as f:
    for i in range(n):
      f.write(json.dumps({"task": "asr", "audio": f"no_such_dir/clip_{i}.flac", "text": "hi"}) + "\n")
  return str(path)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, cache_dir):
  """A finished 4-step run with checkpoints at steps 2 and 4 (copy it before changing it)."""
  root = tmp_path_factory.mktemp("trained")
  cfg = write_run_config(root, train__steps=4, train__checkpoint_every=2)
  workdir = str(root / "run")
  _ok(_run(train_command(cfg, workdir), train_env(cache_dir)))
  assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == [2, 4]
  return workdir


def _copy_run(trained, tmp_path) -> str:
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  return workdir


# ----------------------------------------------------------------------------- no progress


def test_too_small_max_tokens_stops_with_the_reason(tmp_path, cache_dir):
  cfg = write_run_config(tmp_path, data__max_tokens=16)
  proc = _run(train_command(cfg, str(tmp_path / "run")), train_env(cache_dir))
  assert proc.returncode == 2
  line = _error_line(proc)
  assert "no usable training record" in line and "does_not_fit" in line
  assert "data.max_tokens" in line
  # The warnings are rate-limited, not one per record per retry.
  assert proc.stderr.count("skipping record") < 40


def test_all_bad_manifest_stops_with_the_reason(tmp_path, cache_dir):
  manifest = _bad_manifest(tmp_path / "bad.jsonl", 50)
  cfg = write_run_config(tmp_path, data__train_manifests=manifest)
  proc = _run(train_command(cfg, str(tmp_path / "run")), train_env(cache_dir))
  assert proc.returncode == 2
  line = _error_line(proc)
  assert "no usable training record" in line and "missing_file 50" in line
  assert "bad.jsonl:" in line  # names a record


def test_sigterm_stops_a_run_stuck_on_rejected_records(tmp_path, cache_dir):
  # Enough bad records that rejecting them all takes far longer than the signal needs.
  manifest = _bad_manifest(tmp_path / "bad.jsonl", 400_000)
  cfg = write_run_config(tmp_path, data__train_manifests=manifest)
  proc = subprocess.Popen(train_command(cfg, str(tmp_path / "run")), env=train_env(cache_dir),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  for line in proc.stderr:  # wait until it is reading (and rejecting) records
    if "skipping record" in line:
      break
  proc.send_signal(signal.SIGTERM)
  t0 = time.monotonic()
  out, err = proc.communicate(timeout=TIMEOUT)
  waited = time.monotonic() - t0
  assert proc.returncode == 0, err[-3000:]
  assert "stopped by signal" in out
  assert "no usable training record" not in err, f"it ran to the end ({waited:.0f} s)"
  assert not os.path.exists(tmp_path / "run" / "checkpoints" / "0")


@pytest.mark.parametrize("sig,code,message", [
    (signal.SIGTERM, 0, "stopped by signal"), (signal.SIGINT, 130, "interrupted")])
def test_a_signal_while_the_start_compiles_ends_cleanly(tmp_path, sig, code, message):
  """A stop (preemption's SIGTERM, Ctrl-C) while the parameter init and the train step compile:
  no traceback (SIGTERM in the init was an uncaught Stopped), no crash at exit (the teardown under
  an unfinished compile was a SIGSEGV), the workdir free for the rerun."""
  cfg = write_run_config(tmp_path)
  # An empty cache of its own: the run compiles, as a first run does.
  env = train_env(str(tmp_path / "empty_cache"), PYTHONUNBUFFERED="1")
  workdir = tmp_path / "run"
  proc = subprocess.Popen(train_command(cfg, str(workdir)), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  deadline = time.monotonic() + TIMEOUT
  while not (workdir / "checkpoints").exists():  # made at the end of set-up, as compiles start
    assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
    time.sleep(0.02)
  proc.send_signal(sig)
  out, err = proc.communicate(timeout=TIMEOUT)
  assert proc.returncode == code, err[-3000:]
  assert message in out + err
  assert "Traceback" not in err and "Fatal Python error" not in err, err[-3000:]
  assert not checkpoint.complete_steps(str(workdir / "checkpoints"))
  _ok(_run(train_command(write_run_config(tmp_path / "again", train__steps=2), str(workdir)),
           env))


def test_sigterm_during_the_parameter_init_stops_before_the_first_step(tmp_path, monkeypatch):
  """In-process, a real SIGTERM delivered as restore_or_init starts (where the init compiles):
  the run reports a clean stop instead of raising Stopped out of train()."""
  from moss_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  run = train_lib.Run(run_config({"train.steps": 2}), str(tmp_path / "run"))
  try:
    real_init = run.restore_or_init

    def init_after_a_signal():
      os.kill(os.getpid(), signal.SIGTERM)  # StopSignal's handler raises Stopped right here
      return real_init()

    monkeypatch.setattr(run, "restore_or_init", init_after_a_signal)
    result = run.train()
  finally:
    run.close()
  assert result["preempted"] and not result["started"] and result["step"] == 0
  assert not checkpoint.complete_steps(str(tmp_path / "run" / "checkpoints"))
  assert signal.getsignal(signal.SIGTERM) != run.stop._handle  # restored by close()


# ----------------------------------------------------------------------------- checkpoints


def _truncate_newest(workdir: str, step: int) -> None:
  """Cuts every array data file of a step's state in half (a disk that lost its tail)."""
  cut = 0
  for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      if size > 1000:
        with open(path, "r+b") as f:
          f.truncate(size // 2)
        cut += 1
  assert cut, "no data file to truncate"


def test_truncated_newest_checkpoint_is_set_aside_once(trained, tmp_path, cache_dir):
  workdir = _copy_run(trained, tmp_path)
  ckpts = os.path.join(workdir, "checkpoints")
  _truncate_newest(workdir, 4)
  env = train_env(cache_dir)
  cfg = write_run_config(tmp_path, train__steps=4, train__checkpoint_every=2)
  first = _ok(_run(train_command(cfg, workdir), env))
  assert "resumed from step 2" in first.stdout
  assert "Event loop is closed" not in first.stderr
  aside = [p for p in os.listdir(ckpts) if p.startswith("4.unreadable-")]
  assert len(aside) == 1, os.listdir(ckpts)
  assert checkpoint.complete_steps(ckpts) == [2, 4]  # step 4 redone and saved afresh
  # Each step appears once in metrics.jsonl although steps 3-4 ran twice.
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    steps = [json.loads(l)["step"] for l in f if json.loads(l)["split"] == "train"]
  assert steps == [1, 2, 3, 4]

  cfg6 = write_run_config(tmp_path / "six", train__steps=6, train__checkpoint_every=2)
  second = _ok(_run(train_command(cfg6, workdir), env))
  assert "resumed from step 4" in second.stdout
  assert "cannot be read" not in second.stderr
  assert [p for p in os.listdir(ckpts) if "unreadable" in p] == aside


def test_model_change_on_resume_is_named_and_changes_nothing(trained, tmp_path, cache_dir):
  workdir = _copy_run(trained, tmp_path)
  before = {p: os.path.getmtime(os.path.join(workdir, "checkpoints", p))
            for p in os.listdir(os.path.join(workdir, "checkpoints"))}
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config_json = f.read()
  cfg = write_run_config(tmp_path, train__steps=6, train__checkpoint_every=2,
                         model__text__intermediate_size=96)
  proc = _run(train_command(cfg, workdir), train_env(cache_dir))
  assert proc.returncode == 2
  _error_line(proc)
  assert "model.text.intermediate_size: 64 in the checkpoint, 96 now" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) < 30, proc.stderr
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    assert f.read() == config_json
  after = {p: os.path.getmtime(os.path.join(workdir, "checkpoints", p))
           for p in os.listdir(os.path.join(workdir, "checkpoints"))}
  assert after == before


# ----------------------------------------------------------------------------- the workdir


def test_second_run_on_a_locked_workdir_refuses(trained, tmp_path, cache_dir):
  workdir = _copy_run(trained, tmp_path)
  cfg = write_run_config(tmp_path, train__steps=6, train__checkpoint_every=2)
  holder = workdir_lock.WorkdirLock(workdir)  # a live run's lock (this process)
  try:
    proc = _run(train_command(cfg, workdir), train_env(cache_dir))
  finally:
    holder.release()
  assert proc.returncode == 2
  line = _error_line(proc)
  assert "in use by another training run" in line and f"pid {os.getpid()}" in line
  assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints")) == [2, 4]
  # The holder gone (its lock file left behind, as after a kill -9), the run takes over.
  assert os.path.exists(os.path.join(workdir, "lock"))
  proc = _ok(_run(train_command(cfg, workdir), train_env(cache_dir)))
  assert "resumed from step 4" in proc.stdout


def _mount_tmpfs(path, size_kb: int) -> bool:
  os.makedirs(path, exist_ok=True)
  try:
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(path)],
                          capture_output=True, timeout=30)
  except (OSError, subprocess.TimeoutExpired):
    return False
  return done.returncode == 0


def _limit_file_size(limit: int):
  def preexec():
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
  return preexec


def test_full_disk_stops_at_the_failed_save_and_keeps_the_last_good(trained, tmp_path, cache_dir):
  """The disk fills between two saves: the failed one is named with the last good checkpoint.

  A small tmpfs filled up to a few KB where the test may mount one; otherwise a file-size limit
  (RLIMIT_FSIZE) on the run that the checkpoint's data file exceeds.
  """
  mnt = tmp_path / "disk"
  ckpt_bytes = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in
                   os.walk(os.path.join(trained, "checkpoints", "4")) for f in fs)
  mounted = _mount_tmpfs(mnt, size_kb=4 * ckpt_bytes // 1024 + 4096)
  try:
    workdir = str(mnt / "run") if mounted else str(tmp_path / "run")
    shutil.copytree(trained, workdir)
    shutil.rmtree(os.path.join(workdir, "tensorboard"), ignore_errors=True)
    preexec = None
    if mounted:
      free = shutil.disk_usage(mnt).free
      with open(mnt / "filler", "wb") as f:  # leaves room for metrics, not for a checkpoint
        f.write(b"\0" * max(0, free - 48 * 1024))
    else:
      preexec = _limit_file_size(min(ckpt_bytes // 4, 256 * 1024))
    cfg = write_run_config(tmp_path, train__steps=30, train__checkpoint_every=2,
                           train__async_checkpoint=True)
    proc = _run(train_command(cfg, workdir), train_env(cache_dir), preexec_fn=preexec)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-4000:]
    line = _error_line(proc)
    assert "saving checkpoint step 6" in line, line
    assert "The last good checkpoint is step 4" in line
    assert ("No space left on device" in line) if mounted else ("File too large" in line), line
    # It stopped at the failure, by the next save at the latest, not at the end (step 30).
    assert max(read_metrics(workdir)) <= 8
    assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints"))[-1] == 4
  finally:
    if mounted:
      subprocess.run(["umount", "-l", str(mnt)], check=False)


# ----------------------------------------------------------------------------- one-line mistakes


@pytest.mark.parametrize("flags, expected", [
    (["--config.data.max_tokenz=64"], "unknown config field 'max_tokenz' in --config.data.max_tokenz"),
    (["--config.train.steps=many"], "--config.train.steps=many"),
    (["--config.data.tokenizer.kind=hf"], "set data.tokenizer.kind=sentencepiece"),
    (["--config.data.train_manifests={empty}"], "manifest(s) with no records"),
])
def test_command_line_mistakes_are_one_line(tmp_path, cache_dir, flags, expected):
  empty = tmp_path / "empty.jsonl"
  empty.write_text("")
  cfg = write_run_config(tmp_path)
  flags = [f.format(empty=empty) for f in flags]
  proc = _run(train_command(cfg, str(tmp_path / "run"), *flags), train_env(cache_dir))
  assert proc.returncode == 2
  assert expected in _error_line(proc)


def test_missing_config_file_is_one_line(tmp_path, cache_dir):
  proc = _run(train_command(str(tmp_path / "nope.py"), str(tmp_path / "run")), train_env(cache_dir))
  assert proc.returncode == 2
  assert "nope.py" in _error_line(proc)

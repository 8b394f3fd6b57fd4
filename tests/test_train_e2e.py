"""`python -m moss_jax.train` as users run it: kill -9 and resume, SIGTERM, divergence, config errors.

Each run is a subprocess on the shipped sample corpus with a tiny model; the runs share a JAX
compilation cache, so only the first one compiles.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from moss_jax import checkpoint
from moss_jax import sharding
from moss_jax import train_step as ts
from test_train_helpers import (REPO, read_metrics, run_config, train_command, train_env,
                                write_run_config)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("jax_cache"))


def _run(cmd, env, timeout=600) -> subprocess.CompletedProcess:
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
  return proc


def _check_ok(proc):
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]


def _final_params(workdir: str, step: int):
  config = run_config()
  mesh = sharding.make_mesh(config.mesh)
  abstract = ts.abstract_params_with_shardings(config.model, mesh)
  return jax.device_get(checkpoint.restore_params(os.path.join(workdir, "checkpoints"), abstract,
                                                  step=step))


def _wait_for(predicate, proc, timeout=600.0, what=""):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      out, err = proc.communicate()
      pytest.fail(f"run ended (rc {proc.returncode}) before {what}: {out[-2000:]}{err[-4000:]}")
    if time.time() - t0 > timeout:
      proc.kill()
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.05)


def test_kill_9_then_resume_is_bit_identical(tmp_path, cache_dir):
  steps = 16
  cfg = write_run_config(tmp_path, train__steps=steps, train__checkpoint_every=4)
  env = train_env(cache_dir)
  straight, broken = str(tmp_path / "straight"), str(tmp_path / "broken")
  _check_ok(_run(train_command(cfg, straight), env))
  # Saved every 4 steps, the last train.keep_checkpoints (3) kept.
  assert checkpoint.complete_steps(os.path.join(straight, "checkpoints")) == [8, 12, 16]

  proc = subprocess.Popen(train_command(cfg, broken), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  ckpts = os.path.join(broken, "checkpoints")
  _wait_for(lambda: checkpoint.complete_steps(ckpts), proc, what="the first checkpoint")
  os.kill(proc.pid, signal.SIGKILL)
  proc.communicate()
  killed_at = max(read_metrics(broken))
  assert killed_at < steps, "the run finished before it was killed"
  assert max(checkpoint.complete_steps(ckpts)) < steps

  resumed = _run(train_command(cfg, broken), env)
  _check_ok(resumed)
  assert "resumed from step" in resumed.stdout
  a, b = _final_params(straight, steps), _final_params(broken, steps)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y)
  # The losses after the resume point match the uninterrupted run's too.
  la, lb = read_metrics(straight), read_metrics(broken)
  for step in range(killed_at + 1, steps + 1):
    assert la[step]["loss"] == lb[step]["loss"], step

  # The trained run answers through `python -m moss_jax.generate`.
  clip = os.path.join(REPO, "data_pipelines", "sample_corpus", "audio", "train_speech_001.flac")
  gen = _run([sys.executable, "-m", "moss_jax.generate", "--checkpoint", straight, "--audio", clip,
              "--max_new_tokens", "4"], env)
  _check_ok(gen)
  assert gen.stdout.startswith(clip + "\t")


def test_sigterm_writes_a_checkpoint_and_resume_continues(tmp_path, cache_dir):
  cfg = write_run_config(tmp_path, train__steps=10_000, train__checkpoint_every=0)
  env = train_env(cache_dir)
  workdir = str(tmp_path / "run")
  proc = subprocess.Popen(train_command(cfg, workdir), env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  _wait_for(lambda: os.path.exists(metrics_path) and len(read_metrics(workdir)) >= 2, proc,
            what="two logged steps")
  os.kill(proc.pid, signal.SIGTERM)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-4000:]
  assert "stopped by signal" in out
  saved = checkpoint.complete_steps(os.path.join(workdir, "checkpoints"))
  assert len(saved) == 1 and 2 <= saved[0] < 10_000
  stop = saved[0]

  cfg2 = write_run_config(tmp_path / "more", train__steps=stop + 2, train__checkpoint_every=0)
  resumed = _run(train_command(cfg2, workdir), env)
  _check_ok(resumed)
  assert f"resumed from step {stop}" in resumed.stdout
  assert checkpoint.complete_steps(os.path.join(workdir, "checkpoints"))[-1] == stop + 2


def test_run_that_keeps_diverging_stops_with_a_clear_message(tmp_path, cache_dir):
  cfg = write_run_config(tmp_path, optim__lr=1e30, optim__warmup_steps=0, optim__clip_norm=0.0,
                         train__steps=40, train__max_consecutive_skips=3)
  proc = _run(train_command(cfg, str(tmp_path / "run")), train_env(cache_dir))
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "consecutive updates had a non-finite loss or gradient" in proc.stderr
  skipped = [r for r in read_metrics(str(tmp_path / "run")).values() if r["skipped_total"]]
  assert skipped, "skipped updates were not counted in the metrics"


def test_bad_config_fails_fast_with_every_problem(tmp_path, cache_dir):
  cfg = write_run_config(tmp_path)
  proc = _run(train_command(cfg, str(tmp_path / "run"), "--config.data.batch_size=6",
                            "--config.train.stage=everything"), train_env(cache_dir))
  assert proc.returncode == 2
  assert "micro-batch of 6 rows" in proc.stderr and "train.stage='everything'" in proc.stderr
  assert not os.path.exists(tmp_path / "run" / "checkpoints")


def test_a_rerun_in_a_new_workdir_takes_its_programs_from_the_users_cache(tmp_path):
  """Without a configured cache, local runs share the user's compilation cache: the same
  program run again in a fresh workdir loads the train step instead of compiling it."""
  cfg = write_run_config(tmp_path, train__steps=2, train__checkpoint_every=0)
  env = train_env("")
  del env["JAX_COMPILATION_CACHE_DIR"]
  env.update(MOSS_JAX_CACHE_DIR=str(tmp_path / "user_cache"), JAX_LOG_COMPILES="1")
  first = _run(train_command(cfg, str(tmp_path / "a")), env)
  _check_ok(first)
  entries = os.listdir(tmp_path / "user_cache" / "xla")
  assert any(e.startswith("jit_train_step-") for e in entries), entries
  assert not (tmp_path / "a" / "compilation_cache").exists()
  assert "Persistent compilation cache hit for 'jit_train_step'" not in first.stderr
  second = _run(train_command(cfg, str(tmp_path / "b")), env)
  _check_ok(second)
  assert "Persistent compilation cache hit for 'jit_train_step'" in second.stderr, (
      second.stderr[-4000:])

"""`python -m moss_jax.plan`: compiles a tiny config's train step for forced CPU devices and
reports per-device memory as JSON; bad flags give one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moss_jax import plan
from moss_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [f"--config.model.{k}={v}" for k, v in (
    ("audio.d_model", 32), ("audio.encoder_layers", 1), ("audio.encoder_attention_heads", 2),
    ("audio.encoder_ffn_dim", 64), ("audio.downsample_hidden_size", 8),
    ("text.vocab_size", 64), ("text.hidden_size", 32), ("text.intermediate_size", 64),
    ("text.num_hidden_layers", 1), ("text.num_attention_heads", 2),
    ("text.num_key_value_heads", 2), ("text.head_dim", 16), ("adapter_hidden_size", 64))] + [
    "--config.model.audio.deepstack_encoder_layer_indexes=(0,)",
    "--config.data.max_tokens=64", "--config.data.max_audio_chunks=1",
    "--config.data.max_audio_seconds=4", "--config.data.feature_mode=mel"]


def _run(*args: str) -> subprocess.CompletedProcess:
  env = dict(os.environ, PYTHONPATH=REPO)
  env.pop("XLA_FLAGS", None)  # the planner must set the device count itself
  return subprocess.run([sys.executable, "-m", "moss_jax.plan", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=900)


@pytest.mark.slow
def test_plan_reports_per_device_memory_as_json():
  res = _run("--config", "configs/pretrain.py:demo", *TINY, "--devices", "4",
             "--mesh", "fsdp=2,tensor=2", "--device_memory", "64KiB", "--json")
  assert res.returncode == 0, res.stderr[-3000:]
  out = json.loads(res.stdout.strip().splitlines()[-1])
  assert out["devices"] == 4 and out["mesh"] == {"data": 1, "fsdp": 2, "tensor": 2}
  for key in ("params", "optimizer", "temp", "total", "arguments"):
    assert isinstance(out[key], int) and out[key] > 0, key
  # AdamW keeps two moments shaped and sharded like the trainable (here: all) parameters.
  assert abs(out["optimizer"] - 2 * out["params"]) <= 64
  assert out["arguments"] >= out["params"] + out["optimizer"]
  assert out["total"] == out["arguments"] + out["outputs"] + out["temp"]
  assert out["fits"] is (out["total"] <= 64 * 1024) and out["fits"] is False
  assert out["compile_seconds"] > 0 and "approximate" in out["note"]
  assert out["attention"] == "blockwise"  # auto on a CPU compile
  assert out["conv_stem_impl"] == "conv"  # auto as on TPU / GPU, not CPU's matmul backward


def test_plan_flag_errors_are_one_line():
  res = _run("--config", "configs/pretrain.py:demo", "--devices", "8", "--mesh", "fsdp=3")
  assert res.returncode == 2
  assert res.stderr.strip().splitlines()[-1] == (
      "error: --mesh='fsdp=3' covers 3 devices, --devices is 8")


def test_parsers():
  assert plan.parse_bytes("95GiB") == 95 * 2**30
  assert plan.parse_bytes("16 GiB") == 16 * 2**30
  assert plan.parse_bytes("80GB") == 80 * 10**9
  with pytest.raises(UserError, match="--device_memory"):
    plan.parse_bytes("lots")
  assert plan.parse_mesh("fsdp=8,tensor=2", 16) == (1, 8, 2)
  assert plan.parse_mesh(None, 8) == (1, 8, 1)
  assert plan.parse_mesh("data=2,fsdp=4", 8) == (2, 4, 1)
  with pytest.raises(UserError, match="axis=size"):
    plan.parse_mesh("pipeline=8", 8)


def test_child_environment_forces_devices_and_memory_scheduler():
  env = plan.child_environment(8, {"XLA_FLAGS": "--xla_force_host_platform_device_count=2 "
                                                "--xla_dump_to=/tmp/d", "HOME": "/h"})
  flags = env["XLA_FLAGS"].split()
  assert flags.count("--xla_force_host_platform_device_count=8") == 1
  assert "--xla_force_host_platform_device_count=2" not in flags
  assert "--xla_dump_to=/tmp/d" in flags and env["HOME"] == "/h"
  assert f"--xla_cpu_scheduler_type={plan.CPU_SCHEDULER}" in flags
  assert env["JAX_PLATFORMS"] == "cpu"
  # A scheduler the user chose stays.
  mine = "--xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_CONCURRENCY_OPTIMIZED"
  assert plan.child_environment(8, {"XLA_FLAGS": mine})["XLA_FLAGS"].count("scheduler_type") == 1


def test_plan_compiles_the_accelerators_conv_stem():
  from configs import pretrain
  config = pretrain.get_config("demo")
  assert plan.as_on_accelerator(config).model.audio.conv_stem_impl == "conv"
  assert config.model.audio.conv_stem_impl == "auto"  # the caller's config is left as it was
  config.model.audio.conv_stem_impl = "conv_matmul_bwd"
  assert plan.as_on_accelerator(config).model.audio.conv_stem_impl == "conv_matmul_bwd"

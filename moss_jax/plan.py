"""Will a config fit? Compile the real train step for N devices ahead of time and read its memory.

  python -m moss_jax.plan --config configs/pretrain.py:8b --devices 256 --mesh fsdp=64,tensor=4 \\
      [--config.data.batch_size=256 ...] [--device_memory 95GiB] [--json] [--search]

The step is lowered from abstract shapes (ShapeDtypeStruct with shardings: no parameter, optimizer
moment or batch is allocated) for N forced host (CPU) devices on the given mesh and compiled; the
compiler's `memory_analysis()` gives the per-device temporary buffers and the arguments, and the
state's shardings give the bytes of parameters and optimizer state per device. With `--search`
it also tries the remat policies and gradient-accumulation splits and names the cheapest setting
that fits under --device_memory.

The figures come from XLA:CPU's compile of the same program, which approximate, and do not equal,
what XLA:TPU or XLA:GPU allocate (fusion, layouts, collectives and scheduling differ); keep a
margin. `model.attention=auto` means the blockwise attention here (a CPU compile), whose memory
is close to the splash (TPU) and cuDNN (GPU) kernels'. Two CPU-only choices are set aside so the
figure tracks an accelerator's: XLA:CPU's concurrency-first scheduler (the compile uses its
memory-optimized one, `child_environment`) and the conv stem's CPU-only matmul backward pass
(`as_on_accelerator`).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from absl import flags
from ml_collections import config_flags

from moss_jax import cli, config_validation, sharding
from moss_jax import train_step as ts
from moss_jax.errors import UserError
from moss_jax.model import attention

def define_flags() -> dict[str, Any]:
  """The command's flags; defined only when run as a program, so that importing this module
  (tests, notebooks) next to `moss_jax.train`, which has a --config of its own, is harmless."""
  return dict(
      config=config_flags.DEFINE_config_file(
          "config", None, "Config file, e.g. configs/pretrain.py:8b.", lock_config=False),
      devices=flags.DEFINE_integer("devices", None,
                                   "Number of devices to plan for (forced CPU devices)."),
      mesh=flags.DEFINE_string("mesh", None, "Mesh axis sizes, e.g. fsdp=64,tensor=4[,data=1]; "
                               "axes not named are 1 (default: fsdp=<devices>)."),
      device_memory=flags.DEFINE_string(
          "device_memory", "95GiB", "Memory of one device: 95GiB, 16GiB, 80GB, 17179869184."),
      json=flags.DEFINE_bool("json", False, "Print one JSON object instead of a table."),
      search=flags.DEFINE_bool("search", False, "Try remat policies and grad_accum splits; print "
                               "the cheapest setting that fits (one compile per setting tried)."))


_FLAGS: dict[str, Any] = {}

# Set by the parent in the environment of the re-executed child (see `_reexec_with_devices`).
_CHILD_ENV = "MOSS_JAX_PLAN_DEVICES"
# XLA:CPU's memory-minimising scheduler for the planned compile (see `child_environment`).
CPU_SCHEDULER = "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"
CPU_NOTE = ("memory figures are from an XLA:CPU compile: they approximate, and do not equal, what "
            "XLA:TPU / XLA:GPU allocate for the same program; keep a margin")
# Remat policies from least to most recomputation, with the rough step-time factor of each
# (a full remat recomputes the forward: 4/3 of a step without it).
REMAT_COST = {"none": 1.0, "dots_no_batch": 1.15, "dots": 1.2, "full": 1.33}
_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str) -> int:
  """'95GiB' / '16 GiB' / '80GB' / '1e9' -> bytes."""
  m = re.fullmatch(r"\s*([0-9.eE+]+)\s*([a-zA-Z]*)\s*", str(text))
  if not m or m.group(2).lower() not in _UNITS:
    raise UserError(f"--device_memory={text!r}: write a size such as 95GiB, 16GiB or 80GB")
  return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def parse_mesh(text: str | None, devices: int) -> tuple[int, int, int]:
  """'fsdp=8,tensor=2' -> (data, fsdp, tensor); the product must be `devices`."""
  sizes = {"data": 1, "fsdp": 1, "tensor": 1}
  if not text:
    sizes["fsdp"] = devices
  else:
    for part in text.split(","):
      name, _, value = part.partition("=")
      name = name.strip()
      if name not in sizes or not value.strip().isdigit() or int(value) < 1:
        raise UserError(f"--mesh={text!r}: write axis=size pairs over data, fsdp and tensor, "
                        "e.g. fsdp=64,tensor=4")
      sizes[name] = int(value)
  shape = (sizes["data"], sizes["fsdp"], sizes["tensor"])
  if math.prod(shape) != devices:
    raise UserError(f"--mesh={text!r} covers {math.prod(shape)} devices, --devices is {devices}")
  return shape


def gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def _per_device_bytes(tree: Any) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs carrying shardings."""
  total = 0
  for leaf in jax.tree.leaves(tree):
    shape = leaf.sharding.shard_shape(leaf.shape) if leaf.sharding is not None else leaf.shape
    total += int(np.prod(shape, dtype=np.int64)) * np.dtype(leaf.dtype).itemsize
  return total


def as_on_accelerator(config):
  """config with the CPU-dependent `auto` choices resolved as TPU and GPU resolve them.

  The plan is for an accelerator, compiled on CPU: `model.audio.conv_stem_impl=auto` would pick
  the stem's matmul backward pass there (faster on XLA:CPU), whose float32 [chunks, 9 x
  channels] tap matrices are temporary buffers an accelerator's convolution gradients do not
  need; TPU and GPU run `lax.conv` and its gradients (auto picks 'conv' there), so the plan
  compiles that. An explicit choice stays.
  """
  config = config.copy_and_resolve_references()
  if config.model.audio.get("conv_stem_impl", "auto") == "auto":
    config.model.audio.conv_stem_impl = "conv"
  return config


def plan_once(config, device_memory: int) -> dict[str, Any]:
  """Compiles config's train step on config.mesh over the visible devices; per-device bytes."""
  config = as_on_accelerator(config)
  mesh = sharding.make_mesh(config.mesh)
  start = time.perf_counter()
  prog = ts.build_program(config, mesh)
  with sharding.use_mesh(mesh):
    compiled = prog.train_step.lower(prog.abstract_state, prog.abstract_batch).compile()
  seconds = time.perf_counter() - start
  ma = compiled.memory_analysis()
  state = prog.abstract_state
  params = _per_device_bytes(state["params"]) + _per_device_bytes(state["frozen"])
  optimizer = _per_device_bytes(state["opt_state"])
  batch = _per_device_bytes(prog.abstract_batch)
  arguments = int(ma.argument_size_in_bytes)
  # The new state is written over the donated old one (aliased): only outputs beyond it count.
  outputs = max(int(ma.output_size_in_bytes) - int(ma.alias_size_in_bytes), 0)
  temp = int(ma.temp_size_in_bytes)
  total = arguments + outputs + temp
  return {
      "devices": jax.device_count(),
      "mesh": dict(zip(sharding.MESH_AXES, (int(s) for s in mesh.devices.shape))),
      "rows": int(config.data.batch_size), "tokens": int(config.data.max_tokens),
      "audio_chunks": int(config.data.max_audio_chunks),
      "remat_policy": config.model.remat_policy, "grad_accum": int(config.train.grad_accum),
      "attention": attention.resolve(config.model.get("attention", "auto"), config.model.dtype),
      "conv_stem_impl": config.model.audio.conv_stem_impl,
      "params": params, "optimizer": optimizer, "batch": batch, "arguments": arguments,
      "outputs": outputs, "temp": temp, "total": total, "device_memory": device_memory,
      "fits": total <= device_memory, "compile_seconds": round(seconds, 1),
      "note": CPU_NOTE,
  }


def search(config, device_memory: int, log=print) -> tuple[dict | None, list[dict]]:
  """Tries remat policies (least recompute first) x grad_accum (1, 2, 4, ...: fewer micro-batches
  first) and returns (the cheapest fitting result, every result tried).

  More micro-batches never need more memory, so each policy stops at its first fit; the cost of
  a setting is REMAT_COST times a 5% penalty per doubling of grad_accum (smaller matmuls, more
  loop overhead), a rough guide rather than a measurement.
  """
  data, fsdp, _ = (int(s) for s in config.mesh.shape)
  rows = int(config.data.batch_size)
  tried, fitting = [], []
  for policy in REMAT_COST:
    k = 1
    while rows % k == 0 and (rows // k) % (data * fsdp) == 0:
      c = config.copy_and_resolve_references()
      c.model.remat_policy, c.train.grad_accum = policy, k
      result = plan_once(c, device_memory)
      tried.append(result)
      log(f"  remat={policy:<13} grad_accum={k:<3} total {gib(result['total'])}  "
          f"{'fits' if result['fits'] else 'does not fit'}  ({result['compile_seconds']} s)")
      if result["fits"]:
        result["cost"] = REMAT_COST[policy] * (1 + 0.05 * math.log2(k))
        fitting.append(result)
        break
      k *= 2
  best = min(fitting, key=lambda r: r["cost"]) if fitting else None
  return best, tried


def format_table(r: dict) -> str:
  mesh = ",".join(f"{k}={v}" for k, v in r["mesh"].items())
  lines = [
      f"plan: {r['devices']} devices, mesh {mesh}; {r['rows']} rows x {r['tokens']} tokens, "
      f"{r['audio_chunks']} audio chunk slots per row; remat={r['remat_policy']}, "
      f"grad_accum={r['grad_accum']}, attention={r['attention']}, "
      f"conv_stem_impl={r['conv_stem_impl']}",
      "per device:",
      f"  parameters         {gib(r['params'])}",
      f"  optimizer state    {gib(r['optimizer'])}",
      f"  batch              {gib(r['batch'])}",
      f"  arguments in total {gib(r['arguments'])}",
      f"  outputs (not donated) {gib(r['outputs'])}",
      f"  temporary buffers  {gib(r['temp'])}",
      f"  total              {gib(r['total'])}  of {gib(r['device_memory'])}: "
      f"{'fits' if r['fits'] else 'DOES NOT FIT'}",
      f"compile: {r['compile_seconds']} s",
      f"note: {r['note']}",
  ]
  return "\n".join(lines)


def child_environment(devices: int, environ: Mapping[str, str]) -> dict[str, str]:
  """The environment of the re-executed planner: `environ` with N forced CPU devices and
  XLA:CPU's memory-optimized scheduler.

  XLA:CPU schedules for concurrency by default: breadth-first, so every instruction without
  operands starts at the beginning of the step, among them the zero-filled gradient
  accumulators of the backward layer scans (most of the float32 gradient: 1.7 of 2.45 GiB per
  device for the 4b preset on 8 devices) and the weight all-gathers, which then stay live
  through the entire forward pass. XLA:TPU and XLA:GPU schedule with memory in view, so the memory-optimized CPU scheduler
  is the closer approximation of their peak (about 1.2 GiB less temporary memory per device for
  the 4b preset at 8 x 4096 tokens on 8 devices).
  A scheduler chosen in XLA_FLAGS is kept.
  """
  flags_env = re.sub(r"--xla_force_host_platform_device_count=\S+", "",
                     environ.get("XLA_FLAGS", ""))
  if "--xla_cpu_scheduler_type" not in flags_env:
    flags_env += f" --xla_cpu_scheduler_type={CPU_SCHEDULER}"
  env = dict(environ, JAX_PLATFORMS="cpu", **{_CHILD_ENV: str(devices)})
  env["XLA_FLAGS"] = f"{flags_env} --xla_force_host_platform_device_count={devices}".strip()
  return env


def _reexec_with_devices(devices: int) -> None:
  """Runs this command again in a fresh interpreter with N forced CPU devices.

  XLA reads --xla_force_host_platform_device_count (and the scheduler type) from XLA_FLAGS, and
  JAX its platform list from JAX_PLATFORMS (at import), before the first backend starts;
  --devices is known only after absl has parsed the flags, when this module has already imported
  JAX and a config file or library may have started a backend with the shell's device count. A
  child process whose environment carries them from its start is the one way that always holds.
  """
  env = child_environment(devices, os.environ)
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, [sys.executable, "-m", "moss_jax.plan"] + sys.argv[1:], env)


def main(argv: Sequence[str]) -> int:
  del argv
  cli.require("config", "devices")
  devices = int(_FLAGS["devices"].value)
  if devices < 1:
    raise UserError(f"--devices must be positive, got {devices}")
  shape = parse_mesh(_FLAGS["mesh"].value, devices)
  device_memory = parse_bytes(_FLAGS["device_memory"].value)
  if os.environ.get(_CHILD_ENV) != str(devices):
    _reexec_with_devices(devices)

  if jax.device_count() != devices:
    raise UserError(f"asked for {devices} devices but JAX sees {jax.device_count()} "
                    f"({jax.default_backend()}); is XLA_FLAGS overriding the device count?")
  config = _FLAGS["config"].value
  config.mesh.shape = shape
  check = config.copy_and_resolve_references()
  if not check.data.train_manifests:
    check.data.train_manifests = "planned.jsonl"  # the plan reads no data; the shapes suffice
  config_validation.validate(check, devices, check_paths=False)

  if _FLAGS["search"].value:
    log = (lambda *_: None) if _FLAGS["json"].value else print
    log(f"searching remat policies x grad_accum on {devices} devices ...")
    best, tried = search(config, device_memory, log)
    if _FLAGS["json"].value:
      print(json.dumps({"best": best, "tried": tried}))
    elif best is None:
      print(f"nothing tried fits in {gib(device_memory)} per device; note: {CPU_NOTE}")
    else:
      print(f"cheapest setting that fits: --config.model.remat_policy={best['remat_policy']} "
            f"--config.train.grad_accum={best['grad_accum']}")
      print(format_table(best))
    return 0 if best is not None else 1

  result = plan_once(config, device_memory)
  print(json.dumps(result) if _FLAGS["json"].value else format_table(result))
  return 0


if __name__ == "__main__":
  _FLAGS.update(define_flags())
  cli.run(main)

"""Where a train step's time goes: per-op times from a jax.profiler trace, summed by model area.

    python -m benchmarks.step_profile [--shape mid|demo] [--set model.x=1,...] [--steps 3]
        [--top 15] [--trace_dir DIR] [--quick]

Builds the `train_step_vs_torch` shape (moss_jax only, one device), compiles the train step,
times `--steps` steps untraced, then traces as many with `jax.profiler.trace`. Every event in
the trace named after an instruction of the compiled program is one op's run; its instruction's
`op_name` metadata (Flax module paths, and the train step's `loss` / `grad_norm` / `optimizer`
scopes) puts it in an area: conv stem, encoder layers, adapter, DeepStack, LLM attention, LLM
MLP, rest of the LLM, loss, gradient norm, optimizer, other. Prints one JSON line per area (ms
per step, beside the untraced step time of the same run, and its share of all op time), then
the `--top` slowest ops. On CPU, op times from the two threads add up, so the areas' sum can
exceed the step's wall time; on a GPU/TPU only the device's op lines are read.
`--trace_dir` keeps the trace for TensorBoard's profile tab.
"""

from __future__ import annotations

import argparse
import collections
import glob
import os
import re
import statistics
import sys
import tempfile
import time

from benchmarks import common
from benchmarks import train_step_vs_torch as vs_torch

# (area, scope or module name in the instruction's op_name): the first match wins. Scopes appear
# bare or wrapped by transformations ("jvp(loss)/...", "transpose(jvp(loss))/...").
AREAS = (
    ("loss", "loss"),
    ("grad_norm", "grad_norm"),
    ("optimizer", "optimizer"),
    ("conv_stem", "audio_encoder.stem"),
    ("encoder_layers", "audio_encoder"),
    ("deepstack", "deepstack_audio_merger_list"),
    ("adapter", "audio_adapter"),
    ("llm_attention", "self_attn"),
    ("llm_mlp", "mlp"),
    ("llm_other", "language_model"),
    ("llm_other", "embed_with_audio"),
)
_INSTRUCTION = re.compile(r"\s+(?:ROOT )?%?([\w.\-]+) = (\S+) ")
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_CALLS = re.compile(r"calls=%?([\w.\-]+)")


def area_of(op_name: str) -> str:
  """The model area an op_name belongs to (AREAS), "other" when none. A path component names
  a scope as itself, as its method's owner ("MossAudioModel.embed_with_audio") or as an item of
  a list of submodules (Flax names them "<list>_<i>": "deepstack_audio_merger_list_0")."""
  scopes = re.split(r"[/()]", op_name)
  for area, name in AREAS:
    item = re.compile(re.escape(name) + r"_\d+")
    if any(scope == name or scope.endswith("." + name) or item.fullmatch(scope)
           for scope in scopes):
      return area
  return "other"


def instructions(hlo_text: str) -> dict[str, tuple[str, str]]:
  """{instruction name: (result shape, op_name)} of a compiled program's HLO text.

  XLA leaves some instructions it creates without metadata (a convolution's kernel gradient, a
  layout copy): such an instruction takes the op_name of the instructions it calls, else of its
  first operand that has one (repeatedly), so its time still lands in the area that caused it.
  """
  out, calls, operands, op_names_in = {}, {}, {}, collections.defaultdict(list)
  computation = None
  for line in hlo_text.splitlines():
    if line and not line[0].isspace():
      header = re.match(r"(?:ENTRY )?%?([\w.\-]+)", line)
      computation = header.group(1) if header and line.rstrip().endswith("{") else None
      continue
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name = match.group(1)
    op_name = _OP_NAME.search(line)
    out[name] = (match.group(2), op_name.group(1) if op_name else "")
    if op_name:
      op_names_in[computation].append(op_name.group(1))
    called = _CALLS.search(line)
    if called:
      calls[name] = called.group(1)
    arguments = line[match.end():].split("), ")[0]
    operands[name] = re.findall(r"%([\w.\-]+)", arguments)

  def inherited(name, seen):
    shape, op_name = out[name]
    if op_name or name in seen:
      return op_name
    seen.add(name)
    inner = op_names_in.get(calls.get(name))
    if inner:
      return inner[0]
    for operand in operands.get(name, []):
      if operand in out and (found := inherited(operand, seen)):
        return found
    return ""

  return {name: (shape, op_name or inherited(name, set()))
          for name, (shape, op_name) in out.items()}


def op_times(trace_dir: str, names) -> collections.Counter:
  """{instruction name: total ns} over the trace's events named after one of `names`; device
  planes only when the trace has any (host planes then hold launches, not the ops' runs)."""
  import jax
  files = glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  planes = list(jax.profiler.ProfileData.from_file(max(files, key=os.path.getmtime)).planes)
  device = [p for p in planes if p.name.startswith("/device:")]
  totals = collections.Counter()
  for plane in device or planes:
    for line in plane.lines:
      for event in line.events:
        if event.name in names:
          totals[event.name] += event.duration_ns
  return totals


def profile(config, steps: int, trace_dir: str):
  """(untraced step seconds, {instruction: ns over the traced steps}, instruction info)."""
  from moss_jax import host_memory
  host_memory.retain_freed_memory_on_cpu()
  import jax

  step = vs_torch.JaxStep(config)
  info = instructions(step.compiled.as_text())
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    step.run()
    seconds.append(time.perf_counter() - start)
  with jax.profiler.trace(trace_dir):
    for _ in range(steps):
      step.run()
  return seconds, op_times(trace_dir, info), info


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--shape", default="mid", choices=vs_torch.SHAPES)
  parser.add_argument("--set", default="", help="config overrides, model.x=1,model.y=z")
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--top", type=int, default=15, help="slowest ops to list")
  parser.add_argument("--trace_dir", default="", help="keep the trace here (default: a temp dir)")
  parser.add_argument("--quick", action="store_true", help="the demo shape, one step")
  args = parser.parse_args(argv)
  if args.quick:
    args.shape, args.steps = "demo", 1
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  sys.path.insert(0, common.REPO)
  variants, configs = vs_torch.checked_configs(parser, [args.shape], f"profiled:{args.set}")
  overrides, config = variants["profiled"], configs[args.shape, "profiled"]
  with tempfile.TemporaryDirectory() as tmp:
    seconds, totals, info = profile(config, args.steps, args.trace_dir or tmp)
  step_ms = statistics.median(seconds) * 1e3
  per_step = lambda ns: ns / 1e6 / args.steps
  by_area = collections.Counter()
  for name, ns in totals.items():
    by_area[area_of(info[name][1])] += ns
  all_ops = sum(by_area.values())
  context = dict(shape=args.shape, overrides=overrides, steps=args.steps,
                 loadavg_1m=os.getloadavg()[0])
  for area, ns in by_area.most_common():
    common.emit(common.figure("step_profile", f"{args.shape}_{area}_ms", per_step(ns), "ms",
                              "step_ms", step_ms, share_of_op_time=ns / all_ops, **context))
  common.emit(common.figure("step_profile", f"{args.shape}_all_ops_ms", per_step(all_ops), "ms",
                            "step_ms", step_ms, step_ms_all=[s * 1e3 for s in seconds], **context))
  for name, ns in totals.most_common(args.top):
    shape, op_name = info[name]
    common.emit(common.figure("step_profile", f"{args.shape}_op_ms", per_step(ns), "ms",
                              "step_ms", step_ms, op=name, result=shape, area=area_of(op_name),
                              op_name=op_name[-160:], shape=args.shape))
  return 0


if __name__ == "__main__":
  common.run_main(main)

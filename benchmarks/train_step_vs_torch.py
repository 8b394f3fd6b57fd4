"""One training step of the same model in moss_jax and in the tests' PyTorch reference, same CPU.

    python -m benchmarks.train_step_vs_torch [--shapes mid,demo] [--rounds 3] [--steps 4] [--quick]
        [--variants "jax;unrolled:model.scan_unroll=4;conv_stem:model.audio.conv_stem_impl=conv"]

Shapes (float32, AdamW on every parameter, gradient clipping at 1.0 in both frameworks):
  mid   encoder 512 x 4 layers (8 heads, ffn 2048, conv stem 64 ch, taps 0/1/2), adapter 1024,
        Qwen3 512 x 4 layers (8 q / 4 kv heads of 64, ffn 1536), vocab 4096; 4 rows, each one
        16 s clip (4 chunks, 200 audio tokens) + 256 text tokens (456 tokens a row): 36.3 M params.
  demo  configs/pretrain.py:demo model; 8 rows of one 16 s clip + 56 text tokens (256 a row).

Every row is one sample: a prompt token, the clip's 200 audio placeholders, then text tokens,
all text after the audio supervised. moss_jax runs `train_step.build_program` on one CPU device
(the host mel input, feature_mode "mel", as the reference takes a mel); PyTorch runs
`tests/torch_reference.TorchMossAudio` (transformers' WhisperEncoderLayer + Qwen3Model, eager
attention) with cross-entropy, `clip_grad_norm_` and `torch.optim.AdamW`, with
torch.set_num_threads(cpu count).

Both processes use the malloc policy `moss_jax.train` sets on CPU (moss_jax/host_memory.py: freed
memory kept for reuse); MOSS_JAX_HOST_MALLOC=default runs both with glibc's defaults.

Each framework runs in its own subprocess (one import, one compilation, a warm-up step, then
`--steps` timed steps), alternating jax / torch for `--rounds` rounds, so both see the same
machine load; the figures are medians over all timed steps of all rounds. Each jax round also
measures the float32 matmul peak (jitted 1024/2048/4096 squares, the best) in the same process:
achieved FLOP/s (moss_jax/flops.py counts) over that peak is the step's share of the machine.
Prints one JSON line per figure (see benchmarks/common.py) and the 1-minute load average.

`--variants` compares moss_jax settings in the same run: `;`-separated NAME[:KEY=VALUE,...]
entries, each a jax process per round (config overrides of the shape's config), all alternating
with the torch process; every variant gets its own figures (default: one variant, `jax`).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from benchmarks import common

SHAPES = ("mid", "demo")


def parse_overrides(text: str) -> dict[str, str]:
  """'model.x=1,model.y=z' -> {'model.x': '1', 'model.y': 'z'}."""
  out = {}
  for item in filter(None, text.split(",")):
    key, eq, value = item.partition("=")
    if not eq or not key.strip():
      raise ValueError(f"{item!r}: an override is KEY=VALUE, e.g. model.scan_unroll=1")
    out[key.strip()] = value
  return out


def parse_variants(text: str) -> dict[str, dict[str, str]]:
  """'a;b:model.x=1,model.y=z' -> {'a': {}, 'b': {'model.x': '1', 'model.y': 'z'}}."""
  out = {}
  for entry in filter(None, (e.strip() for e in text.split(";"))):
    name, _, sets = entry.partition(":")
    out[name] = parse_overrides(sets)
  if not out:
    raise ValueError(f"--variants names no variant: {text!r}")
  return out


def apply_overrides(config, overrides: dict[str, str]):
  """Sets dotted config fields from strings, parsed as the field's current type."""
  import ast
  for key, raw in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      if p not in node:
        raise ValueError(f"{key}={raw}: the config has no field {p!r}")
      node = node[p]
    if leaf not in node:
      raise ValueError(f"{key}={raw}: the config has no field {leaf!r}")
    old = node[leaf]
    if isinstance(old, str):
      node[leaf] = raw
      continue
    try:
      node[leaf] = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      raise ValueError(f"{key}={raw}: not a Python literal like the field's "
                       f"{type(old).__name__} {old!r}") from None
  return config


def model_config(shape: str, overrides: dict[str, str] | None = None):
  """config (configs/pretrain.py:demo, resized for `mid`), with the benchmark batch shape."""
  from configs import pretrain
  c = pretrain.get_config("demo")
  if shape == "mid":
    c.model.audio.update(d_model=512, encoder_layers=4, encoder_attention_heads=8,
                         encoder_ffn_dim=2048, downsample_hidden_size=64,
                         deepstack_encoder_layer_indexes=(0, 1, 2))
    c.model.text.update(vocab_size=4096, hidden_size=512, intermediate_size=1536,
                        num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                        head_dim=64)
    c.model.adapter_hidden_size = 1024
    c.data.update(batch_size=4, max_tokens=456, max_audio_chunks=4)
  elif shape == "demo":
    c.data.update(batch_size=8, max_tokens=256, max_audio_chunks=4)
  else:
    raise ValueError(f"unknown shape {shape!r}; choose one of {SHAPES}")
  c.data.feature_mode = "mel"
  c.mesh.shape = (1, 1, 1)
  return apply_overrides(c, overrides or {})


def checked_model_config(shape: str, overrides: dict[str, str] | None = None):
  """`model_config`, validated as `moss_jax.train` validates a run's config (one device, no
  paths): raises ConfigError naming each bad setting, before anything compiles."""
  from moss_jax import config_validation
  config = model_config(shape, overrides)
  config_validation.validate(config, num_devices=1, check_paths=False)
  return config


def checked_configs(parser, shapes, variants: str):
  """(variants, {(shape, variant name): config}) for `--variants` text, every config parsed
  and validated before anything runs: a malformed override, a key the config lacks or a value
  `moss_jax.train` would reject is one usage error (exit 2), not a traceback minutes in."""
  from moss_jax.config_validation import ConfigError
  try:
    parsed = parse_variants(variants)
    return parsed, {(shape, name): checked_model_config(shape, overrides)
                    for shape in shapes for name, overrides in parsed.items()}
  except (ValueError, ConfigError) as e:
    parser.error(str(e))


AUDIO_ID = 3  # placeholder id in both frameworks' inputs


def batch_arrays(config, seed: int = 0) -> dict:
  """The same rows for both frameworks: ids, labels, and one 1600-frame mel per row."""
  import numpy as np
  rows, length, chunks = config.data.batch_size, config.data.max_tokens, config.data.max_audio_chunks
  frames = chunks * 400
  n_audio = chunks * 50
  vocab = config.model.text.vocab_size
  rng = np.random.default_rng(seed)
  ids = rng.integers(10, vocab, (rows, length)).astype(np.int32)
  ids[:, 1:1 + n_audio] = AUDIO_ID
  labels = ids.copy()
  labels[:, :1 + n_audio] = -100
  mel = np.clip(rng.normal(-0.2, 0.4, (rows, 128, frames)), -1.5, 1.5).astype(np.float32)
  return {"ids": ids, "labels": labels, "mel": mel, "frames": frames, "n_audio": n_audio}


def jax_batch(config, arrays: dict) -> dict:
  """moss_jax's batch schema for `batch_arrays` (one segment a row, every chunk slot full)."""
  import numpy as np
  from moss_jax import batch as batch_lib
  rows, length, chunks = config.data.batch_size, config.data.max_tokens, config.data.max_audio_chunks
  shapes = batch_lib.batch_shapes_from_config(config)
  out = {k: np.zeros(s, d) for k, (s, d) in shapes.items()}
  out["input_ids"][:] = arrays["ids"]
  out["labels"][:] = arrays["labels"]
  out["segment_ids"][:] = 1
  out["positions"][:] = np.arange(length)
  out["audio_token_index"][:] = -1
  out["audio_token_index"][:, 1:1 + arrays["n_audio"]] = np.arange(arrays["n_audio"])
  out["audio_chunk_frames"][:] = 400
  out["audio_chunk_audio_id"][:] = 1
  # [rows, 128, chunks * 400] -> [rows, chunks, 128, 400]
  out["audio_mel"][:] = arrays["mel"].reshape(rows, 128, chunks, 400).transpose(0, 2, 1, 3)
  return out


class JaxStep:
  """moss_jax's train step for `config` on its (one-device) mesh, ready to time: the program,
  a fresh state, the benchmark batch, the step compiled ahead and run once (the warm-up).
  Call `retain_freed_memory_on_cpu` first, as `moss_jax.train` does, before the backend starts.
  """

  def __init__(self, config):
    import jax
    from moss_jax import sharding
    from moss_jax import train_step as ts
    self.mesh = sharding.make_mesh(config.mesh)
    program = ts.build_program(config, self.mesh)
    self.state = program.init_state(jax.random.key(0))
    self.batch = program.global_batch(jax_batch(config, batch_arrays(config)))
    start = time.perf_counter()
    self.compiled = program.train_step.lower(program.abstract_state,
                                             program.abstract_batch).compile()
    self.compile_s = time.perf_counter() - start
    self.first_loss = float(self.run()["loss"])

  def run(self) -> dict:
    """One step (the state advances); its metrics once the step has finished."""
    import jax
    from moss_jax import sharding
    with sharding.use_mesh(self.mesh):
      self.state, metrics = self.compiled(self.state, self.batch)
      return jax.block_until_ready(metrics)


def run_jax(shape: str, steps: int, overrides: dict[str, str]) -> dict:
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax
  from moss_jax import flops, host_memory
  from moss_jax.model import count_params
  from moss_jax.model import encoder

  host_memory.retain_freed_memory_on_cpu()  # as `moss_jax.train` does, before the backend starts
  config = model_config(shape, overrides)
  step = JaxStep(config)
  times = [_timed(step.run) for _ in range(steps)]
  peak = max(flops.measure_matmul_peak(n, repeats=3) for n in (1024, 2048, 4096))
  state = step.state
  return {"framework": "jax", "step_s": times, "compile_s": step.compile_s,
          "first_loss": step.first_loss,
          "params": count_params(state["params"]) + count_params(state["frozen"]),
          "matmul_peak": peak, "jax": jax.__version__,
          "conv_stem_impl": encoder.stem_impl(config.model.audio),
          "scan_unroll": config.model.get("scan_unroll", 1)}


def torch_reference_config(config) -> dict:
  """tests/torch_reference config dict with `config.model`'s shapes."""
  import torch_reference as tr
  m = config.model
  ref = tr.tiny_reference_config(audio_token_id=AUDIO_ID,
                                 taps=tuple(m.audio.deepstack_encoder_layer_indexes),
                                 vocab_size=m.text.vocab_size)
  ref["audio_config"].update(
      d_model=m.audio.d_model, output_dim=m.audio.d_model, encoder_layers=m.audio.encoder_layers,
      encoder_attention_heads=m.audio.encoder_attention_heads,
      encoder_ffn_dim=m.audio.encoder_ffn_dim,
      downsample_hidden_size=m.audio.downsample_hidden_size)
  t = m.text
  ref["language_config"].update(
      hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
      num_hidden_layers=t.num_hidden_layers, num_attention_heads=t.num_attention_heads,
      num_key_value_heads=t.num_key_value_heads, head_dim=t.head_dim,
      layer_types=["full_attention"] * t.num_hidden_layers, max_window_layers=t.num_hidden_layers)
  ref.update(adapter_hidden_size=m.adapter_hidden_size,
             deepstack_num_inject_layers=m.deepstack_num_inject_layers)
  return ref


def run_torch(shape: str, steps: int, overrides: dict[str, str]) -> dict:
  sys.path.insert(0, os.path.join(common.REPO, "tests"))
  from moss_jax import host_memory
  host_memory.retain_freed_memory()  # the same malloc policy as the jax process
  import torch
  import torch_reference as tr

  torch.set_num_threads(os.cpu_count())
  torch.manual_seed(0)
  config = model_config(shape)
  o = config.optim
  model = tr.TorchMossAudio(torch_reference_config(config))
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps,
                          weight_decay=o.weight_decay)
  a = batch_arrays(config)
  ids = torch.from_numpy(a["ids"]).long()
  labels = torch.from_numpy(a["labels"]).long()
  mel = torch.from_numpy(a["mel"])
  lengths = torch.full((ids.shape[0],), a["frames"])

  def step():
    logits = model(ids, mel, lengths)
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_norm)
    opt.step()
    return float(loss)

  first_loss = step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  n = 2048
  x = torch.ones(n, n)
  x @ x
  best = min(_timed(lambda: x @ x) for _ in range(3))
  return {"framework": "torch", "step_s": times, "first_loss": first_loss,
          "params": sum(p.numel() for p in model.parameters()),
          "matmul_peak": 2.0 * n ** 3 / best, "torch": torch.__version__,
          "threads": torch.get_num_threads()}


def _timed(fn) -> float:
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def _child(framework: str, shape: str, steps: int, overrides: dict[str, str]) -> dict:
  """Runs one framework in a fresh process and returns its JSON result."""
  cmd = [sys.executable, "-m", "benchmarks.train_step_vs_torch", "--child", framework,
         "--shapes", shape, "--steps", str(steps),
         "--overrides", ",".join(f"{k}={v}" for k, v in overrides.items())]
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [common.REPO] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
  out = subprocess.run(cmd, cwd=common.REPO, env=env, capture_output=True, text=True, check=False)
  if out.returncode != 0:
    raise RuntimeError(f"{framework} {shape} child failed:\n{out.stderr[-3000:]}")
  return json.loads(out.stdout.strip().splitlines()[-1])


def compare(shape: str, rounds: int, steps: int, variants: dict[str, dict[str, str]]) -> list[dict]:
  from moss_jax import flops
  config = model_config(shape)
  runs = {name: [] for name in variants}
  runs["torch"] = []
  loads = []
  for r in range(rounds):
    order = list(variants) + ["torch"]
    if r % 2:
      order.reverse()
    for name in order:
      fw = "torch" if name == "torch" else "jax"
      runs[name].append(_child(fw, shape, steps, variants.get(name, {})))
      loads.append(os.getloadavg()[0])
  med = {name: statistics.median([t for run in rs for t in run["step_s"]])
         for name, rs in runs.items()}
  torch_peak = statistics.median(run["matmul_peak"] for run in runs["torch"])
  step_flops = flops.step_flops(config.model, config.data.batch_size, config.data.max_tokens,
                                config.data.max_audio_chunks, "full")["total"]
  load = round(statistics.median(loads), 2)
  b = "train_step_vs_torch"
  out = []
  for name, overrides in variants.items():
    jr = runs[name]
    peak = statistics.median(run["matmul_peak"] for run in jr)
    ctx = {"shape": shape, "variant": name, "overrides": overrides,
           "conv_stem_impl": jr[0]["conv_stem_impl"], "scan_unroll": jr[0]["scan_unroll"],
           "params_jax": jr[0]["params"], "params_torch": runs["torch"][0]["params"],
           "rounds": rounds, "steps_per_round": steps, "loadavg_1m": load,
           "jax_step_s_all": [round(t, 4) for run in jr for t in run["step_s"]],
           "torch_step_s_all": [round(t, 4) for run in runs["torch"] for t in run["step_s"]]}
    out += [
        common.figure(b, f"{shape}_{name}_step_s", med[name], "s", "torch_step_s", med["torch"],
                      speedup_vs_torch=med["torch"] / med[name], **ctx),
        common.figure(b, f"{shape}_{name}_gflop_per_s", step_flops / med[name] / 1e9, "GFLOP/s",
                      "jax_f32_matmul_peak_gflop_per_s", peak / 1e9,
                      share_of_peak=step_flops / med[name] / peak,
                      torch_gflop_per_s=step_flops / med["torch"] / 1e9,
                      torch_share_of_jax_peak=step_flops / med["torch"] / peak,
                      torch_f32_matmul_2048_gflop_per_s=torch_peak / 1e9,
                      step_gflop=step_flops / 1e9, shape=shape, variant=name, loadavg_1m=load),
        common.figure(b, f"{shape}_{name}_compile_s",
                      statistics.median(run["compile_s"] for run in jr), "s",
                      "jax_step_s", med[name], shape=shape, variant=name),
    ]
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--shapes", default="mid,demo", help=f"comma-separated, of {SHAPES}")
  parser.add_argument("--rounds", type=int, default=3, help="alternating jax/torch rounds")
  parser.add_argument("--steps", type=int, default=4, help="timed steps per process")
  parser.add_argument("--variants", default="jax",
                      help="';'-separated NAME[:KEY=VALUE,...] moss_jax config variants")
  parser.add_argument("--quick", action="store_true", help="1 round of 2 steps (a smoke run)")
  parser.add_argument("--child", choices=("jax", "torch"), help=argparse.SUPPRESS)
  parser.add_argument("--overrides", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  shapes = common.shape_list(parser, args.shapes, SHAPES)
  if args.child:
    run = run_jax if args.child == "jax" else run_torch
    overrides = parse_overrides(args.overrides)
    print(json.dumps(run(args.shapes, args.steps, overrides)))
    return 0
  if args.quick:
    args.rounds, args.steps = 1, 2
  variants, _ = checked_configs(parser, shapes, args.variants)
  for shape in shapes:
    for fig in compare(shape, args.rounds, args.steps, variants):
      common.emit(fig)
  return 0


if __name__ == "__main__":
  common.run_main(main)

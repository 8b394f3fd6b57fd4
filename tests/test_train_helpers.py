"""Shared pieces of the training tests (tiny configs, a built trainer) and checks of them."""

from __future__ import annotations

import json
import os
import sys

import numpy as np

from configs import pretrain
from moss_jax import batch as batch_lib
from moss_jax import train_step as ts


def tiny_config(batch_size: int = 8, max_tokens: int = 64, chunks: int = 1, stage: str = "full",
                grad_accum: int = 1, feature_mode: str = "mel", mesh=(1, -1, 1)):
  """The demo config shrunk to a model that compiles and steps in seconds on a CPU."""
  c = pretrain.get_config("demo")
  a, t = c.model.audio, c.model.text
  a.d_model, a.encoder_layers, a.encoder_attention_heads = 32, 2, 2
  a.encoder_ffn_dim, a.downsample_hidden_size = 64, 8
  a.deepstack_encoder_layer_indexes = (0, 1)
  t.vocab_size, t.hidden_size, t.intermediate_size = 64, 32, 64
  t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim = 2, 2, 1, 16
  c.model.adapter_hidden_size = 64
  c.data.batch_size, c.data.max_tokens, c.data.max_audio_chunks = batch_size, max_tokens, chunks
  c.data.max_audio_seconds = 4.0 * chunks
  c.data.feature_mode = feature_mode
  c.train.stage, c.train.grad_accum = stage, grad_accum
  c.train.steps = 10
  c.optim.warmup_steps = 2
  c.optim.lr = 1e-2
  c.mesh.shape = tuple(mesh)
  return c


def test_synthetic_batch_matches_schema():
  c = tiny_config(chunks=2, max_tokens=160)
  batch = ts.synthetic_batch(c, seed=3)
  batch_lib.check_batch(batch, batch_lib.batch_shapes_from_config(c))
  idx = batch["audio_token_index"]
  frames = batch["audio_chunk_frames"]
  for r in range(c.data.batch_size):
    n_valid = sum(batch_lib.num_audio_tokens(int(f)) for f in frames[r])
    used = idx[r][idx[r] >= 0]
    assert used.max() < frames.shape[1] * batch_lib.TOKENS_PER_CHUNK
    assert len(used) <= n_valid
    # Supervised tokens exist and never sit on audio placeholders.
    assert (batch["labels"][r] != batch_lib.IGNORE_INDEX).any()
    assert not ((batch["labels"][r] != batch_lib.IGNORE_INDEX) & (idx[r] >= 0)).any()
  assert np.all(batch["positions"][batch["segment_ids"] == 0] == 0)


TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)

_RUN_CONFIG = '''"""Config of a subprocess training run made by a test (tiny model, sample corpus)."""
import json, sys
sys.path.insert(0, {tests!r})
from test_train_helpers import run_config


def get_config(arg=None):
  return run_config(json.loads({overrides!r}))
'''


def run_config(overrides: dict | None = None):
  """A tiny model trained on the shipped sample corpus (host mel, no eval) for subprocess runs.

  `overrides` maps dotted config paths to values, e.g. {"train.steps": 6}.
  """
  c = tiny_config(batch_size=8, max_tokens=128, chunks=2)
  c.model.text.vocab_size = 512  # the sample corpus tokenizer
  c.data.eval_manifest = ""
  c.data.prefetch = 0
  c.train.update(steps=12, log_every=1, checkpoint_every=4, final_train_asr_samples=0,
                 asr_eval_samples=0, peak_flops_per_device=1e9)
  for key, value in (overrides or {}).items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = tuple(value) if isinstance(value, list) else value
  return c


def write_run_config(directory, **overrides) -> str:
  """A config file for `python -m moss_jax.train --config FILE`; keys use '__' for '.'."""
  os.makedirs(directory, exist_ok=True)
  path = os.path.join(str(directory), "run_config.py")
  dotted = {k.replace("__", "."): v for k, v in overrides.items()}
  with open(path, "w", encoding="utf-8") as f:
    f.write(_RUN_CONFIG.format(tests=TESTS_DIR, overrides=json.dumps(dotted)))
  return path


def train_env(cache_dir: str, devices: int = 8, **extra) -> dict:
  """Environment of a training subprocess: CPU devices, a shared compilation cache."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  env["JAX_PLATFORMS"] = "cpu"
  env["JAX_COMPILATION_CACHE_DIR"] = cache_dir
  env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
  env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
  env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
  env.update({k: str(v) for k, v in extra.items()})
  return env


def train_command(config_path: str, workdir: str, *flags: str) -> list[str]:
  return [sys.executable, "-m", "moss_jax.train", f"--config={config_path}",
          f"--workdir={workdir}", *flags]


def read_metrics(workdir: str, split: str = "train") -> dict[int, dict]:
  """{step: record} of a run's metrics.jsonl (later records of a step win, as after a resume)."""
  out = {}
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      rec = json.loads(line)
      if rec["split"] == split:
        out[rec["step"]] = rec
  return out


def test_run_config_overrides(tmp_path):
  path = write_run_config(tmp_path, train__steps=3, mesh__shape=[2, 4, 1])
  import importlib.util
  spec = importlib.util.spec_from_file_location("rc", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  c = mod.get_config()
  assert c.train.steps == 3 and tuple(c.mesh.shape) == (2, 4, 1)
  assert os.path.exists(c.data.train_manifests) and c.model.text.vocab_size == 512

"""Greedy decoding against a plain loop over the full model, and the ASR error-rate helper."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax import evaluate
from moss_jax import generate
from moss_jax import sharding
from moss_jax import train_step as ts
from moss_jax.model import MossAudioModel, init_params
from moss_jax.model.mel import model_audio_mel
from test_train_helpers import tiny_config

STOP = 7
MAX_NEW = 6


def _prompts(config, rows: int):
  """Each row: the first segment of a synthetic batch row (audio + prompt), nothing after it."""
  batch = ts.synthetic_batch(config, seed=11, batch_size=rows)
  first = batch["segment_ids"] == 1
  for name in ("input_ids", "positions", "segment_ids", "task_ids"):
    batch[name] = np.where(first, batch[name], 0).astype(np.int32)
  batch["audio_token_index"] = np.where(first, batch["audio_token_index"], -1).astype(np.int32)
  batch["labels"][:] = -100
  # Vary the prompt lengths so rows finish at different positions.
  for r in range(rows):
    n = int(first[r].sum()) - r
    for name in ("input_ids", "positions", "segment_ids"):
      batch[name][r, n:] = 0
  return batch


def _reference(model, params, batch, config):
  """Token by token: run the whole model on the growing sequence, take the argmax."""
  fwd = jax.jit(lambda p, row: model.apply(
      {"params": p}, row["input_ids"], row["positions"], row["segment_ids"],
      model_audio_mel(row, config.model), row["audio_chunk_frames"], row["audio_token_index"]))
  out = []
  for r in range(batch["input_ids"].shape[0]):
    row = {k: v[r:r + 1].copy() for k, v in batch.items()}
    n = int((row["segment_ids"] > 0).sum())
    got = []
    for _ in range(MAX_NEW):
      if n >= row["input_ids"].shape[1]:
        break
      logits = fwd(params, row)
      tok = int(jnp.argmax(logits[0, n - 1]))
      if tok == STOP:
        break
      got.append(tok)
      row["input_ids"][0, n], row["segment_ids"][0, n], row["positions"][0, n] = tok, 1, n
      n += 1
    out.append(got)
  return out


@pytest.mark.parametrize("use_mesh", [False, True])
def test_greedy_generate_matches_full_recompute(use_mesh):
  config = tiny_config(max_tokens=80)
  model = MossAudioModel(config=config.model)
  params = init_params(config.model, jax.random.key(5))
  batch = _prompts(config, rows=3)
  mesh = sharding.make_mesh(config.mesh) if use_mesh else None
  got = generate.greedy_generate(model, params, batch, MAX_NEW, (STOP,), mesh)
  assert got == _reference(model, params, batch, config)
  assert any(len(g) == MAX_NEW for g in got)


def test_error_rates_normalise_and_pool():
  rates = evaluate.error_rates(["The cat sat.", "A dog"], ["the cat sat", "a dig"])
  assert rates["num_samples"] == 2
  assert rates["wer"] == pytest.approx(1 / 5)
  assert rates["cer"] == pytest.approx(1 / 16)  # "the cat sat" + "a dog": 11 + 5 characters
  assert evaluate.normalize_text("  Hello,   World! ") == "hello world"

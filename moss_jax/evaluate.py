"""Evaluation: token loss / accuracy per task on a manifest, and greedy ASR error rates.

CER and WER (jiwer) are computed on normalised text: lower case, punctuation removed, spaces
collapsed, so "The cat." and "the cat" agree; both figures are corpus-level (total edits over
total reference characters / words), not means of per-sample rates.
"""

from __future__ import annotations

import re
import string
from typing import Any, Iterable, Mapping, Sequence

import jax
import jiwer
import numpy as np
from jax.experimental import multihost_utils

from data_pipelines import pipeline, tokenizers
from moss_jax import batch as batch_lib
from moss_jax import generate
from moss_jax.metrics import summarize_stats

_PUNCT = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize_text(text: str) -> str:
  return " ".join(_PUNCT.sub(" ", text.lower()).split())


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
  """Corpus CER and WER of normalised texts (empty references are dropped)."""
  pairs = [(normalize_text(r), normalize_text(h)) for r, h in zip(references, hypotheses)]
  pairs = [(r, h) for r, h in pairs if r]
  if not pairs:
    return {"cer": float("nan"), "wer": float("nan"), "num_samples": 0}
  refs, hyps = zip(*pairs)
  return {"cer": float(jiwer.cer(list(refs), list(hyps))),
          "wer": float(jiwer.wer(list(refs), list(hyps))), "num_samples": len(refs)}


def empty_batch(config, rows: int) -> dict[str, np.ndarray]:
  """A batch with no tokens (all padding): what a process with no eval rows left contributes."""
  return batch_lib.empty_batch(batch_lib.batch_shapes_from_config(config, rows))


def _global_count(n: int) -> int:
  """The largest `n` over processes (each must run the same number of collective steps)."""
  if jax.process_count() == 1:
    return n
  return int(np.max(multihost_utils.process_allgather(np.array([n], np.int64))))


def eval_loss(program, params, local_batches: Iterable[Mapping[str, np.ndarray]],
              max_batches: int = 0) -> dict[str, float]:
  """Token-weighted loss and accuracy (overall and per task) over this process's eval batches."""
  local = []
  for i, b in enumerate(local_batches):
    if max_batches and i >= max_batches:
      break
    local.append(b)
  n = _global_count(len(local))
  sums: dict[str, np.ndarray] = {}
  rows = program.config.data.batch_size // jax.process_count()
  for i in range(n):
    b = local[i] if i < len(local) else empty_batch(program.config, rows)
    stats = jax.device_get(program.evaluate(params, program.global_batch(b)))
    for k, v in stats.items():
      sums[k] = sums.get(k, 0) + np.asarray(v, np.float64)
  if not sums:
    return {}
  out = summarize_stats(sums)
  out["batches"] = float(n)
  return out


def transcribe(model, params, config, inputs, mesh, max_new_tokens: int,
               tokenizer) -> list[str]:
  """Greedy text for each (prompt batch, reference, task) of make_generation_inputs."""
  if not inputs:
    return []
  rows = generate.stack_prompts([p for p, _, _ in inputs])
  ids = generate.greedy_generate(model, params, rows, max_new_tokens, (tokenizer.im_end_id,),
                                 mesh)
  return [tokenizer.decode(r) for r in ids]


def asr_eval(model, params, config, manifest: str, num_samples: int, mesh,
             max_new_tokens: int, tasks: Sequence[str] = ("asr",)) -> dict[str, Any]:
  """Greedy-decode the first `num_samples` records of `tasks` in `manifest`; CER / WER."""
  tok = tokenizers.load_tokenizer(config.data.tokenizer)
  # Manifests interleave tasks: read enough records to find num_samples of the wanted ones.
  inputs = pipeline.make_generation_inputs(config, manifest, num_samples=num_samples * 8)
  inputs = [x for x in inputs if x[2] in tasks][:num_samples]
  hyps = transcribe(model, params, config, inputs, mesh, max_new_tokens, tok)
  refs = [ref for _, ref, _ in inputs]
  out = error_rates(refs, hyps)
  out["examples"] = [{"reference": r, "hypothesis": h} for r, h in zip(refs, hyps)]
  return out

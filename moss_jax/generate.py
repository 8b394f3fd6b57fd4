"""Greedy decoding with static shapes, and `python -m moss_jax.generate` to transcribe a file.

The encoder, adapter and DeepStack mergers run once per prompt batch (prefill of the audio);
every decode step then recomputes the LLM over the fixed-length token buffer [N, L] (no KV
cache: simple and exact, fine for evaluation-sized batches) and reads the logits at each row's
last filled position only. The loop is one `lax.while_loop` inside jit, so nothing is recompiled
per token, and it stops when every row has emitted an end token or the buffer is full.

  python -m moss_jax.generate --workdir /tmp/demo --audio clip.flac [--question "..."]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import tempfile
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import pipeline, tokenizers
from moss_jax import checkpoint
from moss_jax import sharding as sharding_lib
from moss_jax import train_step as ts
from moss_jax.model import MossAudioModel, gather_audio
from moss_jax.model.mel import model_audio_mel


def _llm_logits_at(module, input_ids, positions, segment_ids, adapter_out, merger_outs,
                   audio_token_index, last):
  """Logits [N, V] at position `last` of each row, given precomputed audio features.

  The same embedding merge and DeepStack injection as MossAudioModel.__call__, with the
  encoder outputs passed in (they do not change while decoding).
  """
  x = module.language_model.embed(input_ids)
  is_audio = (audio_token_index >= 0)[..., None]
  x = jnp.where(is_audio, gather_audio(adapter_out, audio_token_index).astype(x.dtype), x)
  inject = None
  if merger_outs is not None:
    inject = jax.vmap(gather_audio, in_axes=(0, None))(merger_outs, audio_token_index)
  hidden = module.language_model(x, positions, segment_ids, inject)
  h_last = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]
  return module.lm_head(h_last).astype(jnp.float32)


def _encode(module, mel, frames):
  return module.encode_audio(mel, frames)


def prompt_lengths(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """Tokens of each row's prompt (the prompt is the row's only segment, from position 0)."""
  return (np.asarray(batch["segment_ids"]) > 0).sum(axis=1).astype(np.int32)


_COMPILED: dict = {}


def _greedy_fn(model, max_new_tokens: int, mesh=None):
  """The jitted decode loop for one model object (cached: modules holding a ConfigDict are not
  hashable, so they cannot be static jit arguments). On a mesh the output is replicated, so
  every process can read all of it."""
  key = (id(model), max_new_tokens, mesh)
  if key not in _COMPILED:
    out_sh = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    _COMPILED[key] = (model, jax.jit(functools.partial(_greedy, model, model.config,
                                                       max_new_tokens=max_new_tokens),
                                     out_shardings=out_sh))
  return _COMPILED[key][1]


def _greedy(model, model_config, params, batch, prompt_len, stop_ids, max_new_tokens: int):
  variables = {"params": params}
  mel = model_audio_mel(batch, model_config)
  adapter_out, merger_outs = model.apply(variables, mel, batch["audio_chunk_frames"],
                                         method=_encode)
  n, length = batch["input_ids"].shape
  cols = jnp.arange(length)[None, :]

  def cond(carry):
    t, _, done, _, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, ids, done, cur, out = carry
    seg = jnp.where(cols < cur[:, None], 1, 0).astype(jnp.int32)
    pos = jnp.where(seg > 0, cols, 0).astype(jnp.int32)
    logits = model.apply(variables, ids, pos, seg, adapter_out, merger_outs,
                         batch["audio_token_index"], cur - 1, method=_llm_logits_at)
    nxt = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    room = cur < length
    write = ~done & room
    ids = jnp.where(write[:, None] & (cols == cur[:, None]), nxt[:, None], ids)
    out = out.at[:, t].set(jnp.where(write, nxt, -1))
    done = done | ~room | (write & jnp.isin(nxt, stop_ids))
    return t + 1, ids, done, jnp.where(write, cur + 1, cur), out

  out = jnp.full((n, max_new_tokens), -1, jnp.int32)
  init = (jnp.zeros((), jnp.int32), batch["input_ids"], prompt_len >= length, prompt_len, out)
  return jax.lax.while_loop(cond, body, init)[4]


def greedy_generate(model, params, batch: Mapping[str, np.ndarray], max_new_tokens: int,
                    stop_ids: Sequence[int], mesh=None) -> list[list[int]]:
  """Greedy continuations of every prompt row (end token excluded), as lists of ids.

  `batch` is a prompt batch in the training schema (one prompt per row, e.g. stacked rows from
  data_pipelines.pipeline.make_generation_inputs). Rows are padded to the mesh's row count.
  """
  batch = {k: np.asarray(v) for k, v in batch.items() if k not in ("labels", "task_ids")}
  n = batch["input_ids"].shape[0]
  prompt_len = prompt_lengths(batch)
  if mesh is not None:
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    pad = (-n) % rows
    if pad:
      batch = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
      batch["audio_token_index"][n:] = -1
      prompt_len = np.concatenate([prompt_len, np.full(pad, batch["input_ids"].shape[1], np.int32)])
    replicated = NamedSharding(mesh, PartitionSpec())
    put = lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x))
    batch = {k: put(v) for k, v in batch.items()}
    prompt_len = put(prompt_len)
    stops = put(np.asarray(stop_ids, np.int32))
    with sharding_lib.use_mesh(mesh):
      out = _greedy_fn(model, int(max_new_tokens), mesh)(params, batch, prompt_len, stops)
  else:
    out = _greedy_fn(model, int(max_new_tokens))(params, batch, jnp.asarray(prompt_len),
                                                  jnp.asarray(stop_ids, jnp.int32))
  out = np.asarray(jax.device_get(out))[:n]
  return [[int(t) for t in row if t >= 0 and t not in stop_ids] for row in out]


def stack_prompts(prompts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """One-row prompt batches -> one batch with a row each."""
  return {k: np.concatenate([p[k] for p in prompts]) for k in prompts[0]}


# ----------------------------------------------------------------------------- command line

def _load_run(workdir: str, mesh):
  """(config, model, params) of the newest checkpoint of a training run."""
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    config = ml_collections.ConfigDict(json.load(f))
  prog_params = ts.abstract_params_with_shardings(config.model, mesh)
  params = checkpoint.restore_params(os.path.join(workdir, "checkpoints"), prog_params)
  return config, MossAudioModel(config=config.model), params


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", required=True, help="training run directory (checkpoints/)")
  parser.add_argument("--audio", required=True, nargs="+", help="audio files")
  parser.add_argument("--question", default="", help="ask this instead of transcribing")
  parser.add_argument("--max_new_tokens", type=int, default=128)
  args = parser.parse_args(argv)
  mesh = sharding_lib.make_mesh(ml_collections_mesh())
  config, model, params = _load_run(args.workdir, mesh)
  with tempfile.TemporaryDirectory() as tmp:
    manifest = os.path.join(tmp, "prompts.jsonl")
    with open(manifest, "w", encoding="utf-8") as f:
      for i, path in enumerate(args.audio):
        rec = {"id": f"cli-{i}", "audio": os.path.abspath(path),
               "task": "qa" if args.question else "asr", "text": "-"}
        if args.question:
          rec["question"] = args.question
        f.write(json.dumps(rec) + "\n")
    inputs = pipeline.make_generation_inputs(config, manifest, num_samples=len(args.audio))
  tok = tokenizers.load_tokenizer(config.data.tokenizer)
  ids = greedy_generate(model, params, stack_prompts([p for p, _, _ in inputs]),
                        args.max_new_tokens, (tok.im_end_id,), mesh)
  for (_, _, _), row, path in zip(inputs, ids, args.audio):
    print(f"{path}\t{tok.decode(row)}")
  return 0


def ml_collections_mesh():
  return ml_collections.ConfigDict({"shape": (1, -1, 1), "axis_names": sharding_lib.MESH_AXES})


if __name__ == "__main__":
  sys.exit(main())

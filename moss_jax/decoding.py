"""Decoding with a KV cache: prefill once, then a jitted loop of one-token steps (the library
behind `moss_jax.generate` and `hf.reference_generate`).

Decoding runs in two phases inside one jitted program:
  prefill   the audio (mel, encoder, adapter, DeepStack mergers) and the whole prompt, once, into a
            preallocated KV cache of prompt + max_new_tokens columns (MossAudioModel.prefill);
  decode    a `lax.while_loop` of one-token steps over the cache (MossAudioModel.decode_step):
            no host round trip per token; it stops when every row has emitted a stop token or
            max_new_tokens are out.
Prompts of different lengths share a batch right-padded: row b's prompt fills cache columns
0..n_b-1 and its new tokens go to columns n_b, n_b+1, ... with RoPE position = column, so every
row decodes exactly as it would alone. On a mesh the params keep their training shardings, the
activations and the cache are sharded by the model's logical axes, the prompt rows are padded to
a multiple of the batch-sharding devices, and the output is replicated to every process.

Sampling follows Hugging Face's order: repetition penalty, temperature, top-k, top-p, then a
categorical draw; temperature 0 is greedy (argmax).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from moss_jax import batch as batch_lib
from moss_jax import sharding as sharding_lib
from moss_jax.errors import UserError
from moss_jax.model import MossAudioModel
from moss_jax.model.llm import init_cache
from moss_jax.model.mel import model_audio_mel


# ----------------------------------------------------------------------------- sampling

@dataclasses.dataclass(frozen=True)
class Sampling:
  """How the next token is chosen. The defaults are the reference's sampling settings (spec 7:
  infer.py samples with temperature 1.0, top_k 50, top_p 1.0); `GREEDY` is temperature 0.

  top_k 0 keeps every token; top_p keeps the smallest set of most likely tokens whose probability
  reaches top_p; repetition_penalty divides positive (multiplies negative) logits of every token
  already in the prompt or the output (1.0 = off).
  """
  temperature: float = 1.0
  top_k: int = 50
  top_p: float = 1.0
  repetition_penalty: float = 1.0

  def __post_init__(self):
    problems = []
    if not (math.isfinite(self.temperature) and self.temperature >= 0):
      problems.append(f"temperature must be >= 0, got {self.temperature}")
    if self.top_k < 0:
      problems.append(f"top_k must be >= 0 (0 = off), got {self.top_k}")
    if not 0 < self.top_p <= 1:
      problems.append(f"top_p must be in (0, 1], got {self.top_p}")
    if not (math.isfinite(self.repetition_penalty) and self.repetition_penalty > 0):
      problems.append(f"repetition_penalty must be > 0, got {self.repetition_penalty}")
    if problems:
      raise UserError("; ".join(problems))

  @property
  def greedy(self) -> bool:
    return self.temperature == 0


GREEDY = Sampling(temperature=0.0)


def next_tokens(logits: jax.Array, seen: jax.Array, key: jax.Array, s: Sampling) -> jax.Array:
  """logits float32 [B, V], seen bool [B, V] (tokens so far) -> token ids int32 [B]."""
  if s.repetition_penalty != 1.0:
    p = jnp.float32(s.repetition_penalty)
    logits = jnp.where(seen, jnp.where(logits > 0, logits / p, logits * p), logits)
  if s.greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / jnp.float32(s.temperature)
  neg = jnp.finfo(jnp.float32).min
  if 0 < s.top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, s.top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, neg, logits)
  if s.top_p < 1.0:
    desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
    keep = jnp.sum(before < s.top_p, axis=-1, keepdims=True)  # >= 1
    threshold = jnp.take_along_axis(desc, keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, neg, logits)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


# ----------------------------------------------------------------------------- decoding

def _decode(model, params, fields, prompt_len, active, stop_ids, seed, *, max_new_tokens: int,
            sampling: Sampling, pad_id: int, mel_from_batch: bool):
  """Prefill + decode loop for right-padded prompts; -> tokens int32 [B, max_new_tokens], the
  stop token included and `pad_id` after it (and everywhere in inactive rows)."""
  variables = {"params": params}
  rng = jax.random.key(seed)
  ids = fields["input_ids"]
  n, length = ids.shape
  mel = None
  if "audio_chunk_frames" in fields and fields["audio_chunk_frames"].shape[1]:
    mel = model_audio_mel(fields, model.config) if mel_from_batch else fields["audio_mel"]
  cache = init_cache(model.config.text, n, length + max_new_tokens, jnp.dtype(model.config.dtype))
  logits, cache = model.apply(
      variables, ids, fields["positions"], fields["segment_ids"], cache, prompt_len - 1, mel,
      fields.get("audio_chunk_frames") if mel is not None else None,
      fields.get("audio_token_index") if mel is not None else None,
      method=MossAudioModel.prefill)
  vocab = logits.shape[-1]
  in_prompt = jnp.arange(length)[None, :] < prompt_len[:, None]
  seen = jnp.zeros((n, vocab), bool)
  if sampling.repetition_penalty != 1.0:
    seen = seen.at[jnp.arange(n)[:, None], jnp.clip(ids, 0, vocab - 1)].max(in_prompt)

  def emit(t, logits, seen, done, out):
    tok = next_tokens(logits, seen, jax.random.fold_in(rng, t), sampling)
    tok = jnp.where(done, pad_id, tok)
    seen = seen.at[jnp.arange(n), tok].max(~done)
    out = out.at[:, t].set(tok)
    return tok, seen, done | jnp.isin(tok, stop_ids), out

  out = jnp.full((n, max_new_tokens), pad_id, jnp.int32)
  tok, seen, done, out = emit(0, logits, seen, ~active, out)

  def cond(carry):
    t, _, _, done, _, _ = carry
    return (t < max_new_tokens) & ~jnp.all(done)

  def body(carry):
    t, tok, cache, done, seen, out = carry
    # Token t-1 sits at cache column prompt_len + t - 1; its logits choose token t.
    logits, cache = model.apply(variables, tok, cache, prompt_len + t - 1,
                                method=MossAudioModel.decode_step)
    tok, seen, done, out = emit(t, logits, seen, done, out)
    return t + 1, tok, cache, done, seen, out

  init = (jnp.ones((), jnp.int32), tok, cache, done, seen, out)
  return jax.lax.while_loop(cond, body, init)[5]


_COMPILED: dict = {}
_COMPILED_KEEP = 8  # programs kept (a model's eval and generate settings; tests make many)


def rolled_scans(model):
  """`model` with its layer scans rolled (model.scan_unroll 1), for decoding.

  Unrolled scans pay in a train step's backward pass (the scans' stacked residual buffers),
  which decoding does not have; rolled, the decode program is smaller: the demo's (8 eval
  clips, 48 new tokens) compiled in 3.8-4.4 s instead of 5.0-5.7 s (3 alternating runs each on
  the 2-core CPU) and decoded as fast. The parameters are the same; `model` is not changed.
  """
  if model.config.get("scan_unroll", 1) == 1:
    return model
  config = model.config.copy_and_resolve_references()
  config.scan_unroll = 1
  return MossAudioModel(config)


def _decode_fn(model, mesh, **static):
  """One jitted decode program per (model object, settings, mesh); jit itself retraces for new
  shapes. Modules holding a ConfigDict are not hashable, so the model is closed over, and the
  cache entry keeps it alive so its id is not reused while the entry exists."""
  key = (id(model), mesh, tuple(sorted(static.items())))
  entry = _COMPILED.pop(key, None)
  if entry is None:
    out_sh = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    entry = (model, jax.jit(functools.partial(_decode, rolled_scans(model), **static),
                            out_shardings=out_sh))
  _COMPILED[key] = entry  # most recently used last
  while len(_COMPILED) > _COMPILED_KEEP:
    del _COMPILED[next(iter(_COMPILED))]
  return entry[1]


def run_decode(model, params, fields: Mapping[str, np.ndarray], prompt_len: np.ndarray, *,
               max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
               sampling: Sampling = GREEDY, seed: int = 0, mesh=None,
               mel_from_batch: bool = True, min_rows: int = 1) -> np.ndarray:
  """The decode program on host arrays (prompts right-padded; prompt_len [N] >= 1).

  Rows are padded (with idle rows) to at least `min_rows` (callers decoding in fixed-size
  batches pass their batch size, so a short last batch reuses the compiled program) and to a
  multiple of the mesh's batch-sharding device count; the result is [N, max_new_tokens].
  """
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  fields = {k: np.asarray(v) for k, v in fields.items()}
  n = fields["input_ids"].shape[0]
  prompt_len = np.asarray(prompt_len, np.int32)
  active = np.ones(n, bool)
  rows = 1 if mesh is None else mesh.shape["data"] * mesh.shape["fsdp"]
  pad = max(n, min_rows)
  pad += (-pad) % rows - n
  if pad:
    fields = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
              for k, v in fields.items()}
    if "audio_token_index" in fields:
      fields["audio_token_index"][n:] = -1
    prompt_len = np.concatenate([prompt_len, np.ones(pad, np.int32)])
    active = np.concatenate([active, np.zeros(pad, bool)])
  args = (fields, prompt_len, active, np.asarray(stop_ids, np.int32), np.uint32(seed))
  fn = _decode_fn(model, mesh, max_new_tokens=int(max_new_tokens), sampling=sampling,
                  pad_id=int(pad_id), mel_from_batch=mel_from_batch)
  if mesh is None:
    out = fn(params, *args)
  else:
    replicated = NamedSharding(mesh, PartitionSpec())
    put = lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x))
    args = jax.tree.map(put, args)
    with sharding_lib.use_mesh(mesh):
      out = fn(params, *args)
  return np.asarray(jax.device_get(out))[:n]


PROMPT_BUCKET = 64  # prompt widths are a multiple of this: fewer distinct compiled shapes


def prompt_lengths(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """Tokens of each row's prompt (the prompt is the row's only segment, from column 0)."""
  return (np.asarray(batch["segment_ids"]) > 0).sum(axis=1).astype(np.int32)


def generate(model, params, batch: Mapping[str, np.ndarray], *, max_new_tokens: int,
             stop_ids: Sequence[int], pad_id: int, sampling: Sampling = GREEDY, seed: int = 0,
             mesh=None, min_rows: int = 1) -> np.ndarray:
  """New tokens for a batch of prompts in the project's layout -> int32 [N, max_new_tokens].

  `batch`: one prompt per row in the training schema (moss_jax/batch.py), right-padded (e.g.
  `stack_prompts` of make_generation_inputs rows): segment 1 from column 0, padding after.
  Each row's output holds its tokens, the stop token, then `pad_id`; `strip` turns a row into
  the token list without the stop. The token fields are trimmed or padded to the longest prompt
  rounded up to PROMPT_BUCKET, so a batch costs what its prompts need, not data.max_tokens, and
  batches whose longest prompts differ by a few tokens share one compiled program.
  """
  fields = {k: np.asarray(v) for k, v in batch.items() if k not in ("labels", "task_ids")}
  lengths = prompt_lengths(fields)
  seg = fields["segment_ids"]
  width = seg.shape[1]
  if (lengths == 0).any() or (seg != (np.arange(width)[None] < lengths[:, None])).any():
    raise ValueError("every prompt row must be one segment (id 1) from column 0, then padding; "
                     f"rows with other layouts: {np.flatnonzero(lengths == 0).tolist() or 'some'}")
  keep = -(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET
  for name in batch_lib.TOKEN_FIELDS:
    if name in fields:
      v = fields[name][:, :keep]
      if v.shape[1] < keep:  # padding columns, as stack_prompts writes them
        fill = -1 if name == "audio_token_index" else 0
        v = np.concatenate([v, np.full((v.shape[0], keep - v.shape[1]), fill, v.dtype)], axis=1)
      fields[name] = v
  return run_decode(model, params, fields, lengths, max_new_tokens=max_new_tokens,
                    stop_ids=stop_ids, pad_id=pad_id, sampling=sampling, seed=seed, mesh=mesh,
                    min_rows=min_rows)


def strip(row: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
  """A generated row up to (not including) its first stop token."""
  out = []
  for t in row:
    if int(t) in stop_ids:
      break
    out.append(int(t))
  return out


def stack_prompts(prompts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """One-row prompt batches of any widths and chunk-slot counts -> one batch with a row each:
  token fields right-padded (audio_token_index with -1), chunk slots padded with empty ones."""
  width = max(p["input_ids"].shape[1] for p in prompts)
  slots = max((p["audio_chunk_frames"].shape[1] for p in prompts if "audio_chunk_frames" in p),
              default=0)
  out = {}
  for k in prompts[0]:
    size = width if k in batch_lib.TOKEN_FIELDS else slots
    fill = -1 if k == "audio_token_index" else 0
    parts = []
    for p in prompts:
      v = np.asarray(p[k])
      if v.shape[1] < size:
        v = np.concatenate([v, np.full((v.shape[0], size - v.shape[1]) + v.shape[2:], fill,
                                       v.dtype)], axis=1)
      parts.append(v)
    out[k] = np.concatenate(parts)
  return out

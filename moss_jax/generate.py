"""Generation with a KV cache, and `python -m moss_jax.generate` to transcribe or ask about files.

Decoding runs in two jitted phases inside one program:
  prefill   the audio (mel, encoder, adapter, DeepStack mergers) and the whole prompt, once, into a
            preallocated KV cache of prompt + max_new_tokens columns (MossAudioModel.prefill);
  decode    a `lax.while_loop` of one-token steps over the cache (MossAudioModel.decode_step):
            no host round trip per token, it stops when every row has emitted a stop token or
            max_new_tokens are out.
Prompts of different lengths share a batch right-padded: row b's prompt fills cache columns
0..n_b-1 and its new tokens go to columns n_b, n_b+1, ... with RoPE position = column, so every
row decodes exactly as it would alone. On a mesh the params keep their training shardings and
the activations and cache are sharded by the model's logical axes; the prompt rows are padded
to a multiple of the batch-sharding devices and the output is replicated to every process.

Sampling follows Hugging Face's order: repetition penalty, temperature, top-k, top-p, then a
categorical draw; temperature 0 is greedy (argmax).

Command line (PATH: a training workdir, newest step or --step; or a reference-format directory
with config.json, the safetensors and tokenizer.json):

  python -m moss_jax.generate --checkpoint PATH --audio a.flac --audio b.wav \\
      [--task asr|asr_timestamps|caption|qa] [--prompt "..."] [--output text|json|srt] \\
      [--max_new_tokens N] [--temperature T --top_k K --top_p P --repetition_penalty R]

Recordings longer than --window_seconds are cut into equal windows that are transcribed as
separate prompts, --batch_size windows at a time, and joined (timestamps shifted by each window's
start), so a recording of tens of minutes needs the memory of one batch of windows. Every result
is printed beside its own file; a file that cannot be used (missing, empty, undecodable, NaN
samples, longer than --max_audio_seconds) gets its own `error:` line on stderr, the others are
still transcribed, and the exit status is 1.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import sys
from typing import Any, Iterator, Mapping, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import flags
from etils import epath
from jax.sharding import NamedSharding, PartitionSpec

from data_pipelines import audio as audio_lib
from data_pipelines import errors as data_errors
from data_pipelines import manifest as manifest_lib
from data_pipelines import packing
from data_pipelines import pipeline
from data_pipelines import templates
from data_pipelines import tokenizers
from moss_jax import batch as batch_lib
from moss_jax import checkpoint
from moss_jax import cli
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

def _decode(model, params, fields, prompt_len, active, stop_ids, rng, *, max_new_tokens: int,
            sampling: Sampling, pad_id: int, mel_from_batch: bool):
  """Prefill + decode loop for right-padded prompts; -> tokens int32 [B, max_new_tokens], the
  stop token included and `pad_id` after it (and everywhere in inactive rows)."""
  variables = {"params": params}
  ids = fields["input_ids"]
  n, length = ids.shape
  mel = None
  if "audio_chunk_frames" in fields:
    mel = model_audio_mel(fields, model.config) if mel_from_batch else fields["audio_mel"]
  cache = init_cache(model.config.text, n, length + max_new_tokens, jnp.dtype(model.config.dtype))
  logits, cache = model.apply(
      variables, ids, fields["positions"], fields["segment_ids"], cache, prompt_len - 1, mel,
      fields.get("audio_chunk_frames"), fields.get("audio_token_index"),
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


def _decode_fn(model, mesh, **static):
  """One jitted decode program per (model object, settings, mesh); jit itself retraces for new
  shapes. Modules holding a ConfigDict are not hashable, so the model is closed over, and the
  cache entry keeps it alive so its id is never reused."""
  key = (id(model), mesh, tuple(sorted(static.items())))
  if key not in _COMPILED:
    out_sh = NamedSharding(mesh, PartitionSpec()) if mesh is not None else None
    _COMPILED[key] = (model, jax.jit(functools.partial(_decode, model, **static),
                                     out_shardings=out_sh))
  return _COMPILED[key][1]


def run_decode(model, params, fields: Mapping[str, np.ndarray], prompt_len: np.ndarray, *,
               max_new_tokens: int, stop_ids: Sequence[int], pad_id: int,
               sampling: Sampling = GREEDY, seed: int = 0, mesh=None,
               mel_from_batch: bool = True) -> np.ndarray:
  """The decode program on host arrays (prompts right-padded; prompt_len [N] >= 1).

  Rows are padded to the mesh's batch-sharding device count; the result is [N, max_new_tokens].
  """
  if max_new_tokens < 1:
    raise UserError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  fields = {k: np.asarray(v) for k, v in fields.items()}
  n = fields["input_ids"].shape[0]
  prompt_len = np.asarray(prompt_len, np.int32)
  active = np.ones(n, bool)
  if mesh is not None:
    rows = mesh.shape["data"] * mesh.shape["fsdp"]
    pad = (-n) % rows
    if pad:
      fields = {k: np.concatenate([v, np.zeros((pad,) + v.shape[1:], v.dtype)])
                for k, v in fields.items()}
      if "audio_token_index" in fields:
        fields["audio_token_index"][n:] = -1
      prompt_len = np.concatenate([prompt_len, np.ones(pad, np.int32)])
      active = np.concatenate([active, np.zeros(pad, bool)])
  args = (fields, prompt_len, active, np.asarray(stop_ids, np.int32),
          jax.random.key(seed))
  fn = _decode_fn(model, mesh, max_new_tokens=int(max_new_tokens), sampling=sampling,
                  pad_id=int(pad_id), mel_from_batch=mel_from_batch)
  if mesh is None:
    out = fn(params, *args)
  else:
    replicated = NamedSharding(mesh, PartitionSpec())
    put = lambda x: jax.make_array_from_process_local_data(replicated, np.asarray(x))
    args = jax.tree.map(put, args[:4]) + (args[4],)
    with sharding_lib.use_mesh(mesh):
      out = fn(params, *args)
  return np.asarray(jax.device_get(out))[:n]


PROMPT_BUCKET = 64  # prompts are trimmed to a multiple of this: fewer distinct compiled shapes


def prompt_lengths(batch: Mapping[str, np.ndarray]) -> np.ndarray:
  """Tokens of each row's prompt (the prompt is the row's only segment, from column 0)."""
  return (np.asarray(batch["segment_ids"]) > 0).sum(axis=1).astype(np.int32)


def generate(model, params, batch: Mapping[str, np.ndarray], *, max_new_tokens: int,
             stop_ids: Sequence[int], pad_id: int, sampling: Sampling = GREEDY, seed: int = 0,
             mesh=None) -> np.ndarray:
  """New tokens for a batch of prompts in the project's layout -> int32 [N, max_new_tokens].

  `batch`: one prompt per row in the training schema (moss_jax/batch.py), right-padded (e.g.
  `stack_prompts` of make_generation_inputs rows): segment 1 from column 0, padding after.
  Each row's output holds its tokens, the stop token, then `pad_id`; `strip` turns a row into
  the token list without the stop. Prompts are trimmed to the longest one (rounded up to
  PROMPT_BUCKET), so a batch costs what its prompts need, not data.max_tokens.
  """
  fields = {k: np.asarray(v) for k, v in batch.items() if k not in ("labels", "task_ids")}
  lengths = prompt_lengths(fields)
  seg = fields["segment_ids"]
  width = seg.shape[1]
  if (lengths == 0).any() or (seg != (np.arange(width)[None] < lengths[:, None])).any():
    raise ValueError("every prompt row must be one segment (id 1) from column 0, then padding; "
                     f"rows with other layouts: {np.flatnonzero(lengths == 0).tolist() or 'some'}")
  keep = min(width, -(-int(lengths.max()) // PROMPT_BUCKET) * PROMPT_BUCKET)
  for name in batch_lib.TOKEN_FIELDS:
    if name in fields:
      fields[name] = fields[name][:, :keep]
  return run_decode(model, params, fields, lengths, max_new_tokens=max_new_tokens,
                    stop_ids=stop_ids, pad_id=pad_id, sampling=sampling, seed=seed, mesh=mesh)


def strip(row: Sequence[int], stop_ids: Sequence[int]) -> list[int]:
  """A generated row up to (not including) its first stop token."""
  out = []
  for t in row:
    if int(t) in stop_ids:
      break
    out.append(int(t))
  return out


def stack_prompts(prompts: Sequence[Mapping[str, np.ndarray]]) -> dict[str, np.ndarray]:
  """One-row prompt batches (any widths) -> one right-padded batch with a row each."""
  width = max(p["input_ids"].shape[1] for p in prompts)
  fill = {"audio_token_index": -1}
  out = {}
  for k in prompts[0]:
    parts = []
    for p in prompts:
      v = np.asarray(p[k])
      if k in batch_lib.TOKEN_FIELDS and v.shape[1] < width:
        v = np.concatenate([v, np.full((v.shape[0], width - v.shape[1]), fill.get(k, 0), v.dtype)],
                           axis=1)
      parts.append(v)
    out[k] = np.concatenate(parts)
  return out


# ----------------------------------------------------------------------------- checkpoints

@dataclasses.dataclass
class Loaded:
  """A model ready to generate: the model, its params, the data settings that build its prompts
  (config.data fields: tokenizer, feature_mode, time_markers, max_audio_seconds) and the
  tokenizer."""
  model: Any
  params: Any
  config: ml_collections.ConfigDict
  tokenizer: Any
  kind: str  # "run" or "reference"

  @property
  def stop_ids(self) -> tuple[int, ...]:
    return (self.tokenizer.im_end_id, self.tokenizer.pad_id)


def load(path: str, mesh, step: int | None = None) -> Loaded:
  """A training workdir (config.json + checkpoints/) or a reference-format directory."""
  root = epath.Path(path)
  cfg_file = root / "config.json"
  if not root.is_dir() or not cfg_file.exists():
    raise UserError(f"{path}: no config.json there; --checkpoint takes a training workdir or a "
                    "reference-format (Hugging Face) directory")
  try:
    raw = json.loads(cfg_file.read_text())
  except json.JSONDecodeError as e:
    raise UserError(f"{cfg_file}: not valid JSON ({e})") from None
  if "model" in raw and "data" in raw:
    return _load_run(root, ml_collections.ConfigDict(raw), mesh, step)
  if "audio_config" in raw:
    if step is not None:
      raise UserError(f"--step applies to training runs; {path} is a reference-format directory")
    return _load_reference(str(root), mesh)
  raise UserError(f"{cfg_file} is neither a training run's config nor a reference config.json")


def _load_run(root: epath.Path, config, mesh, step: int | None) -> Loaded:
  from moss_jax import train_step as ts  # pylint: disable=g-import-not-at-top  (heavy: optax)
  ckpt_dir = root / "checkpoints"
  if not checkpoint.complete_steps(str(ckpt_dir)):
    raise UserError(f"{root}: no complete checkpoint under {ckpt_dir}")
  if step is not None and step not in checkpoint.complete_steps(str(ckpt_dir)):
    raise UserError(f"{root}: no complete checkpoint of step {step} (have "
                    f"{checkpoint.complete_steps(str(ckpt_dir))})")
  abstract = ts.abstract_params_with_shardings(config.model, mesh)
  params = checkpoint.restore_params(str(ckpt_dir), abstract, step)
  tok = tokenizers.load_tokenizer(config.data.tokenizer)
  return Loaded(MossAudioModel(config=config.model), params, config, tok, "run")


def _load_reference(path: str, mesh) -> Loaded:
  from moss_jax import hf  # pylint: disable=g-import-not-at-top  (safetensors readers)
  from moss_jax.hf import config_io  # pylint: disable=g-import-not-at-top
  tok_file = epath.Path(path) / "tokenizer.json"
  if not tok_file.exists():
    raise UserError(f"{path}: no tokenizer.json beside the weights (copy the released repo's "
                    "tokenizer files there)")
  ids = config_io.read_token_ids(path)
  proc_file = epath.Path(path) / "processor_config.json"
  proc = json.loads(proc_file.read_text()) if proc_file.exists() else {}
  data = ml_collections.ConfigDict(dict(
      tokenizer=dict(kind="hf", path=str(tok_file), audio_token_id=ids["audio_token_id"],
                     audio_bos_id=ids["audio_start_id"], audio_eos_id=ids["audio_end_id"],
                     im_end_id=ids["eos_token_id"], pad_id=ids["bos_token_id"]),
      feature_mode="mel", time_markers=bool(proc.get("enable_time_marker", True)),
      max_audio_seconds=math.inf))
  model, params = hf.load_pretrained(path, mesh=mesh)
  config = ml_collections.ConfigDict({"model": model.config.to_dict(), "data": data.to_dict()})
  return Loaded(model, params, config, tokenizers.load_tokenizer(data.tokenizer), "reference")


# ----------------------------------------------------------------------------- prompts

TASK_CHOICES = ("asr", "asr_timestamps", "caption", "qa")


def prompt_row(loaded: Loaded, ref: manifest_lib.AudioRef, wave: np.ndarray, task: str,
               question: str | None, source: str) -> dict[str, np.ndarray]:
  """The one-row prompt batch for one audio (default question of `task` unless given)."""
  data = loaded.config.data
  sample = manifest_lib.Sample(id=source, task=task, audios=(ref,), text="", question=question,
                               source=source)
  encoder = pipeline.RecordEncoder(loaded.tokenizer, feature_mode=data.feature_mode,
                                   time_markers=data.time_markers, prompt_only=True)
  encoded = encoder.encode(sample, [wave])
  spec = packing.PackSpec(rows=1, max_tokens=encoded.num_tokens,
                                   max_chunks=encoded.num_chunks, feature_mode=data.feature_mode,
                                   pad_id=loaded.tokenizer.pad_id)
  packer = packing.BatchPacker(spec)
  packer.try_add(encoded)
  return packer.build()


def pad_chunks(rows: Sequence[dict[str, np.ndarray]]) -> list[dict[str, np.ndarray]]:
  """Gives every row the same number of chunk slots (empty slots: 0 frames, zero features)."""
  c = max(r["audio_chunk_frames"].shape[1] for r in rows)
  out = []
  for r in rows:
    r = dict(r)
    have = r["audio_chunk_frames"].shape[1]
    if have < c:
      for k in ("audio_chunk_frames", "audio_chunk_audio_id", "audio_mel", "audio_waveform"):
        if k in r:
          v = r[k]
          r[k] = np.concatenate([v, np.zeros((1, c - have) + v.shape[2:], v.dtype)], axis=1)
    out.append(r)
  return out


# ----------------------------------------------------------------------------- transcripts

Segment = manifest_lib.Segment


def offset_segments(text: str, offset: float) -> list[Segment]:
  """Timestamped text of one window -> segments in seconds from the start of the recording."""
  return [Segment(round(s.start + offset, 3), round(s.end + offset, 3), s.text)
          for s in templates.parse_timestamps(text)]


def srt_time(seconds: float) -> str:
  ms = max(0, int(round(seconds * 1000)))
  h, rest = divmod(ms, 3_600_000)
  m, rest = divmod(rest, 60_000)
  s, ms = divmod(rest, 1000)
  return f"{h:02d}:{m:02d}:{s:02d},{ms:03d}"


def to_srt(segments: Sequence[Segment]) -> str:
  """SubRip cues (numbered from 1), one per segment."""
  return "".join(f"{i}\n{srt_time(s.start)} --> {srt_time(s.end)}\n{s.text}\n\n"
                 for i, s in enumerate(segments, 1))


@dataclasses.dataclass
class FileResult:
  """What one input file produced: its windows' texts (with start/end seconds) or an error."""
  path: str
  windows: list[tuple[float, float, str]] = dataclasses.field(default_factory=list)
  error: str | None = None

  @property
  def text(self) -> str:
    return " ".join(t.strip() for _, _, t in self.windows if t.strip())

  def segments(self, timestamps: bool) -> list[Segment]:
    if timestamps:
      return [s for start, _, t in self.windows for s in offset_segments(t, start)]
    return [Segment(a, b, t.strip()) for a, b, t in self.windows if t.strip()]


def windows_of(duration: float, window_seconds: float) -> list[tuple[float, float]]:
  """Equal windows of at most window_seconds covering [0, duration): (offset, length) pairs."""
  k = max(1, math.ceil(duration / window_seconds - 1e-9))
  step = duration / k
  return [(i * step, step if i < k - 1 else duration - i * step) for i in range(k)]


def transcribe_files(loaded: Loaded, paths: Sequence[str], *, task: str, question: str | None,
                     max_new_tokens: int, sampling: Sampling, seed: int, batch_size: int,
                     window_seconds: float, max_audio_seconds: float, mesh
                     ) -> Iterator[FileResult]:
  """Yields one FileResult per path, in order, as soon as the file and those before it are done.

  Windows of all files stream through decode batches of `batch_size`, each result carried with
  its file's index (never matched up by position afterwards). A file whose header, any window's
  decode or prompt fails gets the error and no text; the other files go on.
  """
  results = [FileResult(p) for p in paths]
  remaining: list[int | None] = [None] * len(paths)  # windows left; None = not opened yet
  batch: list[tuple[int, float, float, dict]] = []
  next_out = 0

  def fail(i: int, e: data_errors.BadRecordError) -> None:
    results[i].error = str(e)
    results[i].windows.clear()

  def run_batch() -> None:
    rows = pad_chunks([r for *_, r in batch])
    out = generate(loaded.model, loaded.params, stack_prompts(rows),
                   max_new_tokens=max_new_tokens, stop_ids=loaded.stop_ids,
                   pad_id=loaded.tokenizer.pad_id, sampling=sampling, seed=seed, mesh=mesh)
    for (i, offset, length, _), row in zip(batch, out, strict=True):
      if results[i].error is None:
        text = loaded.tokenizer.decode(strip(row, loaded.stop_ids))
        results[i].windows.append((offset, offset + length, text))
      remaining[i] -= 1
    batch.clear()

  def finished() -> Iterator[FileResult]:
    nonlocal next_out
    while next_out < len(paths) and remaining[next_out] == 0:
      yield results[next_out]
      next_out += 1

  for i, path in enumerate(paths):
    try:
      duration = audio_lib.audio_duration(path)
      if duration > max_audio_seconds:
        raise data_errors.BadRecordError(
            data_errors.TOO_LONG, f"lasts {duration:.1f} s, over --max_audio_seconds="
            f"{max_audio_seconds:g}", path=path)
      spans = windows_of(duration, window_seconds)
    except data_errors.BadRecordError as e:
      fail(i, e)
      spans = []
    remaining[i] = len(spans)
    for offset, length in spans:
      if results[i].error is not None:
        remaining[i] -= 1
        continue
      try:
        wave = audio_lib.load_audio(path, offset, length)
        if len(wave) < manifest_lib.MIN_AUDIO_SAMPLES:
          raise data_errors.BadRecordError(
              data_errors.TOO_SHORT, f"lasts {len(wave) / batch_lib.SAMPLE_RATE * 1000:.0f} ms, "
              "under one encoder token (80 ms)", path=path)
        row = prompt_row(loaded, manifest_lib.AudioRef(path, offset, length), wave, task,
                         question, f"{path}@{offset:.2f}s")
      except data_errors.BadRecordError as e:
        fail(i, e)
        remaining[i] -= 1
        continue
      batch.append((i, offset, length, row))
      if len(batch) == batch_size:
        run_batch()
        yield from finished()
    yield from finished()
  if batch:
    run_batch()
  yield from finished()


# ----------------------------------------------------------------------------- command line

_CHECKPOINT = flags.DEFINE_string("checkpoint", None, "training workdir or reference-format dir")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step of a training run (default: newest)")
_AUDIO = flags.DEFINE_multi_string("audio", [], "audio file; repeat the flag for more files")
_PROMPT = flags.DEFINE_string("prompt", None, "the question (default: the task's prompt)")
_TASK = flags.DEFINE_enum("task", "asr", TASK_CHOICES, "what to ask (qa needs --prompt)")
_OUTPUT = flags.DEFINE_enum("output", "text", ("text", "json", "srt"),
                            "text: 'FILE<tab>text' lines; json: one object per file; srt: "
                            "subtitles per file (under a '==> FILE <==' line)")
_MAX_NEW = flags.DEFINE_integer("max_new_tokens", 512, "new tokens per window at most")
_TEMPERATURE = flags.DEFINE_float("temperature", 0.0,
                                  "0 = greedy (deterministic transcripts); the reference samples "
                                  "with 1.0")
_TOP_K = flags.DEFINE_integer("top_k", 50, "sample from the k most likely tokens (0 = all)")
_TOP_P = flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
_REP = flags.DEFINE_float("repetition_penalty", 1.0, "penalty for repeated tokens (1 = off)")
_SEED = flags.DEFINE_integer("seed", 0, "sampling seed")
_BATCH = flags.DEFINE_integer("batch_size", 8, "windows decoded together")
_WINDOW = flags.DEFINE_float("window_seconds", 30.0, "recordings longer than this are cut into "
                             "windows transcribed separately")
_MAX_SECONDS = flags.DEFINE_float("max_audio_seconds", 4 * 3600.0,
                                  "files longer than this are refused")


def make_mesh():
  """All local devices on the fsdp axis (like the training default)."""
  return sharding_lib.make_mesh(ml_collections.ConfigDict(
      {"shape": (1, -1, 1), "axis_names": sharding_lib.MESH_AXES}))


def sampling_from_flags() -> Sampling:
  return Sampling(temperature=_TEMPERATURE.value, top_k=_TOP_K.value, top_p=_TOP_P.value,
                  repetition_penalty=_REP.value)


def _print_result(res: FileResult, output: str, timestamps: bool) -> None:
  if res.error is not None:
    print(f"error: {res.path}: {res.error}", file=sys.stderr, flush=True)
    if output == "json":
      print(json.dumps({"audio": res.path, "error": res.error}, ensure_ascii=False), flush=True)
    return
  if output == "text":
    print(f"{res.path}\t{res.text}", flush=True)
  elif output == "json":
    segs = [dict(start=s.start, end=s.end, text=s.text) for s in res.segments(timestamps)]
    print(json.dumps({"audio": res.path, "text": res.text, "segments": segs},
                     ensure_ascii=False), flush=True)
  else:
    print(f"==> {res.path} <==\n{to_srt(res.segments(timestamps))}", end="", flush=True)


def main(argv: Sequence[str]) -> int:
  del argv
  cli.require("checkpoint", "audio")
  if _TASK.value == "qa" and not _PROMPT.value:
    raise UserError("--task qa needs --prompt (the question)")
  if _BATCH.value < 1 or _WINDOW.value <= 0:
    raise UserError("--batch_size must be >= 1 and --window_seconds > 0")
  sampling = sampling_from_flags()
  mesh = make_mesh()
  loaded = load(_CHECKPOINT.value, mesh, _STEP.value)
  failed = 0
  timestamps = _TASK.value == "asr_timestamps"
  for res in transcribe_files(loaded, _AUDIO.value, task=_TASK.value, question=_PROMPT.value,
                              max_new_tokens=_MAX_NEW.value, sampling=sampling, seed=_SEED.value,
                              batch_size=_BATCH.value, window_seconds=_WINDOW.value,
                              max_audio_seconds=_MAX_SECONDS.value, mesh=mesh):
    failed += res.error is not None
    _print_result(res, _OUTPUT.value, timestamps)
  if failed:
    print(f"error: {failed} of {len(_AUDIO.value)} files failed", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  cli.run(main)

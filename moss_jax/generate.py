"""`python -m moss_jax.generate`: transcribe, caption or ask about audio files with a trained
run or a reference-format checkpoint; `generate(...)` is the Python API (moss_jax/decoding.py).

  python -m moss_jax.generate --checkpoint PATH --audio a.flac --audio b.wav \\
      [--task asr|asr_timestamps|caption|qa] [--prompt "..."] [--output text|json|srt] \\
      [--max_new_tokens N] [--temperature T --top_k K --top_p P --repetition_penalty R]

PATH is a training workdir (its newest complete checkpoint, or --step) or a reference-format
directory (config.json, the safetensors, tokenizer.json). Prompts use the reference layout (spec
5.2) with time markers as the run (or processor_config.json) says. --output json gives one object
per file with `segments` (timestamped tasks: the model's [start]text[end] pieces; otherwise one
per window); --output srt gives SubRip cues of the same segments.

Recordings longer than --window_seconds are cut into equal windows that are transcribed as
separate prompts, --batch_size windows at a time, and joined (timestamps shifted by each window's
start), so a recording of tens of minutes needs the memory of one batch of windows. Every result
is printed beside its own file; a file that cannot be used (missing, empty, undecodable, NaN
samples, longer than --max_audio_seconds) gets its own `error:` line on stderr, the other files
are still transcribed, and the exit status is 1.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
from typing import Any, Iterator, Sequence

import ml_collections
import numpy as np
from absl import flags
from etils import epath

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
from moss_jax import diagnostics
from moss_jax import hf
from moss_jax.hf import config_io
from moss_jax import sharding as sharding_lib
from moss_jax import train_step as ts
# The Python API lives in moss_jax.decoding; `moss_jax.generate.generate(...)` is the same.
from moss_jax.decoding import (GREEDY, Sampling, generate, prompt_lengths,  # noqa: F401
                               stack_prompts, strip)
from moss_jax.errors import UserError
from moss_jax.model import MossAudioModel


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
  ckpt_dir = root / "checkpoints"
  if not checkpoint.complete_steps(str(ckpt_dir)):
    raise UserError(f"{root}: no complete checkpoint under {ckpt_dir}")
  if step is not None and step not in checkpoint.complete_steps(str(ckpt_dir)):
    raise UserError(f"{root}: no complete checkpoint of step {step} (have "
                    f"{checkpoint.complete_steps(str(ckpt_dir))})")
  abstract = ts.abstract_params_with_shardings(config.model, mesh)
  params = checkpoint.restore_params(str(ckpt_dir), abstract, step)
  tok = tokenizers.load_tokenizer(config.data.tokenizer)
  return Loaded(MossAudioModel(config=config.model), params, config, tok)


def _load_reference(path: str, mesh) -> Loaded:
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
  return Loaded(model, params, config, tokenizers.load_tokenizer(data.tokenizer))


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
    out = generate(loaded.model, loaded.params, stack_prompts([r for *_, r in batch]),
                   max_new_tokens=max_new_tokens, stop_ids=loaded.stop_ids,
                   pad_id=loaded.tokenizer.pad_id, sampling=sampling, seed=seed, mesh=mesh,
                   min_rows=batch_size)
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

def define_flags() -> None:
  """The command's flags; defined only when it runs, so `moss_jax.evaluate` (which defines
  flags of the same names) can import this module."""
  flags.DEFINE_string("checkpoint", None, "training workdir or reference-format dir")
  flags.DEFINE_integer("step", None, "checkpoint step of a training run (default: newest)")
  flags.DEFINE_multi_string("audio", [], "audio file; repeat the flag for more files")
  flags.DEFINE_string("prompt", None, "the question (default: the task's prompt)")
  flags.DEFINE_enum("task", "asr", TASK_CHOICES, "what to ask (qa needs --prompt)")
  flags.DEFINE_enum("output", "text", ("text", "json", "srt"),
                    "text: 'FILE<tab>text' lines; json: one object per file; srt: subtitles per "
                    "file (under a '==> FILE <==' line)")
  flags.DEFINE_integer("max_new_tokens", 512, "new tokens per window at most")
  flags.DEFINE_float("temperature", 0.0, "0 = greedy (deterministic transcripts); the "
                     "reference samples with 1.0")
  flags.DEFINE_integer("top_k", 50, "sample from the k most likely tokens (0 = all)")
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass")
  flags.DEFINE_float("repetition_penalty", 1.0, "penalty for repeated tokens (1 = off)")
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.DEFINE_integer("batch_size", 8, "windows decoded together")
  flags.DEFINE_float("window_seconds", 30.0, "recordings longer than this are cut into windows "
                     "transcribed separately")
  flags.DEFINE_float("max_audio_seconds", 4 * 3600.0, "files longer than this are refused")


def make_mesh():
  """All local devices on the fsdp axis (like the training default)."""
  return sharding_lib.make_mesh(ml_collections.ConfigDict(
      {"shape": (1, -1, 1)}))


def sampling_from_flags() -> Sampling:
  f = flags.FLAGS
  return Sampling(temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
                  repetition_penalty=f.repetition_penalty)


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
  f = flags.FLAGS
  cli.require("checkpoint", "audio")
  if f.task == "qa" and not f.prompt:
    raise UserError("--task qa needs --prompt (the question)")
  if f.batch_size < 1 or f.window_seconds <= 0 or f.max_new_tokens < 1:
    raise UserError("--batch_size and --max_new_tokens must be >= 1, --window_seconds > 0")
  sampling = sampling_from_flags()
  diagnostics.setup_compilation_cache("", None)  # the user's cache: a rerun skips compiling
  mesh = make_mesh()
  loaded = load(f.checkpoint, mesh, f.step)
  failed = 0
  for res in transcribe_files(loaded, f.audio, task=f.task, question=f.prompt,
                              max_new_tokens=f.max_new_tokens, sampling=sampling, seed=f.seed,
                              batch_size=f.batch_size, window_seconds=f.window_seconds,
                              max_audio_seconds=f.max_audio_seconds, mesh=mesh):
    failed += res.error is not None
    _print_result(res, f.output, f.task == "asr_timestamps")
  if failed:
    print(f"error: {failed} of {len(f.audio)} files failed", file=sys.stderr, flush=True)
    return 1
  return 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)

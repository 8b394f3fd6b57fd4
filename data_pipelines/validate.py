"""Checks manifests before a run spends accelerator time on them.

    python -m data_pipelines.validate --manifests=A.jsonl[,B.jsonl ...] [--max_audio_seconds=600]
        [--config=configs/pretrain.py:demo [--config.data.max_tokens=2048 ...]] [--workers=N]
        [--json]

Every record is parsed and every audio decoded by the training pipeline's own map step
(pipeline.RecordEncoder.load), so a record this tool accepts is one the pipeline will not skip
for a data reason. With --config the record is also tokenized and templated as that config trains
it and checked against its row size (does_not_fit), and the config's max_audio_seconds applies. Each problem is printed as `manifest:line: reason:
detail`; then a summary (records, hours of audio, records per task, problems per reason). The exit
status is 1 when any record has a problem, so the tool can gate a job script.

Checks, by the reason they report (data_pipelines/errors.py):
  malformed_json / bad_encoding / missing_field / bad_field   the record itself
  missing_file / empty_file / corrupt_audio / unsupported_format / non_finite_audio   the audio
  too_short   under one encoder token (8 mel frames, 80 ms)
  too_long    over --max_audio_seconds
  bad_timestamps   segments out of order, ending before they start, or past the end of the audio
  does_not_fit     (--config) the encoded record needs more tokens or audio chunks than one row
"""

from __future__ import annotations

import collections
import dataclasses
import json
import multiprocessing
import os
from typing import Iterable, Iterator

from absl import flags
from ml_collections import config_flags

from data_pipelines import errors, manifest, packing, pipeline, tokenizers
from moss_jax import batch as batch_lib
from moss_jax import cli, progress
from moss_jax.errors import UserError

DEFAULT_MAX_AUDIO_SECONDS = 600.0  # the reference's recommended ceiling (spec section 7)


@dataclasses.dataclass(frozen=True)
class Result:
  """The outcome for one manifest line: a task and audio seconds, or a problem."""
  source: str
  task: str | None = None
  seconds: float = 0.0
  audios: tuple[tuple[str, float, float], ...] = ()  # (path, offset, seconds decoded)
  reason: str | None = None
  detail: str | None = None
  path: str | None = None

  def problem_line(self) -> str:
    where = f" (file {self.path})" if self.path else ""
    return f"{self.source}: {self.reason}: {self.detail}{where}"


def check_line(raw: manifest.RawLine, encoder: pipeline.RecordEncoder,
               spec: packing.PackSpec | None = None) -> Result:
  """Parses and decodes one line (and encodes it when `spec` is given); a data problem becomes a
  Result, never an exception."""
  source = f"{raw.manifest}:{raw.lineno}"
  try:
    sample, waves = encoder.load(raw)
    if spec is not None:
      encoded = encoder.encode(sample, waves)
      if not packing.fits_empty_row(encoded, spec):
        raise errors.BadRecordError(errors.DOES_NOT_FIT, packing.does_not_fit_detail(encoded, spec),
                                    record=source)
  except errors.BadRecordError as e:
    return Result(source, reason=e.reason, detail=e.detail, path=e.path)
  lengths = [len(w) / batch_lib.SAMPLE_RATE for w in waves]
  audios = tuple((ref.path, ref.offset, n) for ref, n in zip(sample.audios, lengths))
  return Result(source, task=sample.task, seconds=sum(lengths), audios=audios)


def count_lines(paths: Iterable[str]) -> int:
  """Non-blank lines of the manifests (the progress bar's total)."""
  n = 0
  for path in paths:
    with open(path, "rb") as f:
      n += sum(1 for line in f if line.strip())
  return n


def _raw_lines(paths: Iterable[str]) -> Iterator[manifest.RawLine]:
  for path in paths:
    with open(path, "rb") as f:
      for lineno, line in enumerate(f, start=1):
        if line.strip():
          yield manifest.RawLine(line, path, lineno)


def _check_star(args) -> Result:
  return check_line(*args)


def make_checker(config=None, max_audio_seconds: float | None = None):
  """(encoder, spec): decode-only without a config; decode + encode + fit check with one."""
  if config is None:
    limit = DEFAULT_MAX_AUDIO_SECONDS if max_audio_seconds is None else max_audio_seconds
    return pipeline.RecordEncoder(None, max_audio_seconds=limit), None  # load() needs no tokenizer
  if max_audio_seconds is not None:
    config = config.copy_and_resolve_references()
    config.data.max_audio_seconds = max_audio_seconds
  tokenizer = tokenizers.load_tokenizer(config.data.tokenizer)
  encoder = pipeline.RecordEncoder(
      tokenizer, feature_mode=config.data.feature_mode, time_markers=config.data.time_markers,
      max_audio_seconds=config.data.max_audio_seconds)
  return encoder, pipeline.pack_spec(config, 1, tokenizer)


def check_manifests(paths: list[str], max_audio_seconds: float | None = None, workers: int = 0,
                    config=None) -> Iterator[Result]:
  """Results for every non-blank line of `paths`, in file order (decoded in `workers` processes).

  `max_audio_seconds` None means the config's limit, or DEFAULT_MAX_AUDIO_SECONDS without one.
  """
  encoder, spec = make_checker(config, max_audio_seconds)
  jobs = ((raw, encoder, spec) for raw in _raw_lines(paths))
  if workers <= 0:
    yield from map(_check_star, jobs)
    return
  with multiprocessing.get_context("spawn").Pool(workers) as pool:
    yield from pool.imap(_check_star, jobs, chunksize=8)


@dataclasses.dataclass
class Summary:
  """Totals over all results; `problems` counts records per reason."""
  records: int = 0
  good: int = 0
  seconds: float = 0.0
  distinct: dict = dataclasses.field(default_factory=dict)  # (path, offset) -> seconds
  tasks: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  problems: collections.Counter = dataclasses.field(default_factory=collections.Counter)

  def add(self, result: Result) -> None:
    self.records += 1
    if result.reason:
      self.problems[result.reason] += 1
      return
    self.good += 1
    self.seconds += result.seconds
    self.tasks[result.task] += 1
    for path, offset, seconds in result.audios:
      self.distinct[(path, offset)] = seconds

  @property
  def distinct_seconds(self) -> float:
    return sum(self.distinct.values())

  def as_dict(self) -> dict:
    return {"records": self.records, "good_records": self.good,
            "hours": round(self.seconds / 3600, 4), "audio_files": len(self.distinct),
            "distinct_hours": round(self.distinct_seconds / 3600, 4), "tasks": dict(sorted(self.tasks.items())),
            "problems": dict(sorted(self.problems.items()))}

  def text(self) -> str:
    tasks = ", ".join(f"{k} {v}" for k, v in sorted(self.tasks.items())) or "none"
    problems = ", ".join(f"{k} {v}" for k, v in sorted(self.problems.items())) or "none"
    return (f"records: {self.records} ({self.good} good, {self.records - self.good} with problems)\n"
            f"audio: {self.seconds / 3600:.4f} hours ({self.seconds:.1f} s) over the good records, "
            f"{self.distinct_seconds / 3600:.4f} hours in {len(self.distinct)} distinct clips\n"
            f"tasks: {tasks}\n"
            f"problems: {problems}")


def run(manifests: list[str], max_audio_seconds: float | None = None, workers: int = 0,
        config=None, as_json: bool = False) -> int:
  """Checks the manifests, prints every problem and the summary; 1 when any record has a problem.

  Raises UserError when a manifest does not exist.
  """
  missing = [p for p in manifests if not os.path.isfile(p)]
  if missing:
    raise UserError(f"manifest not found: {', '.join(missing)}")
  summary = Summary()
  results = check_manifests(manifests, max_audio_seconds, workers, config)
  for result in progress.track(results, "checking records", total=count_lines(manifests)):
    summary.add(result)
    if result.reason:
      print(result.problem_line(), flush=True)
  print(json.dumps(summary.as_dict()) if as_json else summary.text())
  return 1 if summary.problems else 0


def _define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing this module (tests,
  benchmarks) adds no flags to another program."""
  flags.DEFINE_list("manifests", None, "JSONL manifests to check (a.jsonl,b.jsonl).")
  flags.DEFINE_float("max_audio_seconds", None, "Longest clip accepted (default: the config's "
                     f"data.max_audio_seconds, else {DEFAULT_MAX_AUDIO_SECONDS:g}).")
  config_flags.DEFINE_config_file(
      "config", None, "Also encode each record as this config trains it and check it fits a "
      "row (e.g. configs/pretrain.py:demo); its fields take overrides: --config.data.max_tokens=N.")
  flags.DEFINE_integer("workers", 0, "Decoding processes (0 = in this process).")
  flags.DEFINE_bool("json", False, "Print the summary as one JSON line.")


def main(argv) -> int:
  del argv  # cli.run rejects stray arguments
  cli.require("manifests")
  f = flags.FLAGS
  return run([p for p in f.manifests if p], f.max_audio_seconds, f.workers, f.config, f.json)


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

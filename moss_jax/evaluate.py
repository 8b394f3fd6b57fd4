"""Evaluation: token loss per task, and `python -m moss_jax.evaluate` scoring generated answers.

  python -m moss_jax.evaluate --checkpoint PATH --manifest eval.jsonl [--task asr,qa] \\
      --output report.json [--max_samples N] [--batch_size 8] [--max_new_tokens 256]

Every record of the manifest (native, messages or conversation format) is prompted as in
training, decoded greedily in batches with the KV cache (moss_jax/decoding.py), and scored by
task. `report.json` holds the figures per task; `report.hypotheses.jsonl` beside it one line per
record (id, manifest:line, task, reference, hypothesis, its own scores, or the error that kept
it out). A record that cannot be used gets an `error:` line and the exit status 1; the others
are still scored. Training-time evaluation (train.Run.evaluate) calls `score_manifest` too.

Metrics (all corpus-level: total errors over total reference units, not means of per-sample
rates):
  wer   word error rate of normalised text. Words are whitespace-separated, except that every
        CJK character is a word of its own, so Chinese (written without spaces) and mixed text
        are scored sensibly.
  cer   character error rate of normalised text with the spaces removed: the figure to read for
        Chinese (the reference reports CER on its Mandarin suites).
  aas   timestamped ASR: mean absolute offset, in ms, of the segment boundaries (start and end)
        of hypothesis segments matched to reference segments (the reference's AAS). Segments are
        matched by an order-preserving alignment that minimises the summed CER of the matched
        segments' texts plus 1 per unmatched segment; unmatched segments are counted
        (`aas_unmatched`), not scored. wer/cer of these records use the text without timestamps.
  accuracy  multiple-choice QA (reference answer a single option letter A-H): the hypothesis's
        chosen letter (the first standalone capital A-H, e.g. "B", "(B)", "B. text", "answer: B")
        equals the reference's; other QA: the normalised texts are equal.
  captions are not scored automatically (their hypotheses are in the JSONL).
Text normaliser (`normalize_text`): Unicode NFKC, lower case, every punctuation or symbol
character (Unicode categories P* and S*) replaced by a space, whitespace collapsed.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import unicodedata
from typing import Any, Iterable, Iterator, Mapping, Sequence

import jax
import jiwer
import numpy as np
from absl import flags
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from data_pipelines import errors as data_errors
from data_pipelines import manifest as manifest_lib
from data_pipelines import packing
from data_pipelines import pipeline
from data_pipelines import templates
from moss_jax import batch as batch_lib
from moss_jax import cli
from moss_jax import decoding
from moss_jax import diagnostics
from moss_jax import generate
from moss_jax.errors import UserError
from moss_jax.metrics import summarize_stats
from moss_jax.progress import Progress

# ----------------------------------------------------------------------------- text metrics

_CJK = re.compile(r"([\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\uac00-\ud7af])")


def normalize_text(text: str) -> str:
  """NFKC, lower case, punctuation and symbols -> spaces, whitespace collapsed."""
  text = unicodedata.normalize("NFKC", text).lower()
  text = "".join(" " if unicodedata.category(c)[0] in "PS" else c for c in text)
  return " ".join(text.split())


def words(text: str) -> str:
  """Normalised text with every CJK character as a word of its own (space-separated)."""
  return " ".join(_CJK.sub(r" \1 ", normalize_text(text)).split())


def chars(text: str) -> str:
  """Normalised text without spaces."""
  return normalize_text(text).replace(" ", "")


def _edits(ref: str, hyp: str, char_level: bool) -> int:
  if not ref:
    return len(hyp) if char_level else len(hyp.split())
  out = (jiwer.process_characters if char_level else jiwer.process_words)(ref, hyp)
  return out.substitutions + out.deletions + out.insertions


def text_errors(reference: str, hypothesis: str) -> dict[str, int]:
  """Word and character edits and reference lengths of one pair (after normalisation)."""
  rw, hw, rc, hc = words(reference), words(hypothesis), chars(reference), chars(hypothesis)
  return {"word_edits": _edits(rw, hw, False), "ref_words": len(rw.split()),
          "char_edits": _edits(rc, hc, True), "ref_chars": len(rc)}


def error_rates(references: Sequence[str], hypotheses: Sequence[str]) -> dict[str, float]:
  """Corpus WER and CER (records with an empty normalised reference are left out)."""
  tot = {"word_edits": 0, "ref_words": 0, "char_edits": 0, "ref_chars": 0}
  n = 0
  for r, h in zip(references, hypotheses, strict=True):
    if not chars(r):
      continue
    n += 1
    for k, v in text_errors(r, h).items():
      tot[k] += v
  if not n:
    return {"wer": float("nan"), "cer": float("nan"), "num_samples": 0}
  return {"wer": tot["word_edits"] / max(tot["ref_words"], 1),
          "cer": tot["char_edits"] / max(tot["ref_chars"], 1), "num_samples": n}


# ----------------------------------------------------------------------------- timestamps

def _segment_cost(a: str, b: str) -> float:
  ra, rb = chars(a), chars(b)
  if not ra:
    return 0.0 if not rb else 1.0
  return min(1.0, _edits(ra, rb, True) / len(ra))


def match_segments(reference: Sequence[manifest_lib.Segment],
                   hypothesis: Sequence[manifest_lib.Segment]) -> list[tuple[int, int]]:
  """(reference index, hypothesis index) pairs of an order-preserving alignment minimising the
  summed text cost of pairs (CER, at most 1) plus 1 per unmatched segment."""
  n, m = len(reference), len(hypothesis)
  cost = np.zeros((n + 1, m + 1))
  cost[:, 0] = np.arange(n + 1)
  cost[0, :] = np.arange(m + 1)
  for i in range(1, n + 1):
    for j in range(1, m + 1):
      cost[i, j] = min(cost[i - 1, j] + 1, cost[i, j - 1] + 1,
                       cost[i - 1, j - 1] + _segment_cost(reference[i - 1].text,
                                                          hypothesis[j - 1].text))
  pairs, i, j = [], n, m
  while i and j:
    pair = cost[i - 1, j - 1] + _segment_cost(reference[i - 1].text, hypothesis[j - 1].text)
    if np.isclose(cost[i, j], pair):
      pairs.append((i - 1, j - 1))
      i, j = i - 1, j - 1
    elif np.isclose(cost[i, j], cost[i - 1, j] + 1):
      i -= 1
    else:
      j -= 1
  return pairs[::-1]


def boundary_offsets(reference: Sequence[manifest_lib.Segment],
                     hypothesis: Sequence[manifest_lib.Segment]) -> dict[str, float]:
  """Summed |start| and |end| offsets (ms) of matched segments, their count, unmatched count."""
  pairs = match_segments(reference, hypothesis)
  total = sum(abs(reference[i].start - hypothesis[j].start) + abs(reference[i].end -
                                                                   hypothesis[j].end)
              for i, j in pairs) * 1000.0
  return {"offset_ms_sum": total, "boundaries": 2.0 * len(pairs),
          "unmatched": float(len(reference) + len(hypothesis) - 2 * len(pairs))}


def strip_timestamps(text: str) -> str:
  """The words of timestamped text: the segments' texts joined, or the text minus [t] marks."""
  segs = templates.parse_timestamps(text)
  if segs:
    return " ".join(s.text for s in segs)
  return re.sub(r"\[\d+(?:\.\d+)?\]", " ", text)


# ----------------------------------------------------------------------------- multiple choice

_OPTION = re.compile(r"(?<![A-Za-z])([A-H])(?![A-Za-z])")


def choice_letter(text: str) -> str | None:
  """The first standalone capital A-H of an answer ("B", "(B) ...", "answer: B"), else None."""
  m = _OPTION.search(unicodedata.normalize("NFKC", text))
  return m.group(1) if m else None


def qa_correct(reference: str, hypothesis: str) -> bool:
  ref = reference.strip().strip(".()")
  if len(ref) == 1 and "A" <= ref <= "H":
    return choice_letter(hypothesis) == ref
  return normalize_text(reference) == normalize_text(hypothesis)


# ----------------------------------------------------------------------------- scoring

@dataclasses.dataclass
class Record:
  """One manifest record: its prompt row (None when it could not be used), what it is scored
  against, and after decoding its hypothesis and scores."""
  source: str
  id: str
  task: str
  reference: str
  segments: tuple | None = None
  row: dict | None = None
  hypothesis: str | None = None
  scores: dict = dataclasses.field(default_factory=dict)
  error: str | None = None

  def to_json(self) -> dict[str, Any]:
    out = {"id": self.id, "source": self.source, "task": self.task, "reference": self.reference}
    if self.error is not None:
      out["error"] = self.error
    else:
      out["hypothesis"] = self.hypothesis
      out.update(self.scores)
    return out


def score(rec: Record) -> dict[str, float]:
  """The record's own counts (summed over records into the report)."""
  if rec.task in ("asr", "asr_timestamps"):
    ref, hyp = rec.reference, rec.hypothesis
    out: dict[str, float] = {}
    if rec.task == "asr_timestamps":
      hyp_segs = templates.parse_timestamps(hyp)
      out.update(boundary_offsets(rec.segments or templates.parse_timestamps(ref), hyp_segs))
      ref, hyp = strip_timestamps(ref), strip_timestamps(hyp)
    out.update(text_errors(ref, hyp))
    return out
  if rec.task == "qa":
    return {"correct": float(qa_correct(rec.reference, rec.hypothesis))}
  return {}


def summarize(records: Sequence[Record]) -> dict[str, Any]:
  """Per task: samples, wer/cer, aas (+ unmatched segments), accuracy; errors counted."""
  report: dict[str, Any] = {"num_records": len(records),
                            "errors": sum(r.error is not None for r in records), "tasks": {}}
  for task in sorted({r.task for r in records if r.error is None}):
    done = [r for r in records if r.task == task and r.error is None]
    tot: dict[str, float] = {}
    for r in done:
      for k, v in r.scores.items():
        tot[k] = tot.get(k, 0.0) + v
    out: dict[str, Any] = {"samples": len(done)}
    if "ref_words" in tot:
      out["wer"] = tot["word_edits"] / tot["ref_words"] if tot["ref_words"] else float("nan")
      out["cer"] = tot["char_edits"] / tot["ref_chars"] if tot["ref_chars"] else float("nan")
    if "boundaries" in tot:
      out["aas_ms"] = (tot["offset_ms_sum"] / tot["boundaries"] if tot["boundaries"]
                       else float("nan"))
      out["aas_unmatched"] = int(tot["unmatched"])
    if "correct" in tot:
      out["accuracy"] = tot["correct"] / len(done) if done else float("nan")
    report["tasks"][task] = out
  return report


def read_records(loaded, manifest: str, tasks: Sequence[str] | None = None,
                 max_samples: int = 0) -> Iterator[Record]:
  """Records of `manifest` (of `tasks`), each with its prompt row or the error that stops it."""
  data = loaded.config.data
  encoder = pipeline.RecordEncoder(loaded.tokenizer, feature_mode=data.feature_mode,
                                   time_markers=data.time_markers,
                                   max_audio_seconds=data.max_audio_seconds,
                                   prompt_only=True)
  n = 0
  for path in manifest_lib.manifest_paths(manifest):
    source = manifest_lib.ManifestSource(path)
    for i in range(len(source)):
      raw = source[i]
      where = f"{raw.manifest}:{raw.lineno}"
      try:
        sample, waves = encoder.load(raw)
      except data_errors.BadRecordError as e:
        yield Record(where, "", "?", "", error=str(e))
        continue
      if tasks and sample.task not in tasks:
        continue
      if max_samples and n >= max_samples:
        return
      n += 1
      rec = Record(where, sample.id, sample.task, pipeline.reference_text(sample),
                   segments=sample.segments)
      encoded = encoder.encode(sample, waves)
      spec = packing.PackSpec(rows=1, max_tokens=encoded.num_tokens,
                              max_chunks=encoded.num_chunks, feature_mode=data.feature_mode,
                              pad_id=loaded.tokenizer.pad_id)
      packer = packing.BatchPacker(spec)
      packer.try_add(encoded)
      rec.row = packer.build()
      yield rec


def score_manifest(loaded, manifest: str, mesh, *, tasks: Sequence[str] | None = None,
                   max_samples: int = 0, batch_size: int = 8, max_new_tokens: int = 256,
                   progress: bool | None = None) -> tuple[dict[str, Any], list[Record]]:
  """Decodes and scores the records of `manifest` -> (report, records in manifest order).

  `loaded`: a generate.Loaded (model, params, config.data, tokenizer). Every process decodes
  every record (the prompts are replicated), so multi-host runs agree without a gather.
  """
  records: list[Record] = []
  batch: list[Record] = []

  def flush():
    out = decoding.generate(loaded.model, loaded.params,
                            decoding.stack_prompts([r.row for r in batch]),
                            max_new_tokens=max_new_tokens, stop_ids=loaded.stop_ids,
                            pad_id=loaded.tokenizer.pad_id, mesh=mesh, min_rows=batch_size)
    for rec, row in zip(batch, out, strict=True):
      rec.hypothesis = loaded.tokenizer.decode(decoding.strip(row, loaded.stop_ids))
      rec.scores = score(rec)
      rec.row = None
    bar.update(len(batch))
    batch.clear()

  with Progress(max_samples or None, "evaluating", unit=" samples", enabled=progress) as bar:
    for rec in read_records(loaded, manifest, tasks, max_samples):
      records.append(rec)
      if rec.error is not None:
        logging.warning("record %s: %s", rec.source, rec.error)
        continue
      batch.append(rec)
      if len(batch) == batch_size:
        flush()
    if batch:
      flush()
  return summarize(records), records


# ----------------------------------------------------------------------------- token loss

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


# ----------------------------------------------------------------------------- command line

def define_flags() -> None:
  """The command's flags (defined only when it runs, like moss_jax.generate's)."""
  flags.DEFINE_string("checkpoint", None, "training workdir or reference-format dir")
  flags.DEFINE_integer("step", None, "checkpoint step of a training run (default: newest)")
  flags.DEFINE_string("manifest", None, "JSONL manifest(s), comma-separated")
  flags.DEFINE_list("task", [], "score only these tasks (default: all)")
  flags.DEFINE_string("output", None, "report JSON; the hypotheses go to "
                      "<output stem>.hypotheses.jsonl beside it")
  flags.DEFINE_integer("max_samples", 0, "score the first N records (0 = all)")
  flags.DEFINE_integer("batch_size", 8, "records decoded together")
  flags.DEFINE_integer("max_new_tokens", 256, "new tokens per record at most")


def hypotheses_path(report: epath.Path) -> epath.Path:
  stem = report.name[:-5] if report.name.endswith(".json") else report.name
  return report.parent / f"{stem}.hypotheses.jsonl"


def main(argv: Sequence[str]) -> int:
  del argv
  f = flags.FLAGS
  cli.require("checkpoint", "manifest", "output")
  bad_tasks = sorted(set(f.task) - set(batch_lib.TASKS))
  if bad_tasks:
    raise UserError(f"--task: unknown {bad_tasks}; choose from {', '.join(batch_lib.TASKS)}")
  for path in manifest_lib.manifest_paths(f.manifest):
    if not epath.Path(path).is_file():
      raise UserError(f"--manifest: no such file {path}")
  if f.batch_size < 1 or f.max_new_tokens < 1:
    raise UserError("--batch_size and --max_new_tokens must be >= 1")
  diagnostics.setup_compilation_cache("", None)  # the user's cache: a rerun skips compiling
  mesh = generate.make_mesh()
  loaded = generate.load(f.checkpoint, mesh, f.step)
  report, records = score_manifest(loaded, f.manifest, mesh, tasks=f.task or None,
                                   max_samples=f.max_samples, batch_size=f.batch_size,
                                   max_new_tokens=f.max_new_tokens)
  out = epath.Path(f.output)
  out.parent.mkdir(parents=True, exist_ok=True)
  report.update(checkpoint=f.checkpoint, manifest=f.manifest)
  out.write_text(json.dumps(report, indent=2) + "\n")
  hyp = hypotheses_path(out)
  hyp.write_text("".join(json.dumps(r.to_json(), ensure_ascii=False) + "\n" for r in records))
  for r in records:
    if r.error is not None:
      print(f"error: {r.source}: {r.error}", file=sys.stderr, flush=True)
  print(json.dumps(report["tasks"]), flush=True)
  print(f"wrote {out} and {hyp}", flush=True)
  return 1 if report["errors"] else 0


if __name__ == "__main__":
  define_flags()
  cli.run(main)

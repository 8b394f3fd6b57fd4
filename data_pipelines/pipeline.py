"""The Grain input pipeline: manifests -> packed, fixed-shape numpy batches (moss_jax/batch.py).

    lines of each manifest (random access)  --shuffle per epoch, repeat forever (training)
      -> weighted mixture of the manifests  -> this process's slice [process_index::process_count]
      -> decode + template + features (Grain map; in `num_workers` processes when > 0; the
         samples travel as dicts of arrays, so Grain moves them through shared memory)
      -> first-fit packing into batches of batch_size / process_count rows (main process)
      -> thread prefetch of `prefetch` batches -> BatchIterator (strips the skip counts)

Everything up to packing is a pure function of the element index, and packing only depends on
the sample order, so the batch sequence depends on data.seed and the process slice alone; it is
the same for any num_workers (Grain's worker processes read interleaved slices and return them in
order). A bad record never raises: the map step turns it into a `Skipped` marker (logged with
manifest:line and file), the packer counts it, and the counts ride along with the batches, so
`bad_record_counts()` is exact for the batches consumed, with workers and across save/restore.

Iterator state (`get_state()` / `set_state()`, JSON-serialisable) restores exactly the batches an
uninterrupted run would have seen; `BatchIterator` is a `grain.DatasetIterator`, so Grain's Orbax
handler saves it: `ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it))`.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from typing import Any, Sequence

import grain
import numpy as np
from absl import flags
from grain.experimental import ThreadPrefetchIterDataset

from data_pipelines import audio_cache, errors, features
from data_pipelines import manifest as manifest_lib
from data_pipelines import packing
from data_pipelines import templates
from data_pipelines import tokenizers as tokenizers_lib
from data_pipelines.errors import BadRecordError
from moss_jax import batch as batch_lib
from moss_jax import cli

SAMPLE_READAHEAD = 16  # decoded samples buffered per reader (process or worker)
# One warning per skipped record, until a reason has repeated often; then one in a thousand (per
# process: each Grain worker counts its own). The exact counts are in bad_record_counts().
_SKIP_WARNINGS = cli.LimitedWarnings()
STATE_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Skipped:
  """What the map step yields for a bad record: counted by reason downstream, never batched.

  `source` (manifest:line) identifies the record, so the packer can tell when every record of
  the manifests has been rejected and no batch can ever be made.
  """
  reason: str
  message: str
  source: str = ""


def attach_features(encoded: templates.EncodedSample, waveforms: Sequence[np.ndarray],
                    feature_mode: str) -> templates.EncodedSample:
  """Adds the per-chunk model inputs: waveform chunks (on-device mel) or host mel chunks."""
  if feature_mode == "waveform":
    parts = [features.waveform_chunks(w) for w in waveforms]
    empty = (0, batch_lib.WAVEFORM_CHUNK_SAMPLES)
  elif feature_mode == "mel":
    parts = [features.mel_chunks(features.log_mel(w)) for w in waveforms]
    empty = (0, batch_lib.NUM_MEL_BINS, batch_lib.CHUNK_FRAMES)
  else:
    raise ValueError(f"feature_mode must be one of {batch_lib.FEATURE_MODES}, got {feature_mode!r}")
  feats = np.concatenate(parts) if parts else np.zeros(empty, np.float32)
  if feats.shape[0] != encoded.num_chunks:
    raise AssertionError(f"{feats.shape[0]} feature chunks for {encoded.num_chunks} chunk slots "
                         f"({encoded.source})")
  return dataclasses.replace(encoded, features=feats)


class RecordEncoder:
  """Map step: a raw manifest line -> EncodedSample with features, or Skipped (picklable)."""

  def __init__(self, tokenizer: tokenizers_lib.Tokenizer, *, feature_mode: str = "waveform",
               time_markers: bool = True, max_audio_seconds: float = math.inf,
               prompt_only: bool = False, cache_mb: float = 0.0):
    self.tokenizer = tokenizer
    self.feature_mode = feature_mode
    self.time_markers = time_markers
    self.max_audio_seconds = max_audio_seconds
    self.prompt_only = prompt_only
    self.cache = audio_cache.DecodedCache(int(cache_mb * 2**20))

  def load(self, raw: manifest_lib.RawLine):
    """(sample, waveforms); raises BadRecordError. Served from `cache` when data.audio_cache_mb
    gives it room (the waveforms are read-only then)."""

    def parse_and_decode():
      sample = manifest_lib.parse_line(raw.data, raw.manifest, raw.lineno)
      return sample, manifest_lib.load_audios(sample, self.max_audio_seconds)

    return self.cache.get_or_load((raw.manifest, raw.lineno, raw.data), parse_and_decode)

  def encode(self, sample: manifest_lib.Sample, waves) -> templates.EncodedSample:
    fn = templates.encode_prompt if self.prompt_only else templates.encode_sample
    encoded = fn(sample, waves, self.tokenizer, time_markers=self.time_markers)
    return attach_features(encoded, waves, self.feature_mode)

  def __call__(self, raw: manifest_lib.RawLine) -> dict[str, Any] | Skipped:
    """A dict of the EncodedSample's fields (a pytree: Grain moves its arrays between processes
    through shared memory instead of the pipe), or Skipped."""
    try:
      sample, waves = self.load(raw)
    except BadRecordError as e:
      where = f"{raw.manifest}:{raw.lineno}"
      _SKIP_WARNINGS.warn(e.reason, "skipping record %s: %s", e.record or where, e)
      return Skipped(e.reason, str(e), where)
    encoded = self.encode(sample, waves)
    return {f.name: getattr(encoded, f.name) for f in dataclasses.fields(encoded)}


# ----------------------------------------------------------------------------- packing stage


def _count(counts: dict[str, int], reason: str) -> None:
  counts[reason] = counts.get(reason, 0) + 1


class PackedBatchIterDataset(grain.IterDataset):
  """Packs a stream of EncodedSample | Skipped into batch dicts; yields (batch, counts).

  `counts` is the cumulative skip count per reason up to the batch. At the end of a finite stream
  a final (None, counts) carries the counts of trailing bad records.

  `num_records` (the records an endless stream cycles through) turns a stream that can never
  yield a batch into an error: once every one of them has been rejected in a row, or the
  rejections in a row pass `NO_PROGRESS_FACTOR` times that many, iteration raises NoUsableRecords
  instead of reading the same bad records forever.
  """

  def __init__(self, parent: grain.IterDataset, spec: packing.PackSpec,
               num_records: int | None = None):
    super().__init__(parent)
    self._spec = spec
    self._num_records = num_records

  def __iter__(self) -> "_PackedBatchIterator":
    return _PackedBatchIterator(self._parent.__iter__(), self._spec, self._num_records)

  def __str__(self) -> str:
    return f"PackedBatchIterDataset({self._spec})"


# A stream whose records are not all bad yields a usable one long before this many rejections in a
# row: with a single usable record among N shuffled per epoch, the odds of 10 N misses are e^-10.
NO_PROGRESS_FACTOR = 10


class _PackedBatchIterator(grain.DatasetIterator):
  """State = the parent's state before the first sample not yet in an emitted batch + counts."""

  def __init__(self, parent: grain.DatasetIterator, spec: packing.PackSpec,
               num_records: int | None = None):
    super().__init__(parent)
    self._spec = spec
    self._num_records = num_records
    self._counts: dict[str, int] = {}
    self._carry = None  # a sample read but not placed (the batch was full)
    self._carry_state = None
    self._reported = {}  # counts already sent downstream
    self._done = False
    self._reset_streak()

  def _reset_streak(self) -> None:
    """Rejections since the last usable record: count, distinct records, per reason, an example."""
    self._streak = 0
    self._streak_sources: set[str] = set()
    self._streak_reasons: dict[str, int] = {}
    self._streak_example = ""

  def _rejected(self, reason: str, source: str, message: str) -> None:
    _count(self._counts, reason)
    if self._num_records is None:
      return
    self._streak += 1
    self._streak_sources.add(source)
    _count(self._streak_reasons, reason)
    self._streak_example = self._streak_example or f"{source}: {message}"
    if (len(self._streak_sources) >= self._num_records or
        self._streak >= NO_PROGRESS_FACTOR * self._num_records + 1000):
      raise errors.NoUsableRecords(self._streak, len(self._streak_sources), self._num_records,
                                   self._streak_reasons, self._streak_example)

  def _read(self):
    """(item, parent state before it)."""
    state = copy.deepcopy(self._parent.get_state())
    return next(self._parent), state

  def __next__(self):
    if self._done:
      raise StopIteration
    packer = packing.BatchPacker(self._spec)
    if self._carry is not None:
      packer.try_add(self._carry)
      self._carry = self._carry_state = None
    while True:
      try:
        item, state = self._read()
      except StopIteration:
        self._done = True
        if packer.empty and self._counts == self._reported:
          raise
        break
      if isinstance(item, Skipped):
        self._rejected(item.reason, item.source, item.message)
        continue
      if isinstance(item, dict):
        item = templates.EncodedSample(**item)
      if not packing.fits_empty_row(item, self._spec):
        detail = packing.does_not_fit_detail(item, self._spec)
        _SKIP_WARNINGS.warn(errors.DOES_NOT_FIT, "skipping record %s: %s: %s", item.source,
                            errors.DOES_NOT_FIT, detail)
        self._rejected(errors.DOES_NOT_FIT, item.source, f"{errors.DOES_NOT_FIT}: {detail}")
        continue
      self._reset_streak()
      if not packer.try_add(item):
        self._carry, self._carry_state = item, state
        break
    self._reported = dict(self._counts)
    return (None if packer.empty else packer.build()), dict(self._counts)

  def get_state(self) -> dict[str, Any]:
    parent = self._carry_state if self._carry is not None else self._parent.get_state()
    return {"parent": copy.deepcopy(parent), "counts": dict(self._counts)}

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._counts = dict(state["counts"])
    self._reported = dict(self._counts)
    self._carry = self._carry_state = None
    self._done = False

  def close(self) -> None:
    self._carry = None  # may hold shared-memory arrays from a worker
    super().close()

  def __str__(self) -> str:
    return f"_PackedBatchIterator({self._spec})"


class BatchIterator(grain.DatasetIterator):
  """The loader: yields batch dicts; `bad_record_counts()`; checkpointable state.

  `get_state()` returns a JSON-serialisable dict; `set_state` also takes its JSON text (str or
  bytes). Grain's Orbax CheckpointHandler stores it per process.
  """

  def __init__(self, parent: grain.DatasetIterator, spec: packing.PackSpec):
    super().__init__(parent)
    self.spec = spec
    self._counts: dict[str, int] = {}

  def __next__(self) -> dict[str, np.ndarray]:
    while True:
      batch, counts = next(self._parent)
      self._counts = counts
      if batch is not None:
        return batch

  def bad_record_counts(self) -> dict[str, int]:
    """Records skipped so far (in the batches consumed), per reason."""
    return dict(sorted(self._counts.items()))

  def get_state(self) -> dict[str, Any]:
    return {"version": STATE_VERSION, "pipeline": self._parent.get_state(),
            "bad_record_counts": dict(self._counts)}

  def set_state(self, state: dict[str, Any] | str | bytes) -> None:
    if isinstance(state, (bytes, bytearray)):
      state = state.decode()
    if isinstance(state, str):
      state = json.loads(state)
    if state.get("version") != STATE_VERSION:
      raise ValueError(f"unknown data iterator state version {state.get('version')}")
    self._parent.set_state(state["pipeline"])
    self._counts = dict(state["bad_record_counts"])

  def __str__(self) -> str:
    return f"BatchIterator({self.spec})"


# ----------------------------------------------------------------------------- building


def _ensure_absl_flags() -> None:
  # Grain's worker processes read an absl flag; outside an absl app (tests, notebooks) mark the
  # flags parsed so that read does not raise.
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def _process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    # Imported here: Grain's worker processes import this module and must not start JAX.
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return process_index, process_count


def _seed(base: int, salt: int) -> int:
  return int(np.random.SeedSequence([base, salt]).generate_state(1)[0])


def _weights(spec: str | Sequence[float] | None, sources: Sequence[manifest_lib.ManifestSource]):
  if isinstance(spec, str):
    spec = [float(w) for w in spec.split(",") if w.strip()]
  if not spec:
    return [float(len(s)) for s in sources]  # proportional to size = one shuffled union
  if len(spec) != len(sources) or any(w < 0 for w in spec) or not sum(spec):
    raise ValueError(f"train_weights {spec} do not match {len(sources)} manifests")
  return list(spec)


def record_dataset(paths: Sequence[str], *, seed: int, shuffle: bool, repeat: bool,
                   weights: str | Sequence[float] | None = None) -> grain.MapDataset:
  """Raw lines of the manifests: shuffled per epoch, repeated, mixed by weight when training."""
  return _record_dataset(_sources(paths), seed=seed, shuffle=shuffle, repeat=repeat,
                         weights=weights)[0]


def _sources(paths: Sequence[str]) -> list[manifest_lib.ManifestSource]:
  sources = [manifest_lib.ManifestSource(p) for p in paths]
  empty = [s.path for s in sources if not len(s)]
  if empty:
    raise errors.ManifestError(f"manifest(s) with no records: {', '.join(empty)}")
  return sources


def _record_dataset(sources: Sequence[manifest_lib.ManifestSource], *, seed: int, shuffle: bool,
                    repeat: bool, weights: str | Sequence[float] | None = None
                    ) -> tuple[grain.MapDataset, int]:
  """(dataset, number of distinct records it draws from)."""
  datasets = []
  for i, src in enumerate(sources):
    ds = grain.MapDataset.source(src)
    if shuffle:
      ds = ds.shuffle(seed=_seed(seed, i))
    datasets.append(ds.repeat() if repeat else ds)
  total = sum(len(s) for s in sources)
  if len(datasets) == 1:
    return datasets[0], total
  if not repeat:
    return grain.MapDataset.concatenate(datasets), total
  w = _weights(weights, sources)
  return (grain.MapDataset.mix(datasets, w),
          sum(len(s) for s, wi in zip(sources, w) if wi > 0))


def build_loader(paths: Sequence[str], encoder: RecordEncoder, spec: packing.PackSpec, *,
                 seed: int = 0, shuffle: bool = True, repeat: bool = True,
                 weights: str | Sequence[float] | None = None, process_index: int = 0,
                 process_count: int = 1, num_workers: int = 0,
                 prefetch: int = 2) -> BatchIterator:
  """The whole pipeline for one process (see the module docstring)."""
  ds, num_records = _record_dataset(_sources(paths), seed=seed, shuffle=shuffle, repeat=repeat,
                                    weights=weights)
  if process_count > 1:
    ds = ds[process_index::process_count]
  ds = ds.map(encoder)
  it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=0 if num_workers else 2,
                                               prefetch_buffer_size=SAMPLE_READAHEAD))
  if num_workers > 0:
    _ensure_absl_flags()
    it_ds = it_ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=SAMPLE_READAHEAD))
  # Only an endless stream can spin; a finite one just ends.
  it_ds = PackedBatchIterDataset(it_ds, spec, num_records if repeat else None)
  it_ds = ThreadPrefetchIterDataset(it_ds, prefetch_buffer_size=max(0, int(prefetch)))
  return BatchIterator(iter(it_ds), spec)


def pack_spec(config, rows: int, tokenizer: tokenizers_lib.Tokenizer) -> packing.PackSpec:
  data = config.data
  return packing.PackSpec(rows=rows, max_tokens=data.max_tokens, max_chunks=data.max_audio_chunks,
                          feature_mode=data.feature_mode, pad_id=tokenizer.pad_id)


def _encoder(config, tokenizer, prompt_only: bool = False) -> RecordEncoder:
  data = config.data
  # A clip longer than a row's audio chunks hold can never fit: reject it from its header (a
  # header read) rather than after decoding it and computing its features (an hour-long file).
  capacity = data.max_audio_chunks * batch_lib.CHUNK_SAMPLES / batch_lib.SAMPLE_RATE
  return RecordEncoder(tokenizer, feature_mode=data.feature_mode, time_markers=data.time_markers,
                       max_audio_seconds=min(data.max_audio_seconds, capacity),
                       prompt_only=prompt_only, cache_mb=data.get("audio_cache_mb", 0.0))


def rows_per_process(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(f"data.batch_size={batch_size} is not divisible by {process_count} processes")
  return batch_size // process_count


def make_train_loader(config, process_index: int | None = None,
                      process_count: int | None = None) -> BatchIterator:
  """Endless training batches for this process (batch_size / process_count rows each)."""
  data = config.data
  process_index, process_count = _process(process_index, process_count)
  tokenizer = tokenizers_lib.load_tokenizer(data.tokenizer)
  paths = manifest_lib.manifest_paths(data.train_manifests)
  if not paths:
    raise errors.ManifestError("config.data.train_manifests is empty: name the training "
                               "manifest(s), e.g. --config.data.train_manifests=train.jsonl")
  spec = pack_spec(config, rows_per_process(data.batch_size, process_count), tokenizer)
  return build_loader(paths, _encoder(config, tokenizer), spec, seed=data.seed,
                      shuffle=data.shuffle, repeat=True, weights=data.train_weights,
                      process_index=process_index, process_count=process_count,
                      num_workers=data.num_workers, prefetch=data.prefetch)


def make_eval_batches(config, manifest: str | None = None, *, batch_size: int | None = None,
                      process_index: int | None = None,
                      process_count: int | None = None) -> BatchIterator:
  """One pass over an eval manifest (no shuffle), packed like training; the last batch is padded.

  Processes may get different numbers of batches; a multi-host caller pads with empty batches.
  """
  data = config.data
  process_index, process_count = _process(process_index, process_count)
  tokenizer = tokenizers_lib.load_tokenizer(data.tokenizer)
  paths = manifest_lib.manifest_paths(manifest or data.eval_manifest)
  if not paths:
    raise errors.ManifestError("no eval manifest: set config.data.eval_manifest")
  spec = pack_spec(config, rows_per_process(batch_size or data.batch_size, process_count),
                   tokenizer)
  return build_loader(paths, _encoder(config, tokenizer), spec, shuffle=False, repeat=False,
                      process_index=process_index, process_count=process_count,
                      num_workers=0, prefetch=data.prefetch)


def reference_text(sample: manifest_lib.Sample) -> str:
  """The answer a generation for this sample is scored against."""
  return templates.answer_for(sample) if sample.messages is None else sample.text


def make_generation_inputs(config, manifest: str | None = None, num_samples: int = 8):
  """[(one-row prompt batch, reference text, task)] for the first `num_samples` usable records.

  The prompt ends with the assistant header; labels are all -100. Bad or oversized records are
  skipped (logged) like in training.
  """
  data = config.data
  tokenizer = tokenizers_lib.load_tokenizer(data.tokenizer)
  encoder = _encoder(config, tokenizer, prompt_only=True)
  spec = pack_spec(config, 1, tokenizer)
  out = []
  for path in manifest_lib.manifest_paths(manifest or data.eval_manifest):
    source = manifest_lib.ManifestSource(path)
    for i in range(len(source)):
      if len(out) >= num_samples:
        return out
      try:
        sample, waves = encoder.load(source[i])
      except BadRecordError as e:
        _SKIP_WARNINGS.warn(e.reason, "skipping record %s: %s", e.record, e)
        continue
      encoded = encoder.encode(sample, waves)
      if not packing.fits_empty_row(encoded, spec):
        _SKIP_WARNINGS.warn(errors.DOES_NOT_FIT, "skipping record %s: %s: %s", sample.source,
                            errors.DOES_NOT_FIT, packing.does_not_fit_detail(encoded, spec))
        continue
      packer = packing.BatchPacker(spec)
      packer.try_add(encoded)
      out.append((packer.build(), reference_text(sample), sample.task))
  return out

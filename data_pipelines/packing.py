"""Packing encoded samples into fixed-shape batches (moss_jax/batch.py schema).

Several samples share a row of `max_tokens` tokens and `max_audio_chunks` chunk slots. Each gets
its own segment id (1..n; 0 is padding) and positions restarting at 0, so the model's
segment-masked attention keeps samples apart. A sample's chunks take consecutive slots, and its
audio tokens' sample-local indices are shifted by `slot_offset * 50` into the row's flat encoder
output. Audio ids are renumbered per row (1-based) so the per-audio mel clamp sees each audio's
chunks together. A sample is placed whole or not at all: nothing is truncated.

`BatchPacker` fills the rows of one batch first-fit, in arrival order, so the result is a pure
function of the sample sequence (deterministic resumption needs nothing else).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from data_pipelines.templates import EncodedSample
from moss_jax import batch as batch_lib


@dataclasses.dataclass(frozen=True)
class PackSpec:
  """Static sizes of a batch: rows (per process), tokens per row, chunk slots per row."""
  rows: int
  max_tokens: int
  max_chunks: int
  feature_mode: str = "waveform"
  pad_id: int = 0

  def shapes(self) -> dict:
    return batch_lib.batch_shapes(self.rows, self.max_tokens, self.max_chunks, self.feature_mode)


def fits_empty_row(sample: EncodedSample, spec: PackSpec) -> bool:
  """Whether the sample fits a row at all (else it is skipped as does_not_fit)."""
  return sample.num_tokens <= spec.max_tokens and sample.num_chunks <= spec.max_chunks


def does_not_fit_detail(sample: EncodedSample, spec: PackSpec) -> str:
  return (f"{sample.num_tokens} tokens and {sample.num_chunks} audio chunks exceed a row of "
          f"max_tokens={spec.max_tokens}, max_audio_chunks={spec.max_chunks}")


@dataclasses.dataclass
class _Row:
  tokens: int = 0
  chunks: int = 0
  segments: int = 0
  audios: int = 0


class BatchPacker:
  """Collects samples into the rows of one batch (first fit), then builds the arrays."""

  def __init__(self, spec: PackSpec):
    self.spec = spec
    self._rows = [_Row() for _ in range(spec.rows)]
    self._placed: list[tuple[int, _Row, EncodedSample]] = []  # (row, offsets before, sample)

  @property
  def empty(self) -> bool:
    return not self._placed

  def try_add(self, sample: EncodedSample) -> bool:
    """Places the sample in the first row with room; False if no row has room."""
    for r, row in enumerate(self._rows):
      if (row.tokens + sample.num_tokens <= self.spec.max_tokens and
          row.chunks + sample.num_chunks <= self.spec.max_chunks):
        self._placed.append((r, dataclasses.replace(row), sample))
        row.tokens += sample.num_tokens
        row.chunks += sample.num_chunks
        row.segments += 1
        row.audios += int(sample.chunk_audio.max()) + 1 if sample.num_chunks else 0
        return True
    return False

  def build(self) -> dict[str, np.ndarray]:
    """The batch dict (exactly `spec.shapes()`); padding rows/positions are inert."""
    spec = self.spec
    out = batch_lib.empty_batch(spec.shapes(), spec.pad_id)
    feature_key = "audio_waveform" if spec.feature_mode == "waveform" else "audio_mel"
    for r, before, s in self._placed:
      t0, t1 = before.tokens, before.tokens + s.num_tokens
      c0, c1 = before.chunks, before.chunks + s.num_chunks
      out["input_ids"][r, t0:t1] = s.tokens
      out["labels"][r, t0:t1] = s.labels
      out["segment_ids"][r, t0:t1] = before.segments + 1
      out["positions"][r, t0:t1] = np.arange(s.num_tokens, dtype=np.int32)
      out["task_ids"][r, t0:t1] = s.task_id
      shift = c0 * batch_lib.TOKENS_PER_CHUNK
      out["audio_token_index"][r, t0:t1] = np.where(s.audio_index >= 0, s.audio_index + shift, -1)
      if s.num_chunks:
        out["audio_chunk_frames"][r, c0:c1] = s.chunk_frames
        out["audio_chunk_audio_id"][r, c0:c1] = s.chunk_audio + before.audios + 1
        if s.features is None:
          raise ValueError(f"sample {s.source} has no features attached")
        out[feature_key][r, c0:c1] = s.features
    return out


def pack_batches(samples, spec: PackSpec, *, drop_remainder: bool = False):
  """Packs an iterable of EncodedSamples into batch dicts (samples too big for a row are skipped;
  see pipeline.py for counting them). A convenience for eval and tests."""
  packer = BatchPacker(spec)
  for s in samples:
    if not fits_empty_row(s, spec):
      continue
    if not packer.try_add(s):
      yield packer.build()
      packer = BatchPacker(spec)
      packer.try_add(s)
  if not packer.empty and not drop_remainder:
    yield packer.build()

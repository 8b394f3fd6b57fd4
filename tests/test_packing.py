"""Packing: segments never mix, positions restart, audio indices point at the right chunk slots,
samples are never cut, and samples too big for a row are counted as does_not_fit."""

import dataclasses
import json

import grain
import numpy as np
import pytest

from data_pipelines import errors, packing, pipeline
from data_pipelines.templates import EncodedSample
from moss_jax import batch as batch_lib

SPEC = packing.PackSpec(rows=2, max_tokens=20, max_chunks=3, feature_mode="waveform", pad_id=7)


def sample(sid: int, n_tokens: int, audios=(), task_id: int = 0) -> EncodedSample:
  """Tokens sid*1000+i; each audio (list of chunk frame counts) gets its placeholders up front.

  Feature chunk c of the sample is filled with sid*100 + c, so a gather can be traced back.
  """
  tokens = sid * 1000 + np.arange(n_tokens, dtype=np.int32)
  audio_index = np.full(n_tokens, -1, np.int32)
  frames, owner, pos, first = [], [], 1, 0
  for a, chunk_frames in enumerate(audios):
    n_audio = batch_lib.num_audio_tokens(sum(chunk_frames))
    audio_index[pos:pos + n_audio] = first * 50 + np.arange(n_audio)
    pos += n_audio
    frames += chunk_frames
    owner += [a] * len(chunk_frames)
    first += len(chunk_frames)
  assert pos <= n_tokens
  feats = np.zeros((len(frames), batch_lib.WAVEFORM_CHUNK_SAMPLES), np.float32)
  feats += (sid * 100 + np.arange(len(frames), dtype=np.float32))[:, None]
  labels = np.where(np.arange(n_tokens) >= n_tokens - 2, tokens, -100).astype(np.int32)
  return EncodedSample(tokens=tokens, labels=labels, audio_index=audio_index, task_id=task_id,
                       chunk_frames=np.asarray(frames, np.int32),
                       chunk_audio=np.asarray(owner, np.int32), features=feats,
                       source=f"s{sid}")


def test_first_fit_layout():
  packer = packing.BatchPacker(SPEC)
  s1 = sample(1, 12, [[80]], task_id=1)
  s2 = sample(2, 10, [[8], [16]], task_id=2)
  s3 = sample(3, 8, [[40]], task_id=3)
  s4 = sample(4, 4, [[8]])
  s5 = sample(5, 1)
  for s in (s1, s2, s3, s4, s5):
    assert packer.try_add(s)
  assert not packer.try_add(sample(6, 2, [[8]]))  # row 0 has no tokens left, row 1 no slots
  b = packer.build()
  batch_lib.check_batch(b, SPEC.shapes())
  # Row 0: s1 then s3 (first fit); row 1: s2, s4, s5, then padding.
  np.testing.assert_array_equal(b["input_ids"][0], np.concatenate([s1.tokens, s3.tokens]))
  np.testing.assert_array_equal(b["input_ids"][1, :15], np.concatenate([s2.tokens, s4.tokens,
                                                                        s5.tokens]))
  assert (b["input_ids"][1, 15:] == 7).all() and (b["labels"][1, 15:] == -100).all()
  assert b["segment_ids"][0].tolist() == [1] * 12 + [2] * 8
  assert b["segment_ids"][1].tolist() == [1] * 10 + [2] * 4 + [3] + [0] * 5
  assert b["positions"][0].tolist() == list(range(12)) + list(range(8))
  assert b["positions"][1].tolist() == list(range(10)) + list(range(4)) + [0] + [0] * 5
  assert b["task_ids"][0].tolist() == [1] * 12 + [3] * 8
  np.testing.assert_array_equal(b["labels"][0], np.concatenate([s1.labels, s3.labels]))
  # Chunk slots: row 0 = s1's chunk, s3's chunk; row 1 = s2's two audios, s4's audio.
  assert b["audio_chunk_frames"].tolist() == [[80, 40, 0], [8, 16, 8]]
  assert b["audio_chunk_audio_id"].tolist() == [[1, 2, 0], [1, 2, 3]]
  assert b["audio_waveform"][:, :, 0].tolist() == [[100, 300, 0], [200, 201, 400]]
  # Indices are shifted by the slot offset: s3's tokens read slot 1, s4's read slot 2.
  idx = b["audio_token_index"]
  assert idx[0, 1:11].tolist() == list(range(10)) and (idx[0, 11:13] == -1).all()
  assert idx[0, 13:18].tolist() == list(range(50, 55))
  assert idx[1, 11:12].tolist() == [100] and idx[1, 1:3].tolist() == [0, 50]
  assert (idx[1, 15:] == -1).all()


def test_gather_reaches_each_samples_own_audio():
  """Emulate the model: encoder output of slot c token t = (feature tag of slot c, t)."""
  samples = [sample(1, 70, [[400, 120]]), sample(2, 12, [[64]]), sample(3, 6, [[8], [8]]),
             sample(4, 30, [[200]])]
  spec = packing.PackSpec(rows=2, max_tokens=80, max_chunks=4)
  batches = list(packing.pack_batches(samples, spec))
  assert len(batches) == 1
  b = batches[0]
  tag = b["audio_waveform"][:, :, 0]  # [B, C]
  for r in range(spec.rows):
    for pos in np.nonzero(b["audio_token_index"][r] >= 0)[0]:
      flat = b["audio_token_index"][r, pos]
      slot, t = divmod(int(flat), 50)
      assert b["audio_chunk_frames"][r, slot] > 0 and t < -(-b["audio_chunk_frames"][r, slot] // 8)
      sid = int(b["input_ids"][r, pos]) // 1000
      src = samples[sid - 1]
      local = int(src.audio_index[b["positions"][r, pos]])
      assert tag[r, slot] == sid * 100 + local // 50 and t == local % 50
  # Row audio ids: one per (sample, audio), shared by that audio's chunks.
  assert b["audio_chunk_audio_id"].tolist() == [[1, 1, 2, 3], [1, 2, 0, 0]]
  assert tag.tolist() == [[100, 101, 300, 301], [200, 400, 0, 0]]


def test_segments_never_attend_to_each_other():
  samples = [sample(i, n) for i, n in enumerate([7, 5, 6, 9, 3, 8], start=1)]
  spec = packing.PackSpec(rows=2, max_tokens=20, max_chunks=2)
  for b in packing.pack_batches(samples, spec):
    for r in range(spec.rows):
      seg = b["segment_ids"][r]
      owner = b["input_ids"][r] // 1000
      mask = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0) & np.tri(len(seg), dtype=bool)
      cross = owner[:, None] != owner[None, :]
      assert not (mask & cross).any()
      for s in np.unique(seg[seg > 0]):  # whole samples, contiguous, positions from 0
        where = np.nonzero(seg == s)[0]
        assert (np.diff(where) == 1).all()
        assert b["positions"][r, where].tolist() == list(range(len(where)))
        assert len(where) == samples[owner[where[0]] - 1].num_tokens


def _packed(items, spec):
  ds = pipeline.PackedBatchIterDataset(grain.MapDataset.source(items).to_iter_dataset(), spec)
  return iter(ds)


def test_does_not_fit_is_counted_and_nothing_is_cut():
  spec = packing.PackSpec(rows=1, max_tokens=20, max_chunks=2)
  too_long = sample(2, 21)
  too_many_chunks = sample(3, 10, [[8], [8], [8]])
  items = [sample(1, 10), too_long, pipeline.Skipped(errors.CORRUPT_AUDIO, "x"), too_many_chunks,
           sample(4, 10, [[40]]), sample(5, 15), pipeline.Skipped(errors.TOO_SHORT, "y")]
  assert not packing.fits_empty_row(too_long, spec)
  assert not packing.fits_empty_row(too_many_chunks, spec)
  out = list(_packed(items, spec))
  batches = [b for b, _ in out if b is not None]
  ids = sorted(set((b["input_ids"][b["segment_ids"] > 0] // 1000).tolist()) for b in batches)
  assert [sorted(x) for x in ids] == [[1, 4], [5]]
  assert len(out) == 2
  assert out[0][1] == {errors.DOES_NOT_FIT: 2, errors.CORRUPT_AUDIO: 1}
  assert out[1][1] == {errors.DOES_NOT_FIT: 2, errors.CORRUPT_AUDIO: 1, errors.TOO_SHORT: 1}
  # Only bad records: no batch, but the counts still come out.
  assert list(_packed([pipeline.Skipped(errors.EMPTY_FILE, "z"), too_long], spec)) == [
      (None, {errors.EMPTY_FILE: 1, errors.DOES_NOT_FIT: 1})]


def test_packer_state_restores_the_carried_sample():
  spec = packing.PackSpec(rows=1, max_tokens=20, max_chunks=2)
  items = [sample(i, n) for i, n in enumerate([8, 9, 7, 12, 4, 15, 6, 6, 10], start=1)]
  it = _packed(items, spec)
  first = next(it)
  state = json.loads(json.dumps(it.get_state()))
  rest = [b for b, _ in it]
  again = _packed(items, spec)
  again.set_state(state)
  rest2 = [b for b, _ in again]
  assert len(rest) == len(rest2) >= 3
  for x, y in zip(rest, rest2):
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])
  seen = [first[0]] + rest
  ids = np.concatenate([b["input_ids"][b["segment_ids"] > 0] // 1000 for b in seen])
  assert sorted(set(ids.tolist())) == list(range(1, 10))


def _endless(items, num_records, spec):
  ds = grain.MapDataset.source(items).shuffle(seed=1).repeat().to_iter_dataset()
  return iter(pipeline.PackedBatchIterDataset(ds, spec, num_records=num_records))


def test_an_endless_stream_of_rejected_records_raises_instead_of_spinning():
  spec = packing.PackSpec(rows=1, max_tokens=20, max_chunks=2)
  bad = [pipeline.Skipped(errors.MISSING_FILE, "gone", f"m.jsonl:{i}") for i in range(1, 40)]
  too_long = dataclasses.replace(sample(1, 21), source="m.jsonl:40")
  with pytest.raises(errors.NoUsableRecords) as e:
    next(_endless(bad + [too_long], 40, spec))
  assert "missing_file 39" in str(e.value) and "does_not_fit 1" in str(e.value)
  assert "data.max_tokens" in str(e.value) and "m.jsonl:" in str(e.value)
  # One usable record among them is enough to keep going, batch after batch.
  good = dataclasses.replace(sample(2, 10), source="m.jsonl:41")
  it = _endless(bad + [too_long, good], 41, spec)
  for _ in range(20):
    batch, _ = next(it)
    assert batch is not None

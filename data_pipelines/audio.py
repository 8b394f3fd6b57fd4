"""Decode audio files to the model's input: float32 mono 16 kHz, with clear errors for bad files.

Why this module exists instead of `torchaudio.load`: training reads millions of short slices of long
recordings, so we seek to the slice instead of decoding the whole file, and every failure becomes a
`BadRecordError` with a countable reason instead of a crash deep inside a worker.

Pipeline (the reference's `audio_io.py` order): decode -> average channels -> resample to 16 kHz.
  * wav/flac/ogg/mp3/aiff go through soundfile (libsndfile, sample-accurate seeking);
    m4a/aac/mp4 and anything else through PyAV (FFmpeg), seeking where the container allows.
  * Resampling uses soxr 'VHQ'. A slice is decoded with ~64 ms of context on both sides, aligned to
    the resampler's period, so `load_audio(p, offset, duration)` equals the same samples of
    `load_audio(p)` (to float rounding) instead of carrying resampler edge effects.
  * The returned slice is output samples [round(16000 offset), round(16000 offset) +
    round(16000 duration)) of the full 16 kHz decode, cut short at the end of the audio.

Reasons raised (data_pipelines.errors):
  missing_file        the path does not exist or is not a file
  empty_file          0 bytes, or the decoder yields 0 samples for the whole file
  corrupt_audio       no decoder can open a file with an audio extension, decoding fails, or it
                      stops well short of the length the header declares (truncated file)
  unsupported_format  no installed decoder reads it (unknown extension, no audio stream, PyAV
                      missing)
  non_finite_audio    NaN or inf samples in the decoded range
  bad_field           the requested span is invalid: negative/non-finite offset, duration <= 0,
                      or an offset at/after the end of the audio (the file is fine; the record's
                      offset is wrong, so it is the record's field that is bad)
"""

from __future__ import annotations

import math
import os
import re
import stat
from typing import Iterator

import av
import numpy as np
import soundfile
import soxr

from data_pipelines import errors

SAMPLE_RATE = 16000
RESAMPLE_QUALITY = "VHQ"
# Output samples of decoded context kept on each side of a slice: soxr VHQ's edge effects reach
# ~230 output samples (8 kHz input) to ~110 (44.1/48 kHz), so 1024 leaves a wide safety margin.
_RESAMPLE_MARGIN = 1024
# A decode that stops short of the declared length by more than this is a truncated file. The
# slack absorbs header estimates (mp3 without a Xing header, AAC priming, container rounding).
_TRUNCATION_SLACK_SECONDS = 0.5
_TRUNCATION_SLACK_FRACTION = 0.05
# PyAV: start decoding this long before a seek target and drop the first frames, which the
# decoder produces without the previous frame's overlap / bit reservoir.
_AV_SEEK_WARMUP_SECONDS = 0.25
_AV_WARMUP_FRAMES = 2

SOUNDFILE_EXTENSIONS = frozenset({
    ".wav", ".wave", ".flac", ".ogg", ".oga", ".opus", ".mp3", ".aif", ".aiff", ".aifc", ".au",
    ".snd", ".w64", ".caf"})
PYAV_EXTENSIONS = frozenset({
    ".m4a", ".m4b", ".aac", ".mp4", ".mov", ".3gp", ".webm", ".mka", ".mkv", ".wma", ".amr",
    ".ac3", ".opus", ".mp2"})
AUDIO_EXTENSIONS = SOUNDFILE_EXTENSIONS | PYAV_EXTENSIONS


def load_audio(path: str | os.PathLike, offset: float = 0.0, duration: float | None = None, *,
               record: str | None = None) -> np.ndarray:
  """Returns float32 [N] mono 16 kHz samples of `path` from `offset` s for `duration` s (None = to the end).

  A span reaching past the end of the audio is cut short; an offset at or after the end raises
  bad_field. `record` (e.g. "manifest.jsonl:12") is named in every error.
  """
  path = _check_file(path, record)
  out_start, out_stop = _output_span(offset, duration, path, record)
  with _open_decoder(path, record) as decoder:
    sr = decoder.sample_rate
    in_start, in_stop, lead = _input_span(sr, out_start, out_stop)
    samples = decoder.read(in_start, in_stop)
    _check_truncation(decoder, in_start, in_stop, len(samples), path, record)
  if not np.isfinite(samples).all():
    bad = int(np.argwhere(~np.isfinite(samples))[0, 0]) + in_start
    raise errors.BadRecordError(
        errors.NON_FINITE_AUDIO, f"NaN/inf sample at {bad / sr:.3f} s", record=record, path=path)
  mono = samples.mean(axis=1, dtype=np.float32) if samples.shape[1] > 1 else samples[:, 0]
  if sr != SAMPLE_RATE and len(mono):
    mono = soxr.resample(mono, sr, SAMPLE_RATE, quality=RESAMPLE_QUALITY)
  stop = None if out_stop is None else out_stop - out_start + lead
  out = np.ascontiguousarray(mono[lead:stop], dtype=np.float32)
  if not len(out):
    if out_start > 0:
      raise errors.BadRecordError(
          errors.BAD_FIELD, f"offset {offset:.3f} s is at or past the end of the audio",
          record=record, path=path)
    raise errors.BadRecordError(errors.EMPTY_FILE, "the file decodes to 0 samples",
                                record=record, path=path)
  return out


def audio_duration(path: str | os.PathLike, *, record: str | None = None) -> float:
  """Duration in seconds from the header (soundfile) or the packet index (PyAV), without decoding.

  Within a few ms of len(load_audio(path)) / 16000 (container rounding, mp3 frame padding); use the
  decoded length when the exact frame count matters.
  """
  path = _check_file(path, record)
  with _open_decoder(path, record) as decoder:
    return decoder.duration_seconds()


# --------------------------------------------------------------------------- argument checks


def _check_file(path: str | os.PathLike, record: str | None) -> str:
  path = os.fspath(path)
  try:
    mode = os.stat(path).st_mode
  except FileNotFoundError:
    raise errors.BadRecordError(errors.MISSING_FILE, "no such audio file", record=record,
                                path=path) from None
  except OSError as e:
    raise errors.BadRecordError(errors.MISSING_FILE, f"cannot read the file: {e.strerror}",
                                record=record, path=path) from None
  if not stat.S_ISREG(mode):
    # Opening a FIFO would block forever and a device could stream without end.
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else
            "a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "a socket"
            if stat.S_ISSOCK(mode) else "not a regular file")
    raise errors.BadRecordError(errors.UNSUPPORTED_FORMAT, f"the path is {kind}, not an audio "
                                "file", record=record, path=path)
  if os.path.getsize(path) == 0:
    raise errors.BadRecordError(errors.EMPTY_FILE, "the file is 0 bytes", record=record, path=path)
  return path


def _output_span(offset, duration, path: str, record: str | None) -> tuple[int, int | None]:
  """[start, stop) in 16 kHz output samples; stop None = to the end."""
  try:
    offset = float(offset)
    duration = None if duration is None else float(duration)
  except (TypeError, ValueError) as e:
    raise errors.BadRecordError(errors.BAD_FIELD, f"offset/duration not numbers: {e}",
                                record=record, path=path) from None
  if not math.isfinite(offset) or offset < 0:
    raise errors.BadRecordError(errors.BAD_FIELD, f"offset must be >= 0 s, got {offset}",
                                record=record, path=path)
  if duration is not None and not (math.isfinite(duration) and duration > 0):
    raise errors.BadRecordError(errors.BAD_FIELD, f"duration must be > 0 s, got {duration}",
                                record=record, path=path)
  start = round(offset * SAMPLE_RATE)
  if duration is None:
    return start, None
  return start, start + max(1, round(duration * SAMPLE_RATE))


def _input_span(sr: int, out_start: int, out_stop: int | None) -> tuple[int, int | None, int]:
  """Source-rate samples to decode for an output span, and how many output samples to skip.

  The decode starts on a resampler period boundary (P input samples <-> Q output samples), so the
  slice's output grid coincides with the full decode's; `_RESAMPLE_MARGIN` output samples of
  context on each side keep the resampler's edge effects out of the returned samples.
  """
  if sr == SAMPLE_RATE:
    return out_start, out_stop, 0
  g = math.gcd(sr, SAMPLE_RATE)
  p, q = sr // g, SAMPLE_RATE // g
  periods = max(0, out_start - _RESAMPLE_MARGIN) // q
  in_start = periods * p
  in_stop = None if out_stop is None else -(-(out_stop + _RESAMPLE_MARGIN) * p // q)
  return in_start, in_stop, out_start - periods * q


def _check_truncation(decoder, in_start: int, in_stop: int | None, got: int, path: str,
                      record: str | None) -> None:
  declared = decoder.declared_frames
  if declared is None or in_start >= declared:
    return
  expected = (declared if in_stop is None else min(in_stop, declared)) - in_start
  slack = max(_TRUNCATION_SLACK_SECONDS * decoder.sample_rate, _TRUNCATION_SLACK_FRACTION * expected)
  if got < expected - slack:
    sr = decoder.sample_rate
    raise errors.BadRecordError(
        errors.CORRUPT_AUDIO,
        f"truncated: decoding stopped at {(in_start + got) / sr:.3f} s, the header declares "
        f"{declared / sr:.3f} s", record=record, path=path)


# --------------------------------------------------------------------------- decoders


class _SoundFileDecoder:
  """libsndfile: exact frame counts and sample-accurate seeking (mp3 included, libsndfile >= 1.1)."""

  def __init__(self, path: str):
    self._file = soundfile.SoundFile(path)
    self.sample_rate = int(self._file.samplerate)
    self.declared_frames = self._declared_frames()

  def _declared_frames(self) -> int:
    """The header's length; for WAV-like files libsndfile trims `frames` to the bytes present and
    only its log keeps the declared data size ("data : N (should be M)")."""
    frames = int(self._file.frames)
    info = self._file.extra_info
    data = re.search(r"^data\s*:\s*(\d+)\s*\(should be (\d+)\)", info, re.MULTILINE)
    align = re.search(r"Block Align\s*:\s*(\d+)", info)
    if data and align and int(align.group(1)) > 0:
      declared = int(data.group(1))
      # 0 / 0xFFFFFFFF / 0x7FFFFFFF mark streamed WAVs whose size was never filled in.
      if declared not in (0, 0xFFFFFFFF, 0x7FFFFFFF) and declared > int(data.group(2)):
        return max(frames, declared // int(align.group(1)))
    return frames

  def read(self, start: int, stop: int | None) -> np.ndarray:
    if start >= self._file.frames:
      return np.zeros((0, self._file.channels), np.float32)
    self._file.seek(start)
    count = -1 if stop is None else max(0, stop - start)
    return self._file.read(count, dtype="float32", always_2d=True)

  def duration_seconds(self) -> float:
    return self._file.frames / self.sample_rate

  def close(self) -> None:
    self._file.close()


_AV_SCALE = {"u8": 128.0, "s16": 32768.0, "s32": 2.0**31, "s64": 2.0**63}


def _av_frame_samples(frame) -> np.ndarray:
  """One decoded PyAV frame as float32 [n, channels], whatever its sample format."""
  fmt = frame.format.name.rstrip("p")
  channels = len(frame.layout.channels)
  arr = frame.to_ndarray()
  arr = arr if frame.format.is_planar else arr.reshape(-1, channels).T
  if fmt == "u8":
    arr = arr.astype(np.float32) - 128.0
  arr = arr.astype(np.float32)
  if fmt in _AV_SCALE:
    arr = arr / np.float32(_AV_SCALE[fmt])
  return arr.T


class _AvDecoder:
  """FFmpeg through PyAV, for containers libsndfile does not read (m4a/aac/mp4/webm...)."""

  def __init__(self, path: str):
    self._path = path
    self._container = av.open(path)
    if not self._container.streams.audio:
      self._container.close()
      raise _NoAudioStream()
    self._stream = self._container.streams.audio[0]
    self.sample_rate = int(self._stream.codec_context.sample_rate or self._stream.rate or 0)
    if self.sample_rate <= 0:
      self._container.close()
      raise ValueError("no sample rate in the stream header")
    self.declared_frames = self._declared_frames()

  def _declared_frames(self) -> int | None:
    seconds = None
    if self._stream.duration is not None and self._stream.time_base is not None:
      seconds = float(self._stream.duration * self._stream.time_base)
    elif self._container.duration is not None:
      seconds = self._container.duration / 1e6
    return None if seconds is None else round(seconds * self.sample_rate)

  def _index(self, frame) -> int | None:
    """Sample index of a frame's first sample relative to the first decoded sample."""
    start, time_base = self._stream.start_time, self._stream.time_base
    if frame.pts is None or start is None or time_base is None:
      return None
    return round((frame.pts - start) * time_base * self.sample_rate)

  def _frames_from(self, start: int) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (index, samples) of consecutive frames, the first one starting at or before `start`."""
    warmup = round(_AV_SEEK_WARMUP_SECONDS * self.sample_rate)
    if start > 2 * warmup and self._stream.start_time is not None:
      target = self._stream.start_time + int(
          (start - warmup) / self.sample_rate / self._stream.time_base)
      self._container.seek(target, stream=self._stream, backward=True)
      frames = self._container.decode(self._stream)
      kept = None
      for i, frame in enumerate(frames):
        if i >= _AV_WARMUP_FRAMES:
          kept = frame
          break
      index = None if kept is None else self._index(kept)
      if index is not None and index <= start:
        yield index, _av_frame_samples(kept)
        for frame in frames:
          index += kept.samples
          kept = frame
          yield index, _av_frame_samples(frame)
        return
      # The seek landed after the target or lost timestamps: decode from the beginning.
      self._container.close()
      self._container = av.open(self._path)
      self._stream = self._container.streams.audio[0]
    index = 0
    for frame in self._container.decode(self._stream):
      yield index, _av_frame_samples(frame)
      index += frame.samples

  def read(self, start: int, stop: int | None) -> np.ndarray:
    parts = []
    channels = None
    for index, samples in self._frames_from(start):
      channels = samples.shape[1]
      end = index + len(samples)
      if end > start:
        parts.append(samples[max(0, start - index):None if stop is None else max(0, stop - index)])
      if stop is not None and end >= stop:
        break
    if not parts:
      return np.zeros((0, channels or 1), np.float32)
    return np.concatenate(parts, axis=0)

  def duration_seconds(self) -> float:
    """End of the last packet minus the stream start (priming samples excluded), no decoding."""
    start = self._stream.start_time or 0
    end = None
    for packet in self._container.demux(self._stream):
      if packet.pts is not None and packet.duration is not None:
        end = max(end or 0, packet.pts + packet.duration)
    if end is None:
      declared = self.declared_frames
      return 0.0 if declared is None else declared / self.sample_rate
    return float((end - start) * self._stream.time_base)

  def close(self) -> None:
    self._container.close()


class _NoAudioStream(Exception):
  pass


class _open_decoder:  # pylint: disable=invalid-name
  """Context manager picking the decoder for `path` and mapping its failures to reasons."""

  def __init__(self, path: str, record: str | None):
    self._path = path
    self._record = record
    self._decoder = None

  def _error(self, reason: str, detail: str) -> errors.BadRecordError:
    return errors.BadRecordError(reason, detail, record=self._record, path=self._path)

  def __enter__(self):
    ext = os.path.splitext(self._path)[1].lower()
    problems = []
    if ext in SOUNDFILE_EXTENSIONS:
      try:
        self._decoder = _SoundFileDecoder(self._path)
        return self
      except (soundfile.LibsndfileError, RuntimeError, TypeError) as e:
        problems.append(f"soundfile: {e}")
    try:
      self._decoder = _AvDecoder(self._path)
      return self
    except _NoAudioStream:
      raise self._error(errors.UNSUPPORTED_FORMAT, "the file has no audio stream") from None
    except (av.error.FFmpegError, ValueError, OSError) as e:
      problems.append(f"PyAV: {e}")
    reason = errors.CORRUPT_AUDIO if ext in AUDIO_EXTENSIONS else errors.UNSUPPORTED_FORMAT
    raise self._error(reason, "cannot decode: " + "; ".join(problems))

  @property
  def sample_rate(self) -> int:
    return self._decoder.sample_rate

  @property
  def declared_frames(self) -> int | None:
    return self._decoder.declared_frames

  def duration_seconds(self) -> float:
    try:
      return self._decoder.duration_seconds()
    except Exception as e:  # pylint: disable=broad-except
      raise self._error(errors.CORRUPT_AUDIO, f"reading the header failed: {e}") from None

  def read(self, start: int, stop: int | None) -> np.ndarray:
    try:
      return self._decoder.read(start, stop)
    except errors.BadRecordError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      # Decoder failures come as LibsndfileError, av.error.*, RuntimeError, ValueError...: all
      # mean the bytes cannot be decoded.
      raise self._error(errors.CORRUPT_AUDIO, f"decoding failed: {type(e).__name__}: {e}") from None

  def __exit__(self, *exc):
    if self._decoder is not None:
      self._decoder.close()
    return False

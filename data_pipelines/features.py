"""Whisper 128-bin log-mel (spec section 1) in NumPy, and the 4-second chunk layouts of the batch.

`log_mel` is the host reference: it reproduces transformers 4.57.1
`WhisperFeatureExtractor._np_extract_fbank_features` on the raw waveform (no 30 s padding) step by
step, including its dtypes (float64 STFT stored as complex64, float64 power and mel, log10 cast to
float32 before the clamp), so the host "mel" feature mode is the reference front end.

`waveform_chunks` writes the samples each 400-frame chunk's STFT reads (moss_jax/batch.py), so the
on-device mel (moss_jax/model/mel.py) of every chunk equals the same frames of `log_mel` of the
whole audio; `mel_chunks` cuts a whole-audio mel into the same chunk slots.
"""

from __future__ import annotations

import functools

import numpy as np

from moss_jax import batch as batch_lib

SAMPLE_RATE = batch_lib.SAMPLE_RATE
N_FFT = batch_lib.N_FFT
HOP_LENGTH = batch_lib.HOP_LENGTH
NUM_MEL_BINS = batch_lib.NUM_MEL_BINS
CHUNK_FRAMES = batch_lib.CHUNK_FRAMES
CHUNK_SAMPLES = batch_lib.CHUNK_SAMPLES
STFT_CONTEXT = batch_lib.STFT_CONTEXT
WAVEFORM_CHUNK_SAMPLES = batch_lib.WAVEFORM_CHUNK_SAMPLES
MEL_FLOOR = 1e-10
DYNAMIC_RANGE = 8.0  # log10 units kept below the per-audio maximum
_FRAMES_PER_BLOCK = 2000  # 20 s of frames per FFT block: ~20 MB of float64 temporaries


@functools.lru_cache(maxsize=None)
def mel_filters() -> np.ndarray:
  """float64 [128, 201] Slaney-scale, Slaney-normalised triangular filters over 0-8 kHz.

  librosa's bank in float64 equals transformers' `mel_filter_bank(..., norm="slaney",
  mel_scale="slaney")` to ~1e-16; the float32 default would differ by ~1e-9.
  """
  import librosa  # pylint: disable=import-outside-toplevel  (slow import; only needed once)
  filters = librosa.filters.mel(sr=SAMPLE_RATE, n_fft=N_FFT, n_mels=NUM_MEL_BINS, fmin=0.0,
                                fmax=SAMPLE_RATE / 2, htk=False, norm="slaney", dtype=np.float64)
  filters.setflags(write=False)
  return filters


@functools.lru_cache(maxsize=None)
def hann_window() -> np.ndarray:
  """Periodic Hann window of length 400 (the first 400 points of a 401-point symmetric one)."""
  window = np.hanning(N_FFT + 1)[:-1]
  window.setflags(write=False)
  return window


def num_frames(num_samples: int) -> int:
  """Mel frames of a clip: floor(N / 160) (the STFT gives one more; the reference drops it)."""
  return batch_lib.num_mel_frames(num_samples)


def _stft_padded(waveform: np.ndarray) -> np.ndarray:
  """The centred STFT input: reflect padding of n_fft // 2 at both ends (numpy semantics)."""
  return np.pad(np.asarray(waveform), (STFT_CONTEXT, STFT_CONTEXT), mode="reflect")


def log_mel(waveform: np.ndarray) -> np.ndarray:
  """Normalised log-mel float32 [128, floor(N / 160)] of a 16 kHz mono waveform (spec 1.2-1.5)."""
  waveform = np.asarray(waveform)
  if waveform.ndim != 1:
    raise ValueError(f"waveform must be 1-D, got shape {waveform.shape}")
  frames_out = num_frames(len(waveform))
  if frames_out == 0:
    return np.zeros((NUM_MEL_BINS, 0), np.float32)
  padded = _stft_padded(waveform).astype(np.float64)
  frames = np.lib.stride_tricks.sliding_window_view(padded, N_FFT)[::HOP_LENGTH]
  log_spec = np.empty((NUM_MEL_BINS, len(frames)), np.float32)
  for start in range(0, len(frames), _FRAMES_PER_BLOCK):  # bounds memory on long recordings
    block = frames[start:start + _FRAMES_PER_BLOCK]
    spectrum = np.fft.rfft(block * hann_window(), axis=-1).astype(np.complex64)
    power = np.abs(spectrum, dtype=np.float64) ** 2  # [frames, 201]
    mel = np.maximum(MEL_FLOOR, mel_filters() @ power.T)
    log_spec[:, start:start + len(block)] = np.log10(mel)
  log_spec = log_spec[:, :-1]
  log_spec = np.maximum(log_spec, log_spec.max() - np.float32(DYNAMIC_RANGE))
  return (log_spec + np.float32(4.0)) / np.float32(4.0)


def chunk_frame_counts(num_frames_total: int) -> list[int]:
  """Valid frames of each 400-frame chunk: [400, ..., 400, tail] (no entry for 0 frames)."""
  full, tail = divmod(int(num_frames_total), CHUNK_FRAMES)
  return [CHUNK_FRAMES] * full + ([tail] if tail else [])


def waveform_chunks(waveform: np.ndarray) -> np.ndarray:
  """float32 [n_chunks, 64240]: chunk c holds padded samples [64000 c, 64000 c + 64240).

  "Padded" is the waveform with the STFT's 200-sample reflect padding at both ends, then zeros: the
  valid frames of chunk c only ever read real or reflect-padded samples, so their mel equals the
  whole-audio mel; frames past the audio's end read zeros and are masked on device.
  """
  waveform = np.asarray(waveform, np.float32)
  counts = chunk_frame_counts(num_frames(len(waveform)))
  out = np.zeros((len(counts), WAVEFORM_CHUNK_SAMPLES), np.float32)
  if not counts:
    return out
  padded = _stft_padded(waveform)
  for c in range(len(counts)):
    piece = padded[c * CHUNK_SAMPLES:c * CHUNK_SAMPLES + WAVEFORM_CHUNK_SAMPLES]
    out[c, :len(piece)] = piece
  return out


def mel_chunks(mel: np.ndarray) -> np.ndarray:
  """float32 [n_chunks, 128, 400]: a [128, T] mel cut into 400-frame chunks, the tail zero padded."""
  mel = np.asarray(mel, np.float32)
  counts = chunk_frame_counts(mel.shape[1])
  out = np.zeros((len(counts), mel.shape[0], CHUNK_FRAMES), np.float32)
  for c, count in enumerate(counts):
    out[c, :, :count] = mel[:, c * CHUNK_FRAMES:c * CHUNK_FRAMES + count]
  return out

"""Whisper 128-bin log-mel (spec section 1) in NumPy, and the 4-second chunk layouts of the batch.

`log_mel` is the host reference: it reproduces transformers 4.57.1
`WhisperFeatureExtractor._np_extract_fbank_features` on the raw waveform (no 30 s padding) step by
step, including its dtypes (float64 STFT stored as complex64, float64 power and mel, log10 cast to
float32 before the clamp), so the host "mel" feature mode is the reference front end.

`waveform_chunks` writes the samples each 400-frame chunk's STFT reads (moss_jax/batch.py), so the
on-device mel (moss_jax/model/mel.py) of every chunk equals the same frames of `log_mel` of the
whole audio; `mel_chunks` cuts a whole-audio mel into the same chunk slots. The window, filter
bank, floor and clamp are moss_jax/mel_frontend.py's, shared with the on-device mel.
"""

from __future__ import annotations

import numpy as np

from moss_jax.batch import (CHUNK_FRAMES, CHUNK_SAMPLES, HOP_LENGTH, N_FFT, NUM_MEL_BINS,
                            STFT_CONTEXT, WAVEFORM_CHUNK_SAMPLES, chunk_frame_counts,
                            num_mel_frames)
from moss_jax.mel_frontend import DYNAMIC_RANGE, MEL_FLOOR, hann_window, mel_filters

_FRAMES_PER_BLOCK = 2000  # 20 s of frames per FFT block: ~20 MB of float64 temporaries


def _stft_padded(waveform: np.ndarray) -> np.ndarray:
  """The centred STFT input: reflect padding of n_fft // 2 at both ends (numpy semantics)."""
  return np.pad(np.asarray(waveform), (STFT_CONTEXT, STFT_CONTEXT), mode="reflect")


def log_mel(waveform: np.ndarray) -> np.ndarray:
  """Normalised log-mel float32 [128, floor(N / 160)] of a 16 kHz mono waveform (spec 1.2-1.5)."""
  waveform = np.asarray(waveform)
  if waveform.ndim != 1:
    raise ValueError(f"waveform must be 1-D, got shape {waveform.shape}")
  frames_out = num_mel_frames(len(waveform))
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


def waveform_chunks(waveform: np.ndarray) -> np.ndarray:
  """float32 [n_chunks, 64240]: chunk c holds padded samples [64000 c, 64000 c + 64240).

  "Padded" is the waveform with the STFT's 200-sample reflect padding at both ends, then zeros: the
  valid frames of chunk c only ever read real or reflect-padded samples, so their mel equals the
  whole-audio mel; frames past the audio's end read zeros and are masked on device.
  """
  waveform = np.asarray(waveform, np.float32)
  counts = chunk_frame_counts(num_mel_frames(len(waveform)))
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

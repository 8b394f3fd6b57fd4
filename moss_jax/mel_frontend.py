"""Whisper log-mel settings and the mel filter bank, in NumPy: shared by host and device mel.

Bottom layer (docs/architecture.md): the host reference (data_pipelines/features.py) and the
on-device mel (moss_jax/model/mel.py) read the same window, filters, floor and clamp from here,
so neither needs the other, and the model needs no audio library.

The filter bank is transformers 4.57.1 `audio_utils.mel_filter_bank(num_frequency_bins=201,
num_mel_filters=128, min_frequency=0, max_frequency=8000, sampling_rate=16000, norm="slaney",
mel_scale="slaney")`, the bank `WhisperFeatureExtractor` uses (spec 1.3), computed in float64:
Slaney's mel scale is linear below 1 kHz and logarithmic above, the 130 band edges are equally
spaced on it, and each triangle is scaled to unit area (2 / bandwidth in Hz).
"""

from __future__ import annotations

import functools

import numpy as np

from moss_jax.batch import N_FFT, NUM_MEL_BINS, SAMPLE_RATE

MEL_FLOOR = 1e-10  # power floor before log10
DYNAMIC_RANGE = 8.0  # log10 units kept below the per-audio maximum
NUM_FREQUENCY_BINS = N_FFT // 2 + 1  # 201 rfft bins

_MIN_LOG_HZ = 1000.0  # Slaney: linear below 1 kHz, logarithmic above
_MIN_LOG_MEL = 15.0  # 3 * 1000 / 200
_MELS_PER_LOG_HZ = 27.0 / np.log(6.4)  # 27 mels per factor 6.4 above 1 kHz


def hz_to_mel(hz: np.ndarray) -> np.ndarray:
  """Slaney mel of frequencies in Hz (float64)."""
  hz = np.asarray(hz, np.float64)
  linear = 3.0 * hz / 200.0
  log = _MIN_LOG_MEL + np.log(np.maximum(hz, _MIN_LOG_HZ) / _MIN_LOG_HZ) * _MELS_PER_LOG_HZ
  return np.where(hz >= _MIN_LOG_HZ, log, linear)


def mel_to_hz(mel: np.ndarray) -> np.ndarray:
  """Inverse of `hz_to_mel`."""
  mel = np.asarray(mel, np.float64)
  linear = 200.0 * mel / 3.0
  log = _MIN_LOG_HZ * np.exp((np.maximum(mel, _MIN_LOG_MEL) - _MIN_LOG_MEL) / _MELS_PER_LOG_HZ)
  return np.where(mel >= _MIN_LOG_MEL, log, linear)


@functools.lru_cache(maxsize=None)
def mel_filters() -> np.ndarray:
  """float64 [128, 201] Slaney-scale, Slaney-normalised triangular filters over 0-8 kHz (read-only)."""
  edges = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(SAMPLE_RATE / 2), NUM_MEL_BINS + 2))
  fft_hz = np.linspace(0, SAMPLE_RATE // 2, NUM_FREQUENCY_BINS)
  widths = np.diff(edges)
  slopes = edges[None, :] - fft_hz[:, None]  # [201, 130]
  down = -slopes[:, :-2] / widths[:-1]
  up = slopes[:, 2:] / widths[1:]
  filters = np.maximum(0.0, np.minimum(down, up))  # [201, 128]
  filters *= 2.0 / (edges[2:] - edges[:-2])
  filters = np.ascontiguousarray(filters.T)
  filters.setflags(write=False)
  return filters


@functools.lru_cache(maxsize=None)
def hann_window() -> np.ndarray:
  """Periodic Hann window of length 400 (the first 400 points of a 401-point symmetric one)."""
  window = np.hanning(N_FFT + 1)[:-1]
  window.setflags(write=False)
  return window

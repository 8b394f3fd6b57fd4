"""On-device Whisper log-mel of the batch's waveform chunks (feature_mode "waveform").

Computing the mel on the accelerator keeps the host's input pipeline to decoding and resampling,
and ships 64240 float32 samples per chunk instead of 128 x 400 mel values. Each chunk slot holds
exactly the samples its 400 STFT frames read (see moss_jax/batch.py; the host writes them in
data_pipelines/features.py), so the frames are cut with reshapes (no gather), and the only
cross-chunk step is the reference's clamp at (max over the whole audio) - 8, taken here over the
valid frames of all chunks sharing an `audio_chunk_audio_id`. Window, filters, floor and clamp
come from moss_jax/mel_frontend.py, as for the host mel. The result equals the host log-mel of
the whole audio cut into chunks up to float32 FFT rounding (~1e-5 after normalisation on real
speech).

Everything is static-shaped jnp, so it jits once per batch shape and runs inside the train step.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from moss_jax import batch as batch_lib
from moss_jax import mel_frontend

_FRAMES = batch_lib.CHUNK_FRAMES  # 400 frames per chunk
_HOP = batch_lib.HOP_LENGTH  # 160
_N_FFT = batch_lib.N_FFT  # 400


@functools.lru_cache(maxsize=None)
def _constants() -> tuple[np.ndarray, np.ndarray]:
  """(periodic Hann window [400], mel filters [201, 128]) as float32 host constants."""
  return (mel_frontend.hann_window().astype(np.float32),
          np.ascontiguousarray(mel_frontend.mel_filters().T, dtype=np.float32))


def _frames(waveform: jax.Array) -> jax.Array:
  """[..., 64240] -> [..., 400, 400]: frame f = samples [160 f, 160 f + 400).

  A 400-sample frame is 2.5 hops: hop blocks f and f + 1 plus the first half of block f + 2, so
  three shifted views of a [402, 160] reshape replace a strided gather.
  """
  pad = (_FRAMES + 2) * _HOP - waveform.shape[-1]  # 80 zeros, never read by a frame
  blocks = jnp.pad(waveform, [(0, 0)] * (waveform.ndim - 1) + [(0, pad)])
  blocks = blocks.reshape(*waveform.shape[:-1], _FRAMES + 2, _HOP)
  tail = _N_FFT - 2 * _HOP
  return jnp.concatenate(
      [blocks[..., :_FRAMES, :], blocks[..., 1:_FRAMES + 1, :],
       blocks[..., 2:_FRAMES + 2, :tail]], axis=-1)


def _log_mel_unclamped(waveform: jax.Array) -> jax.Array:
  """log10 mel power [..., 400 frames, 128] of chunk waveforms [..., 64240], float32."""
  window, filters = _constants()
  spectrum = jnp.fft.rfft(_frames(waveform.astype(jnp.float32)) * window, n=_N_FFT, axis=-1)
  power = jnp.real(spectrum) ** 2 + jnp.imag(spectrum) ** 2
  mel = jnp.matmul(power, filters, precision=jax.lax.Precision.HIGHEST)
  return jnp.log10(jnp.maximum(mel, mel_frontend.MEL_FLOOR))


def _audio_max(log_spec: jax.Array, valid: jax.Array, audio_id: jax.Array) -> jax.Array:
  """[B, C]: max log-mel over the valid frames of every chunk of the same audio in the row."""
  chunk_max = jnp.max(jnp.where(valid[..., None], log_spec, -jnp.inf), axis=(-2, -1))
  same = (audio_id[:, :, None] == audio_id[:, None, :]) & (audio_id[:, None, :] > 0)
  return jnp.max(jnp.where(same, chunk_max[:, None, :], -jnp.inf), axis=-1)


def log_mel_chunks(audio_waveform: jax.Array, audio_chunk_frames: jax.Array,
                   audio_chunk_audio_id: jax.Array) -> jax.Array:
  """Normalised log-mel float32 [B, C, 128, 400] of waveform chunk slots [B, C, 64240].

  Frames at or beyond a chunk's valid count (and whole empty slots) are 0, like the host's
  zero-padded chunks of data_pipelines/features.py.
  """
  log_spec = _log_mel_unclamped(audio_waveform)  # [B, C, 400, 128]
  valid = jnp.arange(_FRAMES) < audio_chunk_frames[..., None]  # [B, C, 400]
  top = _audio_max(log_spec, valid, audio_chunk_audio_id)
  log_spec = jnp.maximum(log_spec, top[..., None, None] - mel_frontend.DYNAMIC_RANGE)
  mel = jnp.where(valid[..., None], (log_spec + 4.0) / 4.0, 0.0)
  return jnp.swapaxes(mel, -1, -2)


def model_audio_mel(batch: dict, model_config) -> jax.Array:
  """The encoder's mel input [B, C, 128, 400] in the model dtype.

  Takes the host mel (`audio_mel`, feature_mode "mel") or computes it from `audio_waveform`, then
  rounds it to `audio.mel_dtype` (bf16 by default), as the reference processor does before the
  conv stem, so float32 runs see the same input values as the reference.
  """
  if "audio_mel" in batch:
    mel = jnp.asarray(batch["audio_mel"], jnp.float32)
  else:
    mel = log_mel_chunks(batch["audio_waveform"], batch["audio_chunk_frames"],
                         batch["audio_chunk_audio_id"])
  mel = mel.astype(jnp.dtype(model_config.audio.mel_dtype))
  return mel.astype(jnp.dtype(model_config.dtype))

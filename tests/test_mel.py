"""Log-mel: NumPy reference and on-device chunked mel against transformers' WhisperFeatureExtractor.

`pytest -q -s tests/test_mel.py` prints the measured max abs differences.
"""

import math

import jax
import numpy as np
import pytest
import soundfile
import soxr
from transformers import WhisperFeatureExtractor

from configs import base
from data_pipelines import audio, features
from moss_jax import batch as batch_lib
from moss_jax import mel_frontend
from moss_jax.model import mel as mel_lib

CLIPS = ("speech_en.mp3", "speech_zh.mp3", "dialogue_zh.mp3")  # 10 s, 4 s, 12.2 s
TOL = 1e-3  # max abs difference after normalisation
_log_mel_chunks = jax.jit(mel_lib.log_mel_chunks)


@pytest.fixture(scope="module")
def clips(real_audio_dir):
  return {name: audio.load_audio(real_audio_dir / name) for name in CLIPS}


@pytest.fixture(scope="module")
def reference():
  """The reference front end: transformers 4.57.1 WhisperFeatureExtractor, no 30 s padding."""
  extractor = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160,
                                      n_fft=400)
  return lambda x: extractor._np_extract_fbank_features(  # pylint: disable=protected-access
      np.asarray(x, np.float32)[None], device="cpu")[0]


def _device_mels(rows: list[list[np.ndarray]], num_slots: int) -> list[list[np.ndarray]]:
  """Runs log_mel_chunks on rows of audios (packed like the data pipeline) and reassembles each
  audio's [128, T] mel from its chunks."""
  shape = (len(rows), num_slots)
  waves = np.zeros(shape + (batch_lib.WAVEFORM_CHUNK_SAMPLES,), np.float32)
  frames, ids = np.zeros(shape, np.int32), np.zeros(shape, np.int32)
  layout = []
  for b, row in enumerate(rows):
    slot, spans = 0, []
    for audio_id, x in enumerate(row, start=1):
      chunks = features.waveform_chunks(x)
      counts = batch_lib.chunk_frame_counts(batch_lib.num_mel_frames(len(x)))
      end = slot + len(counts)
      waves[b, slot:end], frames[b, slot:end], ids[b, slot:end] = chunks, counts, audio_id
      spans.append((slot, counts))
      slot = end
    layout.append(spans)
  out = np.asarray(_log_mel_chunks(waves, frames, ids))
  assert out.shape == shape + (128, 400) and out.dtype == np.float32
  # Frames past a chunk's count and empty slots are exactly zero.
  valid = np.arange(400) < frames[..., None]
  assert not np.any(np.where(valid[:, :, None, :], 0.0, out))
  return [[np.concatenate([out[b, s + c, :, :n] for c, n in enumerate(counts)], axis=1)
           for s, counts in spans] for b, spans in enumerate(layout)]


def _max_diff(a, b):
  assert a.shape == b.shape
  return float(np.abs(a - b).max())


def test_real_recordings_match_the_reference(clips, reference):
  """Host NumPy mel, on-device chunked mel (three audios in one row) and transformers agree."""
  device = _device_mels([[clips[name] for name in CLIPS]], num_slots=8)[0]
  for name, on_device in zip(CLIPS, device):
    x = clips[name]
    want = reference(x)
    host = features.log_mel(x)
    assert host.shape == (128, len(x) // 160)
    d_host, d_dev, d_both = _max_diff(host, want), _max_diff(on_device, want), _max_diff(on_device, host)
    print(f"{name}: {len(x) / 16000:.2f} s, {host.shape[1]} frames: |host-ref| {d_host:.2e} "
          f"|device-ref| {d_dev:.2e} |device-host| {d_both:.2e}")
    assert max(d_host, d_dev, d_both) <= TOL


def test_host_mel_of_a_long_recording(real_audio_dir, reference):
  """30 s of m4a: the host mel works in 20 s FFT blocks and still matches bit for bit."""
  x = audio.load_audio(real_audio_dir / "monologue_zh.m4a")
  host = features.log_mel(x)
  assert host.shape[1] > features._FRAMES_PER_BLOCK  # pylint: disable=protected-access
  d = _max_diff(host, reference(x))
  print(f"monologue_zh.m4a: {len(x) / 16000:.2f} s, {host.shape[1]} frames: |host-ref| {d:.2e}")
  assert d <= TOL


def test_frame_counts():
  for n in (0, 1, 159, 160, 161, 63999, 64000, 64159, 64160, 64321):
    frames = n // 160
    assert features.log_mel(np.full(n, 0.1, np.float32)).shape == (128, frames)
    counts = batch_lib.chunk_frame_counts(frames)
    assert sum(counts) == frames and all(0 < c <= 400 for c in counts)
    assert len(features.waveform_chunks(np.ones(n, np.float32))) == math.ceil(frames / 400) == len(counts)


def test_lengths_short_exact_and_multi_chunk(clips, reference):
  """Clips shorter than, exactly and longer than 4 s (one audio per row): host == reference,
  device chunks == host mel_chunks."""
  speech = np.concatenate([clips["speech_en.mp3"], clips["dialogue_zh.mp3"]])
  lengths = (401, 40000, 63999, 64000, 64001, 64160 + 37, 128000 + 485, 150000, 256000)
  waves = [speech[5000:5000 + n] for n in lengths]
  assert len(clips["speech_zh.mp3"]) == 64000  # the real exactly-4-s clip
  waves.append(clips["speech_zh.mp3"])
  device = _device_mels([[x] for x in waves], num_slots=4)
  for x, (on_device,) in zip(waves, device):
    host = features.log_mel(x)
    assert _max_diff(host, reference(x)) <= TOL
    assert _max_diff(on_device, host) <= TOL
    counts = batch_lib.chunk_frame_counts(host.shape[1])
    host_chunks = features.mel_chunks(host)
    assert host_chunks.shape == (len(counts), 128, 400)
    assert not np.any(host_chunks[-1][:, counts[-1]:])


def test_clamp_is_per_audio(clips):
  """A quiet audio with digital silence next to a loud one: each is clamped at its own max - 8."""
  loud = clips["speech_zh.mp3"][:30000]
  quiet = clips["speech_en.mp3"][:70000] * np.float32(1e-3)
  quiet[20000:30000] = 0.0  # log10(1e-10) = -10: far below the quiet audio's max - 8
  device = _device_mels([[loud, quiet]], num_slots=4)[0]
  for x, on_device in zip((loud, quiet), device):
    assert _max_diff(on_device, features.log_mel(x)) <= TOL
  # The test can tell: the loud audio's max - 8 would lift the quiet audio's floor.
  own = features.log_mel(quiet)
  assert own.min() < features.log_mel(np.concatenate([loud, quiet]))[:, -own.shape[1]:].min() - 0.5


def test_waveform_chunk_layout():
  x = np.arange(1, 70001, dtype=np.float32)
  chunks = features.waveform_chunks(x)
  assert chunks.shape == (2, 64240)
  np.testing.assert_array_equal(chunks[0, :200], x[200:0:-1])  # reflect padding at the start
  np.testing.assert_array_equal(chunks[0, 200:], x[:64040])
  np.testing.assert_array_equal(chunks[1, :6200], x[63800:])
  np.testing.assert_array_equal(chunks[1, 6200:6400], x[-2:-202:-1])  # reflect padding at the end
  assert not chunks[1, 6400:].any()  # zeros beyond


def test_model_audio_mel(clips):
  cfg = base.model_config("tiny")
  x = clips["speech_en.mp3"][:100000]
  chunks = features.waveform_chunks(x)
  counts = batch_lib.chunk_frame_counts(batch_lib.num_mel_frames(len(x)))
  waves = np.zeros((1, 4, 64240), np.float32)
  waves[0, :2] = chunks
  frames = np.array([counts + [0, 0]], np.int32)
  ids = np.array([[1, 1, 0, 0]], np.int32)
  batch = dict(audio_waveform=waves, audio_chunk_frames=frames, audio_chunk_audio_id=ids)
  run = jax.jit(lambda b: mel_lib.model_audio_mel(b, cfg))
  got = np.asarray(run(batch))
  exact = np.asarray(_log_mel_chunks(waves, frames, ids))
  assert got.dtype == np.float32
  np.testing.assert_array_equal(got, exact.astype(jax.numpy.bfloat16).astype(np.float32))
  assert not np.array_equal(got, exact)  # the bf16 rounding happened
  host = np.zeros((1, 4, 128, 400), np.float32)
  host[0, :2] = features.mel_chunks(features.log_mel(x))
  mel_batch = dict(audio_mel=host, audio_chunk_frames=frames, audio_chunk_audio_id=ids)
  np.testing.assert_allclose(np.asarray(run(mel_batch)), got, atol=2 * 2**-8 * np.abs(got).max())
  cfg.dtype = "bfloat16"
  assert mel_lib.model_audio_mel(mel_batch, cfg).dtype == jax.numpy.bfloat16


def _sinc_resample(x: np.ndarray, orig: int, new: int, zero_crossings: int = 6,
                   rolloff: float = 0.99) -> np.ndarray:
  """The reference loader's resampler (torchaudio.functional.resample defaults: Hann-windowed
  sinc, 6 zero crossings, cutoff 0.99 x the lower Nyquist), written out in NumPy."""
  g = math.gcd(orig, new)
  orig, new = orig // g, new // g
  cutoff = min(orig, new) * rolloff
  width = math.ceil(zero_crossings * orig / cutoff)
  t = (np.arange(-width, width + orig)[None, :] / orig - np.arange(new)[:, None] / new) * cutoff
  t = np.clip(t, -zero_crossings, zero_crossings)
  kernels = np.sinc(t) * np.cos(t * np.pi / zero_crossings / 2) ** 2 * cutoff / orig
  padded = np.pad(x.astype(np.float64), (width, width + orig))
  frames = np.lib.stride_tricks.sliding_window_view(padded, 2 * width + orig)[::orig]
  return (frames @ kernels.T).reshape(-1)[:math.ceil(new * len(x) / orig)].astype(np.float32)


def test_soxr_vs_reference_resampler(real_audio_dir):
  """soxr VHQ and the reference's torchaudio sinc resampler differ only in the top mel bins (5-8 kHz)."""
  raw, sr = soundfile.read(str(real_audio_dir / "speech_en.mp3"), dtype="float32", always_2d=True)
  mono = raw.mean(axis=1, dtype=np.float32)
  ours = soxr.resample(mono, sr, 16000, quality="VHQ")
  theirs = _sinc_resample(mono, sr, 16000)
  assert ours.shape == theirs.shape == (160000,)
  diff = np.abs(features.log_mel(ours) - features.log_mel(theirs))
  below_5k = diff[:108]  # mel bins 0-107 are centred below ~4.9 kHz
  print(f"speech_en resampler soxr-VHQ vs torchaudio-sinc: wave max {np.abs(ours - theirs).max():.3e}"
        f", mel max {diff.max():.3f} (mean {diff.mean():.4f}), mel max below 5 kHz {below_5k.max():.4f}")
  assert below_5k.max() < 0.01 and diff.mean() < 0.01


def test_filter_bank_is_whisper_s():
  """The NumPy filter bank of moss_jax/mel_frontend.py is the one WhisperFeatureExtractor builds."""
  want = WhisperFeatureExtractor(feature_size=128).mel_filters.T  # [128, 201] float64
  got = mel_frontend.mel_filters()
  assert got.shape == (128, 201) and got.dtype == np.float64
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-15)

"""data_pipelines.audio on the real recordings and on deliberately broken files."""

import os

import numpy as np
import pytest
import soundfile

from data_pipelines import audio, errors

# name -> (expected seconds, source sample rate, source channels)
REAL = {
    "speech_en.mp3": (10.0, 44100, 2),
    "speech_zh.mp3": (4.0, 44100, 2),
    "dialogue_zh.mp3": (12.2, 24000, 1),
    "monologue_zh.m4a": (30.33, 48000, 2),
}


@pytest.fixture(scope="module")
def decoded(real_audio_dir):
  return {name: audio.load_audio(real_audio_dir / name) for name in REAL}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_recording_loads(name, decoded, real_audio_dir):
  seconds, _, _ = REAL[name]
  x = decoded[name]
  assert x.dtype == np.float32 and x.ndim == 1
  assert np.isfinite(x).all()
  assert abs(len(x) / audio.SAMPLE_RATE - seconds) < 0.05
  assert 0.05 < np.abs(x).max() < 2.0  # real speech, not silence or garbage scaling
  assert abs(audio.audio_duration(real_audio_dir / name) - len(x) / audio.SAMPLE_RATE) < 0.05


def test_real_recordings_cover_the_source_formats(real_audio_dir):
  """The fixtures exercise resampling from 44.1k stereo and 24k mono mp3 (soundfile) and m4a."""
  for name, (_, rate, channels) in REAL.items():
    if name.endswith(".mp3"):
      info = soundfile.info(str(real_audio_dir / name))
      assert (info.samplerate, info.channels) == (rate, channels)


@pytest.mark.parametrize("name,offset,duration", [
    ("speech_en.mp3", 1.0, 2.0),
    ("speech_en.mp3", 2.3456, 0.7),
    ("dialogue_zh.mp3", 0.0, 0.5),
    ("dialogue_zh.mp3", 3.5, None),
    ("speech_zh.mp3", 2.0, 100.0),  # runs past the end: cut short
    ("monologue_zh.m4a", 12.345, 3.0),  # PyAV seek path
    ("monologue_zh.m4a", 0.1, 1.0),  # PyAV from the start
    ("monologue_zh.m4a", 28.0, None),
])
def test_slice_equals_slicing_the_full_decode(name, offset, duration, decoded, real_audio_dir):
  """Decoding with context aligned to the resampler period makes slices agree with the full decode."""
  full = decoded[name]
  part = audio.load_audio(real_audio_dir / name, offset, duration)
  start = round(offset * audio.SAMPLE_RATE)
  stop = None if duration is None else start + round(duration * audio.SAMPLE_RATE)
  expected = full[start:stop]
  assert part.shape == expected.shape
  np.testing.assert_allclose(part, expected, rtol=0, atol=1e-6)


def test_channels_are_averaged_and_resampled(tmp_path):
  t = np.arange(44100) / 44100
  left, right = np.sin(2 * np.pi * 440 * t), 0.5 * np.sin(2 * np.pi * 1000 * t)
  path = tmp_path / "stereo.wav"
  soundfile.write(path, np.stack([left, right], 1).astype(np.float32), 44100, subtype="FLOAT")
  x = audio.load_audio(path)
  assert len(x) == 16000
  t16 = np.arange(16000) / 16000
  want = 0.5 * (np.sin(2 * np.pi * 440 * t16) + 0.5 * np.sin(2 * np.pi * 1000 * t16))
  np.testing.assert_allclose(x[200:-200], want[200:-200], atol=1e-3)


def test_pyav_decodes_integer_pcm_like_soundfile(tmp_path):
  """An int16 stereo WAV read through PyAV (by naming it .mka) equals soundfile's decode."""
  rng = np.random.default_rng(0)
  pcm = (rng.standard_normal((8000, 2)) * 3000).astype(np.int16)
  soundfile.write(tmp_path / "a.wav", pcm, 16000, subtype="PCM_16")
  (tmp_path / "a.mka").write_bytes((tmp_path / "a.wav").read_bytes())
  np.testing.assert_array_equal(audio.load_audio(tmp_path / "a.mka"),
                                audio.load_audio(tmp_path / "a.wav"))
  assert abs(audio.audio_duration(tmp_path / "a.mka") - 0.5) < 0.01


def _reason(path, **kwargs):
  with pytest.raises(errors.BadRecordError) as info:
    audio.load_audio(path, record="m.jsonl:7", **kwargs)
  message = str(info.value)
  assert str(path) in message and "m.jsonl:7" in message
  return info.value.reason


def _wav(path, samples, sr=16000):
  soundfile.write(path, np.asarray(samples, np.float32), sr, subtype="FLOAT")
  return path


def test_missing_and_empty_files(tmp_path):
  assert _reason(tmp_path / "nope.wav") == errors.MISSING_FILE
  (tmp_path / "empty.mp3").write_bytes(b"")
  assert _reason(tmp_path / "empty.mp3") == errors.EMPTY_FILE
  assert _reason(_wav(tmp_path / "zero.wav", np.zeros(0))) == errors.EMPTY_FILE


def test_directories_fifos_and_devices_are_not_audio_files(tmp_path):
  (tmp_path / "clips.wav").mkdir()
  os.mkfifo(tmp_path / "pipe.wav")  # opening it would block forever
  for path, kind in [(tmp_path / "clips.wav", "a directory"), (tmp_path / "pipe.wav", "a FIFO"),
                     ("/dev/zero", "a device")]:
    with pytest.raises(errors.BadRecordError, match=kind) as e:
      audio.load_audio(path, record="m.jsonl:3")
    assert e.value.reason == errors.UNSUPPORTED_FORMAT and "m.jsonl:3" in str(e.value)


def test_corrupt_and_truncated_files(tmp_path, real_audio_dir):
  rng = np.random.default_rng(1)
  (tmp_path / "noise.mp3").write_bytes(rng.bytes(20000))
  assert _reason(tmp_path / "noise.mp3") == errors.CORRUPT_AUDIO
  mp3 = (real_audio_dir / "speech_en.mp3").read_bytes()
  (tmp_path / "half.mp3").write_bytes(mp3[:len(mp3) // 2])
  assert _reason(tmp_path / "half.mp3") == errors.CORRUPT_AUDIO
  # The intact first half of a truncated file is still usable.
  assert len(audio.load_audio(tmp_path / "half.mp3", 1.0, 1.0)) == 16000
  wav = _wav(tmp_path / "ok.wav", rng.standard_normal(16000) * 0.1).read_bytes()
  (tmp_path / "half.wav").write_bytes(wav[:len(wav) // 2])
  assert _reason(tmp_path / "half.wav") == errors.CORRUPT_AUDIO
  (tmp_path / "header.wav").write_bytes(wav[:44])
  assert _reason(tmp_path / "header.wav") == errors.CORRUPT_AUDIO
  m4a = (real_audio_dir / "monologue_zh.m4a").read_bytes()
  (tmp_path / "half.m4a").write_bytes(m4a[:len(m4a) // 2])
  assert _reason(tmp_path / "half.m4a") == errors.CORRUPT_AUDIO


def test_unsupported_format(tmp_path):
  (tmp_path / "notes.txt").write_text("not audio at all\n")
  assert _reason(tmp_path / "notes.txt") == errors.UNSUPPORTED_FORMAT


def test_non_finite_samples(tmp_path):
  x = np.random.default_rng(2).standard_normal(16000) * 0.1
  x[1234] = np.nan
  assert _reason(_wav(tmp_path / "nan.wav", x)) == errors.NON_FINITE_AUDIO
  x[1234] = np.inf
  assert _reason(_wav(tmp_path / "inf.wav", x, sr=44100)) == errors.NON_FINITE_AUDIO


def test_bad_spans(tmp_path, real_audio_dir):
  path = _wav(tmp_path / "one_second.wav", np.ones(16000) * 0.1)
  assert _reason(path, offset=1.0) == errors.BAD_FIELD  # at the end
  assert _reason(path, offset=5.0, duration=1.0) == errors.BAD_FIELD
  assert _reason(path, offset=-0.5) == errors.BAD_FIELD
  assert _reason(path, duration=0.0) == errors.BAD_FIELD
  assert _reason(path, offset=float("nan")) == errors.BAD_FIELD
  assert _reason(real_audio_dir / "monologue_zh.m4a", offset=31.0) == errors.BAD_FIELD
  assert len(audio.load_audio(path, offset=0.75)) == 4000

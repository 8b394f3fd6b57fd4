"""Input transfer: batches placed on the devices ahead of the step, and int16 PCM waveforms.

Real pieces only: the Grain pipeline on the shipped sample corpus, real audio files, the on-device
mel, a real Program.
"""

from __future__ import annotations

import glob
import os

import jax
import numpy as np
import pytest
import soundfile as sf

from data_pipelines import audio as audio_lib
from data_pipelines import features
from data_pipelines import pipeline
from moss_jax import batch as batch_lib
from moss_jax import sharding
from moss_jax import train_step as ts
from moss_jax.model.mel import model_audio_mel
from test_train_helpers import REPO, run_config

pytestmark = pytest.mark.usefixtures("fast_compiles")
AUDIO = os.path.join(REPO, "data_pipelines", "sample_corpus", "audio")


def _files(rate: int, subtype: str) -> list[str]:
  return [f for f in sorted(glob.glob(os.path.join(AUDIO, "*")))
          if sf.info(f).samplerate == rate and sf.info(f).subtype == subtype]


def _one_clip_batch(path: str) -> dict[str, np.ndarray]:
  wave = audio_lib.load_audio(path)
  chunks = features.waveform_chunks(wave)
  counts = batch_lib.chunk_frame_counts(batch_lib.num_mel_frames(len(wave)))
  c = len(counts)
  return {"audio_waveform": chunks[None], "audio_chunk_frames": np.array([counts], np.int32),
          "audio_chunk_audio_id": np.ones((1, c), np.int32)}


def test_int16_transfer_is_exact_for_16_bit_16_khz_audio():
  config = run_config()
  clips = _files(16000, "PCM_16")
  assert clips, "the sample corpus has 16-bit 16 kHz clips"
  batch = _one_clip_batch(clips[0])
  sent, error = ts.encode_for_transfer(batch, "int16")
  assert error == 0.0 and sent["audio_waveform"].dtype == np.int16
  assert sent["audio_waveform"].nbytes * 2 == batch["audio_waveform"].nbytes
  back = ts.decode_transfer(jax.device_put(sent))["audio_waveform"]
  np.testing.assert_array_equal(np.asarray(back), batch["audio_waveform"])  # bit for bit
  mel32 = model_audio_mel(jax.device_put(batch), config.model)
  mel16 = model_audio_mel(ts.decode_transfer(jax.device_put(sent)), config.model)
  np.testing.assert_array_equal(np.asarray(mel16), np.asarray(mel32))


def test_int16_transfer_rounds_other_audio_and_says_so():
  clips = _files(22050, "PCM_16") or _files(24000, "VORBIS")
  batch = _one_clip_batch(clips[0])  # resampled to 16 kHz: not k / 32768
  sent, error = ts.encode_for_transfer(batch, "int16")
  assert 0.0 < error <= 0.5 / 32768 + 1e-12
  back = np.asarray(ts.decode_transfer(jax.device_put(sent))["audio_waveform"])
  np.testing.assert_allclose(back, batch["audio_waveform"], atol=0.5 / 32768 + 1e-12, rtol=0)


def test_program_evaluates_int16_batches_like_float32():
  """A real batch travels as int16 through Program.global_batch and the jitted step's forward;
  the statistics equal the float32 path's (bit for bit when the batch is all 16-bit audio)."""
  config = run_config({"data.feature_mode": "waveform"})
  loader = pipeline.make_train_loader(config, 0, 1)
  host = next(loader)
  loader.close()
  stats = {}
  for form in ("float32", "int16"):
    c = run_config({"data.feature_mode": "waveform", "data.waveform_transfer": form})
    prog = ts.build_program(c, sharding.make_mesh(c.mesh))
    assert prog.abstract_batch["audio_waveform"].dtype == np.dtype(form)
    params = ts.full_params(prog.init_state(jax.random.key(0)))
    stats[form] = jax.device_get(prog.evaluate(params, prog.global_batch(host)))
  assert stats["int16"]["tokens"] == stats["float32"]["tokens"] > 0
  if ts.encode_for_transfer(host, "int16")[1] == 0.0:
    assert stats["int16"]["ce_sum"] == stats["float32"]["ce_sum"]
  else:  # resampled clips in the batch: a 16-bit rounding of their samples
    np.testing.assert_allclose(stats["int16"]["ce_sum"], stats["float32"]["ce_sum"], rtol=1e-4)


def test_device_prefetch_keeps_the_consumed_state():
  """The prefetcher runs ahead of the loop, yet checkpoints the state of the batches consumed:
  a loader restored from it continues with the batch the loop would have seen next."""
  config = run_config({"data.feature_mode": "mel"})
  prog = ts.build_program(config, sharding.make_mesh(config.mesh))
  direct = pipeline.make_train_loader(config, 0, 1)
  expected = [next(direct) for _ in range(4)]
  direct.close()

  ahead = ts.DevicePrefetch(pipeline.make_train_loader(config, 0, 1), prog.global_batch, size=2)
  for want in expected[:2]:
    got = next(ahead)
    assert isinstance(got["input_ids"], jax.Array)
    np.testing.assert_array_equal(np.asarray(got["input_ids"]), want["input_ids"])
  state = ahead.get_state()  # the loader itself is already further ahead
  ahead.close()

  resumed = pipeline.make_train_loader(config, 0, 1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["input_ids"], expected[2]["input_ids"])
  resumed.close()


def test_device_prefetch_raises_the_loader_error():
  class Broken:
    def __init__(self):
      self.n = 0

    def __next__(self):
      self.n += 1
      if self.n > 1:
        raise ValueError("bad shard file x.jsonl")
      return {"x": np.zeros((8, 2), np.int32)}

    def get_state(self):
      return {"n": self.n}

  ahead = ts.DevicePrefetch(Broken(), lambda b: b, size=2)
  next(ahead)
  with pytest.raises(ValueError, match="bad shard file"):
    next(ahead)
  ahead.close()

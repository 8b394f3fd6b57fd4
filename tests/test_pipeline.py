"""The Grain pipeline end to end: schema, determinism, process sharding, resume (also through
Orbax), worker processes, bad input of every kind, host mel == on-device mel, eval/generation."""

import json
import re

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
import soundfile as sf

from configs import pretrain
from data_pipelines import errors, packing, pipeline, tokenizers
from moss_jax import batch as batch_lib

SR = 16000
NUM_GOOD = 14


def _tone(seconds, freq=220.0, seed=0):
  t = np.arange(int(round(seconds * SR))) / SR
  noise = np.random.default_rng(seed).standard_normal(len(t)) * 0.01
  return (0.2 * np.sin(2 * np.pi * freq * t) + noise).astype(np.float32)


def _good_records(root):
  """NUM_GOOD records in all formats and tasks; answer i contains 'sample NN'."""
  (root / "audio").mkdir()
  records = []
  for i in range(NUM_GOOD):
    seconds = 0.6 + 0.25 * i
    ext = "flac" if i % 2 else "wav"
    sf.write(str(root / "audio" / f"g{i:02d}.{ext}"), _tone(seconds, 150 + 30 * i, i), SR)
    path, answer = f"audio/g{i:02d}.{ext}", f"sample {i:02d} ok"
    kind = i % 7
    if kind == 0:
      records.append({"id": f"g{i}", "audio": path, "task": "asr", "text": answer})
    elif kind == 1:
      records.append({"id": f"g{i}", "audio": path, "task": "caption", "text": answer})
    elif kind == 2:
      records.append({"id": f"g{i}", "audio": path, "task": "qa", "text": answer,
                      "question": "What is said?"})
    elif kind == 3:
      records.append({"id": f"g{i}", "audio": path, "task": "asr_timestamps", "segments": [
          {"start": 0.1, "end": seconds / 2, "text": f"sample {i:02d}"},
          {"start": seconds / 2, "end": seconds, "text": "ok"}]})
    elif kind == 4:
      records.append({"id": f"g{i}", "task": "text", "text": answer})
    elif kind == 5:
      records.append({"messages": [{"role": "user", "content": "<audio>What is said?"},
                                   {"role": "assistant", "content": answer}], "audios": [path]})
    else:
      records.append({"conversation": [
          {"role": "user", "message_type": "audio", "content": path},
          {"role": "user", "message_type": "text", "content": "Transcribe the audio."},
          {"role": "assistant", "message_type": "text", "content": answer}], "task": "asr"})
  return records


def _write_jsonl(path, lines):
  with open(path, "wb") as f:
    for line in lines:
      f.write(line if isinstance(line, bytes) else json.dumps(line).encode())
      f.write(b"\n")
  return str(path)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  manifest = _write_jsonl(root / "train.jsonl", _good_records(root))
  model = tokenizers.train_sentencepiece(tokenizers.manifest_texts([manifest]),
                                         str(root / "tok"), 400)
  return {"root": root, "manifest": manifest, "tokenizer": model}


def make_config(corpus, **data):
  c = pretrain.get_config("demo")
  c.data.train_manifests = corpus["manifest"]
  c.data.eval_manifest = corpus["manifest"]
  c.data.tokenizer.path = corpus["tokenizer"]
  c.data.batch_size = 4
  c.data.max_tokens = 256
  c.data.max_audio_chunks = 3
  c.data.max_audio_seconds = 8.0
  c.data.prefetch = 1
  for k, v in data.items():
    setattr(c.data, k, v)
  return c


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def sample_numbers(tok, batches) -> list[int]:
  """'sample NN' of every packed sample, read from its tokens."""
  out = []
  for b in batches:
    for r in range(b["input_ids"].shape[0]):
      for s in np.unique(b["segment_ids"][r][b["segment_ids"][r] > 0]):
        text = tok.decode(b["input_ids"][r][b["segment_ids"][r] == s])
        (number,) = re.findall(r"sample (\d\d)", text)
        out.append(int(number))
  return out


def test_train_batches_follow_the_schema_and_the_seed(corpus):
  c = make_config(corpus)
  a = pipeline.make_train_loader(c, 0, 1)
  got = take(a, 5)
  for b in got:
    batch_lib.check_batch(b, batch_lib.batch_shapes_from_config(c))
  assert_same(got, take(pipeline.make_train_loader(c, 0, 1), 5))
  c.data.seed = 1
  other = take(pipeline.make_train_loader(c, 0, 1), 5)
  assert any(not np.array_equal(x["input_ids"], y["input_ids"]) for x, y in zip(got, other))
  tok = tokenizers.load_tokenizer(c.data.tokenizer)
  seen = sample_numbers(tok, got)
  assert set(seen) == set(range(NUM_GOOD))  # 5 batches of 4 rows cover more than an epoch
  assert a.bad_record_counts() == {}


def test_processes_read_disjoint_halves(corpus):
  c = make_config(corpus)
  tok = tokenizers.load_tokenizer(c.data.tokenizer)
  encoder = pipeline.RecordEncoder(tok, max_audio_seconds=8.0)
  spec = pipeline.pack_spec(c, 2, tok)
  halves = []
  for p in (0, 1):
    it = pipeline.build_loader([corpus["manifest"]], encoder, spec, seed=3, shuffle=True,
                               repeat=False, process_index=p, process_count=2)
    halves.append(sample_numbers(tok, list(it)))
  assert len(halves[0]) == len(set(halves[0])) == NUM_GOOD // 2
  assert set(halves[0]).isdisjoint(halves[1])
  assert set(halves[0]) | set(halves[1]) == set(range(NUM_GOOD))
  train = pipeline.make_train_loader(c, 1, 2)
  assert next(train)["input_ids"].shape == (2, c.data.max_tokens)
  with pytest.raises(ValueError, match="divisible"):
    pipeline.make_train_loader(make_config(corpus, batch_size=3), 0, 2)


def test_mixture_weights_and_per_epoch_reshuffle(tmp_path):
  a = _write_jsonl(tmp_path / "a.jsonl", [{"task": "text", "text": "a"}] * 10)
  b = _write_jsonl(tmp_path / "b.jsonl", [{"task": "text", "text": "b"}] * 30)
  for weights, share_a in (("3,1", 0.75), ("", 0.25)):
    ds = pipeline.record_dataset([a, b], seed=0, shuffle=True, repeat=True, weights=weights)
    names = [ds[i].manifest for i in range(400)]
    assert abs(names.count(a) / 400 - share_a) < 0.03
  one = pipeline.record_dataset([a], seed=0, shuffle=True, repeat=True)
  epochs = [[one[i].lineno for i in range(e * 10, e * 10 + 10)] for e in range(3)]
  assert all(sorted(e) == list(range(1, 11)) for e in epochs)
  assert epochs[0] != epochs[1] != epochs[2]
  again = pipeline.record_dataset([a], seed=0, shuffle=True, repeat=True)
  assert [again[i].lineno for i in range(30)] == sum(epochs, [])


def test_resume_mid_epoch_gives_the_same_batches(corpus):
  c = make_config(corpus)
  it = pipeline.make_train_loader(c, 0, 1)
  take(it, 2)
  state = json.dumps(it.get_state())
  expected = take(it, 4)
  resumed = pipeline.make_train_loader(c, 0, 1)
  resumed.set_state(state)
  assert_same(take(resumed, 4), expected)
  assert resumed.get_state() == it.get_state()


def test_resume_through_an_orbax_checkpoint(corpus, tmp_path):
  c = make_config(corpus)
  it = pipeline.make_train_loader(c, 0, 1)
  take(it, 3)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = take(it, 3)
  resumed = pipeline.make_train_loader(c, 0, 1)
  with ocp.CheckpointManager(tmp_path / "ckpt") as mngr:
    mngr.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(resumed)))
  assert_same(take(resumed, 3), expected)


def test_worker_processes_give_the_same_batches_and_state(corpus):
  base = take(pipeline.make_train_loader(make_config(corpus), 0, 1), 5)
  c = make_config(corpus, num_workers=2)
  it = pipeline.make_train_loader(c, 0, 1)
  try:
    assert_same(take(it, 3), base[:3])
    state = it.get_state()
    assert_same(take(it, 2), base[3:])
  finally:
    it.close()
  resumed = pipeline.make_train_loader(c, 0, 1)
  try:
    resumed.set_state(json.loads(json.dumps(state)))
    assert_same(take(resumed, 2), base[3:])
  finally:
    resumed.close()


# ----------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_corpus(corpus, real_audio_dir):
  """The good records plus one record of every bad kind (and one too big for a row)."""
  root = corpus["root"] / "bad"
  root.mkdir()
  (root / "empty.wav").write_bytes(b"")
  mp3 = (real_audio_dir / "speech_zh.mp3").read_bytes()
  (root / "half.mp3").write_bytes(mp3[:len(mp3) // 2])
  sf.write(str(root / "full.flac"), _tone(3.0), SR)
  flac = (root / "full.flac").read_bytes()
  (root / "half.flac").write_bytes(flac[:len(flac) // 2])
  nan = _tone(1.0)
  nan[500] = np.nan
  sf.write(str(root / "nan.wav"), nan, SR, subtype="FLOAT")
  sf.write(str(root / "short.wav"), _tone(0.05), SR)
  sf.write(str(root / "long.wav"), _tone(9.0), SR)
  sf.write(str(root / "big.wav"), _tone(7.5), SR)  # under 8 s, but with its text over 256 tokens
  sf.write(str(root / "ok.wav"), _tone(2.0), SR)

  def rec(audio, **kw):
    return {"audio": audio, "task": "asr", "text": "bad", **kw}

  bad = [
      (rec("missing.wav"), errors.MISSING_FILE),
      (rec("empty.wav"), errors.EMPTY_FILE),
      (rec("half.mp3"), errors.CORRUPT_AUDIO),
      (rec("half.flac"), errors.CORRUPT_AUDIO),
      (rec("nan.wav"), errors.NON_FINITE_AUDIO),
      (rec("short.wav"), errors.TOO_SHORT),
      (rec("long.wav"), errors.TOO_LONG),
      (b'{"audio": "ok.wav", "task": "asr", "text": ', errors.MALFORMED_JSON),
      ({"audio": "ok.wav", "task": "asr"}, errors.MISSING_FIELD),
      (b'{"audio": "ok.wav", "task": "asr", "text": "\xc3\x28"}', errors.BAD_ENCODING),
      ({"audio": "ok.wav", "task": "asr_timestamps", "segments": [
          {"start": 1.0, "end": 1.5, "text": "b"}, {"start": 0.2, "end": 0.5, "text": "a"}]},
       errors.BAD_TIMESTAMPS),
      ({"audio": "ok.wav", "task": "asr_timestamps", "segments": [
          {"start": 0.0, "end": 5.0, "text": "a"}]}, errors.BAD_TIMESTAMPS),
      (rec("big.wav", text="big " * 150), errors.DOES_NOT_FIT),
  ]
  good = _good_records(root)
  lines, expected = [], {}
  for i, (line, reason) in enumerate(bad):  # interleave bad and good lines
    lines += [line] + good[i:i + 1]
    expected[reason] = expected.get(reason, 0) + 1
  lines += good[len(bad):]
  return {"manifest": _write_jsonl(root / "mixed.jsonl", lines), "expected": expected}


def _eval_loader(c, manifest, **kw):
  tok = tokenizers.load_tokenizer(c.data.tokenizer)
  encoder = pipeline.RecordEncoder(tok, max_audio_seconds=c.data.max_audio_seconds)
  spec = pipeline.pack_spec(c, 2, tok)
  return tok, pipeline.build_loader([manifest], encoder, spec, shuffle=False, repeat=False, **kw)


def test_every_bad_record_is_counted_and_every_good_one_delivered(corpus, bad_corpus):
  c = make_config(corpus)
  tok, it = _eval_loader(c, bad_corpus["manifest"])
  batches = list(it)
  assert sorted(sample_numbers(tok, batches)) == list(range(NUM_GOOD))
  assert it.bad_record_counts() == dict(sorted(bad_corpus["expected"].items()))
  assert sum(bad_corpus["expected"].values()) == 13


def test_bad_record_counts_with_workers_and_across_restore(corpus, bad_corpus):
  c = make_config(corpus)
  tok, it = _eval_loader(c, bad_corpus["manifest"], num_workers=2)
  try:
    first = take(it, 2)
    state = it.get_state()
    counts_then = it.bad_record_counts()
    rest = list(it)
    final = it.bad_record_counts()
  finally:
    it.close()
  assert final == dict(sorted(bad_corpus["expected"].items()))
  assert 0 < sum(counts_then.values()) < sum(final.values())
  _, resumed = _eval_loader(c, bad_corpus["manifest"], num_workers=2)
  try:
    resumed.set_state(state)
    assert resumed.bad_record_counts() == counts_then
    assert_same(list(resumed), rest)
    assert resumed.bad_record_counts() == final
  finally:
    resumed.close()
  assert sorted(sample_numbers(tok, first + rest)) == list(range(NUM_GOOD))


# ----------------------------------------------------------------------------- features, eval


def test_host_mel_equals_on_device_mel(corpus):
  from moss_jax.model import mel  # pylint: disable=import-outside-toplevel
  wave_batch = next(pipeline.make_train_loader(make_config(corpus), 0, 1))
  mel_batch = next(pipeline.make_train_loader(make_config(corpus, feature_mode="mel"), 0, 1))
  for k in batch_lib.TOKEN_FIELDS + batch_lib.CHUNK_FIELDS:
    np.testing.assert_array_equal(wave_batch[k], mel_batch[k], err_msg=k)
  assert (wave_batch["audio_chunk_frames"] > 0).sum() >= 4
  device = np.asarray(mel.log_mel_chunks(wave_batch["audio_waveform"],
                                         wave_batch["audio_chunk_frames"],
                                         wave_batch["audio_chunk_audio_id"]))
  np.testing.assert_allclose(device, mel_batch["audio_mel"], atol=1e-3)


def test_eval_batches_cover_the_manifest_once(corpus):
  c = make_config(corpus)
  tok = tokenizers.load_tokenizer(c.data.tokenizer)
  batches = list(pipeline.make_eval_batches(c, batch_size=2, process_index=0, process_count=1))
  for b in batches:
    batch_lib.check_batch(b, batch_lib.batch_shapes(2, 256, 3))
  assert sorted(sample_numbers(tok, batches)) == list(range(NUM_GOOD))


def test_generation_inputs(corpus):
  c = make_config(corpus)
  tok = tokenizers.load_tokenizer(c.data.tokenizer)
  items = pipeline.make_generation_inputs(c, corpus["manifest"], num_samples=4)
  assert [ref for _, ref, _ in items][:3] == ["sample 00 ok", "sample 01 ok", "sample 02 ok"]
  assert items[3][1].startswith("[0.10]sample 03[") and items[3][2] == "asr_timestamps"
  for b, _, _ in items:
    batch_lib.check_batch(b, batch_lib.batch_shapes(1, 256, 3))
    n = int((b["segment_ids"][0] > 0).sum())
    assert b["input_ids"][0, n - 3:n].tolist() == (
        [tok.im_start_id] + tok.encode("assistant") + tok.encode("\n"))
    assert (b["labels"] == -100).all() and (b["audio_token_index"][0] >= 0).any()


def test_pack_spec_uses_the_config(corpus):
  c = make_config(corpus, feature_mode="mel")
  tok = tokenizers.load_tokenizer(c.data.tokenizer)
  assert pipeline.pack_spec(c, 2, tok) == packing.PackSpec(2, 256, 3, "mel", tok.pad_id)


def test_audio_cache_serves_later_epochs_and_still_counts_bad_records(corpus, bad_corpus):
  c = make_config(corpus)
  tok = tokenizers.load_tokenizer(c.data.tokenizer)
  encoder = pipeline.RecordEncoder(tok, max_audio_seconds=c.data.max_audio_seconds, cache_mb=64)
  spec = pipeline.pack_spec(c, 2, tok)
  epochs = []
  for _ in range(2):
    it = pipeline.build_loader([bad_corpus["manifest"]], encoder, spec, shuffle=False,
                               repeat=False)
    epochs.append((list(it), it.bad_record_counts()))
  (first, first_bad), (second, second_bad) = epochs
  # Records that fail to load are never cached: the second epoch re-reads each one. The one
  # that loads but does not fit a row is cached (packing rejects it, as often as it comes).
  unloadable = sum(bad_corpus["expected"].values()) - bad_corpus["expected"][errors.DOES_NOT_FIT]
  assert encoder.cache.misses == NUM_GOOD + 1 + 2 * unloadable
  assert encoder.cache.hits == NUM_GOOD + 1 == len(encoder.cache)
  assert first_bad == second_bad == dict(sorted(bad_corpus["expected"].items()))
  assert len(first) == len(second)
  for a, b in zip(first, second):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  # Without a cache the same batches come out.
  plain = pipeline.RecordEncoder(tok, max_audio_seconds=c.data.max_audio_seconds)
  again = list(pipeline.build_loader([bad_corpus["manifest"]], plain, spec, shuffle=False,
                                     repeat=False))
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_decoded_cache_budget_order_and_pickling():
  import pickle
  from data_pipelines import audio_cache
  cache = audio_cache.DecodedCache(max_bytes=3 * 4000)
  load = lambda i: (lambda: (f"sample{i}", [np.full(1000, i, np.float32)]))  # 4000 bytes each
  for i in range(3):
    cache.get_or_load(i, load(i))
  cache.get_or_load(0, load(0))  # 0 is now the most recently used
  cache.get_or_load(3, load(3))  # evicts 1, the least recently used
  assert len(cache) == 3 and cache.size_bytes == 12000
  assert cache.get_or_load(0, load(99))[0] == "sample0"  # a hit
  assert cache.get_or_load(1, load(1))[0] == "sample1"  # a miss again
  sample, waves = cache.get_or_load(1, load(99))
  with pytest.raises(ValueError, match="read-only"):
    waves[0][0] = 5.0
  too_big = audio_cache.DecodedCache(max_bytes=100)
  too_big.get_or_load("a", load(1))
  assert len(too_big) == 0
  clone = pickle.loads(pickle.dumps(cache))
  assert len(clone) == 0 and clone.max_bytes == cache.max_bytes

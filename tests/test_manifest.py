"""Manifest parsing (three formats), per-reason rejection, random access, audio loading checks."""

import json
import os
import pickle

import numpy as np
import pytest
import soundfile as sf

from data_pipelines import errors, manifest


def parse(tmp_path, record, lineno=1):
  line = record if isinstance(record, (bytes, str)) else json.dumps(record)
  return manifest.parse_line(line, str(tmp_path / "m.jsonl"), lineno)


def reason_of(tmp_path, record) -> str:
  with pytest.raises(errors.BadRecordError) as e:
    parse(tmp_path, record)
  assert str(tmp_path / "m.jsonl") + ":1" in str(e.value)  # names manifest:line
  return e.value.reason


def write_wav(path, seconds, sr=16000):
  t = np.arange(int(round(seconds * sr))) / sr
  sf.write(str(path), (0.2 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), sr)
  return str(path)


def test_native_record(tmp_path):
  s = parse(tmp_path, {"id": 7, "audio": "clips/a.flac", "task": "asr_timestamps", "text": "hi",
                       "offset": 1.5, "duration": 2.0, "timestamp_level": "word",
                       "segments": [{"start": 0, "end": 0.5, "text": "hi"},
                                    {"start": 0.5, "end": 0.5, "text": "there"}]})
  assert s.id == "7" and s.task == "asr_timestamps" and s.text == "hi"
  assert s.audios == (manifest.AudioRef(str(tmp_path / "clips" / "a.flac"), 1.5, 2.0),)
  assert s.segments == (manifest.Segment(0.0, 0.5, "hi"), manifest.Segment(0.5, 0.5, "there"))
  assert s.timestamp_level == "word" and s.messages is None
  assert s.source == f"{tmp_path / 'm.jsonl'}:1"


def test_native_audio_lists_absolute_paths_and_defaults(tmp_path):
  s = parse(tmp_path, {"audio": ["/abs/x.wav", {"path": "y.wav", "offset": 2}], "task": "caption",
                       "text": "rain", "duration": 3})
  assert s.audios == (manifest.AudioRef("/abs/x.wav", 0.0, 3.0),
                      manifest.AudioRef(str(tmp_path / "y.wav"), 2.0, 3.0))
  assert s.id == s.source and s.question is None
  q = parse(tmp_path, {"audio": "a.wav", "task": "qa", "text": "yes", "question": "Rain?"})
  assert q.question == "Rain?"
  t = parse(tmp_path, {"task": "text", "text": "plain words"})
  assert t.audios == () and t.text == "plain words"


def test_messages_record(tmp_path):
  s = parse(tmp_path, {"messages": [
      {"role": "system", "content": "Be brief."},
      {"role": "user", "content": "<audio>Compare with <audio>."},
      {"role": "assistant", "content": "Same."}], "audios": ["a.wav", "b.wav"]})
  assert [m.role for m in s.messages] == ["system", "user", "assistant"]
  assert s.messages[1].content == (0, "Compare with ", 1, ".")
  assert [a.path for a in s.audios] == [str(tmp_path / "a.wav"), str(tmp_path / "b.wav")]
  assert s.task == "qa" and s.text == "Same." and s.question == "Compare with ."
  parts = parse(tmp_path, {"messages": [
      {"role": "user", "content": [{"type": "audio", "audio": "c.wav"},
                                   {"type": "text", "text": "What is it?"}]},
      {"role": "assistant", "content": "A dog."}], "task": "caption"})
  assert parts.messages[0].content == (0, "What is it?") and parts.task == "caption"
  assert parts.audios[0].path == str(tmp_path / "c.wav")


def test_conversation_record(tmp_path):
  s = parse(tmp_path, {"conversation": [
      {"role": "user", "message_type": "audio", "content": "a.wav"},
      {"role": "user", "message_type": "text", "content": "Transcribe the audio."},
      {"role": "assistant", "message_type": "text", "content": "Hello."}]})
  assert [m.role for m in s.messages] == ["user", "assistant"]
  assert s.messages[0].content == (0, "\n", "Transcribe the audio.")
  assert s.text == "Hello." and s.question == "Transcribe the audio." and s.task == "qa"


@pytest.mark.parametrize("record,reason", [
    ('{"audio": "a.wav", "task": "asr", "text": "x"', errors.MALFORMED_JSON),
    ("[1, 2]", errors.MALFORMED_JSON),
    (b'{"audio": "a.wav", "task": "asr", "text": "caf\xe9"}', errors.BAD_ENCODING),
    ('{"audio": "a.wav", "task": "asr", "text": "\\ud800"}', errors.BAD_ENCODING),
    ({"audio": "a.wav", "task": "asr"}, errors.MISSING_FIELD),
    ({"audio": "a.wav", "text": "x"}, errors.MISSING_FIELD),
    ({"task": "asr", "text": "x"}, errors.MISSING_FIELD),
    ({"audio": "a.wav", "task": "qa", "text": "x"}, errors.MISSING_FIELD),
    ({"audio": "a.wav", "task": "asr_timestamps", "text": "x"}, errors.MISSING_FIELD),
    ({"audio": "a.wav", "task": "asr", "text": "x", "segments": [{"start": 0, "end": 1}]},
     errors.MISSING_FIELD),
    ({"audio": "a.wav", "task": "sing", "text": "x"}, errors.BAD_FIELD),
    ({"audio": "a.wav", "task": "asr", "text": 3}, errors.BAD_FIELD),
    ({"audio": "a.wav", "task": "asr", "text": " "}, errors.BAD_FIELD),  # no answer to learn
    ({"messages": [{"role": "user", "content": "<audio>hi"}, {"role": "assistant", "content": ""}],
      "audios": ["a.wav"]}, errors.BAD_FIELD),
    ({"audio": "a.wav", "task": "asr", "text": "x", "offset": -1}, errors.BAD_FIELD),
    ({"audio": 5, "task": "asr", "text": "x"}, errors.BAD_FIELD),
    ({"audio": "a.wav", "task": "asr_timestamps", "segments": [
        {"start": 1.0, "end": 2.0, "text": "b"}, {"start": 0.0, "end": 0.5, "text": "a"}]},
     errors.BAD_TIMESTAMPS),
    ({"audio": "a.wav", "task": "asr_timestamps", "segments": [
        {"start": 2.0, "end": 1.0, "text": "a"}]}, errors.BAD_TIMESTAMPS),
    ({"messages": [{"role": "user", "content": "<audio>hi"},
                   {"role": "assistant", "content": "x"}], "audios": []}, errors.BAD_FIELD),
    ({"messages": [{"role": "user", "content": "hi"}]}, errors.MISSING_FIELD),
    ({"messages": [{"role": "robot", "content": "hi"}]}, errors.BAD_FIELD),
    ({"conversation": [{"role": "user", "message_type": "video", "content": "v.mp4"}]},
     errors.BAD_FIELD),
])
def test_bad_records_get_their_reason(tmp_path, record, reason):
  assert reason_of(tmp_path, record) == reason


def test_read_manifest_never_stops(tmp_path):
  path = tmp_path / "m.jsonl"
  good = json.dumps({"audio": "a.wav", "task": "asr", "text": "ok"}).encode()
  path.write_bytes(b"\n".join([good, b"{oops", b"", b"\xff\xfe", good, b"   ", good]) + b"\n")
  items = list(manifest.read_manifest(str(path)))
  kinds = [x.reason if isinstance(x, errors.BadRecordError) else "ok" for x in items]
  assert kinds == ["ok", errors.MALFORMED_JSON, errors.BAD_ENCODING, "ok", "ok"]
  assert [x.source.rsplit(":", 1)[1] for x in items if not isinstance(x, Exception)] == [
      "1", "5", "7"]


def test_manifest_source_random_access_and_pickle(tmp_path):
  path = tmp_path / "m.jsonl"
  lines = [json.dumps({"id": i, "audio": "a.wav", "task": "asr", "text": f"t{i}"}) for i in range(5)]
  path.write_text(lines[0] + "\n\n" + "\n".join(lines[1:]))  # blank line, no final newline
  src = manifest.ManifestSource(str(path))
  assert len(src) == 5
  clone = pickle.loads(pickle.dumps(src))
  for i in (4, 0, 2):
    raw = clone[i]
    assert raw.data.strip() == lines[i].encode() and raw.manifest == str(path)
    assert manifest.parse_line(raw.data, raw.manifest, raw.lineno).text == f"t{i}"
  assert src[1].lineno == 3
  with pytest.raises(FileNotFoundError):
    manifest.ManifestSource(str(tmp_path / "none.jsonl"))


def test_load_audios_checks_lengths_and_segments(tmp_path):
  write_wav(tmp_path / "three.wav", 3.0)
  write_wav(tmp_path / "blip.wav", 0.05)  # 800 samples, under one encoder token
  ok = parse(tmp_path, {"audio": "three.wav", "task": "asr_timestamps", "offset": 0.5,
                        "duration": 2.0, "segments": [{"start": 0.1, "end": 2.0, "text": "a"}]})
  (w,) = manifest.load_audios(ok, max_audio_seconds=10)
  assert w.dtype == np.float32 and len(w) == 32000

  def reason(record, limit=10.0):
    with pytest.raises(errors.BadRecordError) as e:
      manifest.load_audios(parse(tmp_path, record), limit)
    assert e.value.record == f"{tmp_path / 'm.jsonl'}:1"
    return e.value.reason

  assert reason({"audio": "blip.wav", "task": "asr", "text": "x"}) == errors.TOO_SHORT
  assert reason({"audio": "three.wav", "task": "asr", "text": "x"}, 2.5) == errors.TOO_LONG
  assert reason({"audio": "three.wav", "task": "asr_timestamps", "segments": [
      {"start": 0, "end": 3.5, "text": "x"}]}) == errors.BAD_TIMESTAMPS
  assert reason({"audio": "gone.wav", "task": "asr", "text": "x"}) == errors.MISSING_FILE
  # An offset span inside the limit is fine even if the file is longer.
  short = parse(tmp_path, {"audio": "three.wav", "task": "asr", "text": "x", "offset": 1.0})
  assert len(manifest.load_audios(short, 2.5)[0]) == 32000


def test_manifest_paths():
  assert manifest.manifest_paths("a.jsonl, b.jsonl,,") == ["a.jsonl", "b.jsonl"]
  assert manifest.manifest_paths(["x", ""]) == ["x"]
  assert os.path.basename(manifest.manifest_paths("dir/c.jsonl")[0]) == "c.jsonl"

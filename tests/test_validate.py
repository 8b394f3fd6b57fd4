"""`python -m data_pipelines.validate`: clean manifests pass, every bad record is named with its reason."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import soundfile as sf

from configs import pretrain
from data_pipelines import validate
from moss_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CORPUS = os.path.join(REPO, "data_pipelines", "sample_corpus")


def _tone(seconds: float, rate: int = 16000) -> np.ndarray:
  t = np.arange(int(seconds * rate)) / rate
  return (0.3 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)


@pytest.fixture(scope="module")
def bad_manifest(tmp_path_factory):
  """A manifest mixing good records with one of each problem; returns (path, {line: reason})."""
  root = tmp_path_factory.mktemp("validate")
  sf.write(root / "ok.wav", _tone(1.0), 16000)
  sf.write(root / "ok24k.flac", _tone(2.0, 24000), 24000)
  sf.write(root / "long.wav", _tone(4.0), 16000)
  sf.write(root / "short.wav", _tone(0.05), 16000)  # 50 ms: 5 mel frames, under one token
  nan = _tone(1.0)
  nan[100] = np.nan
  sf.write(root / "nan.wav", nan, 16000, subtype="FLOAT")
  (root / "garbage.wav").write_bytes(b"RIFF not really a wave file" * 20)
  (root / "empty.flac").write_bytes(b"")
  good = {"task": "asr", "text": "hello"}
  lines = [
      (json.dumps({"id": "g1", "audio": "ok.wav", **good}), None),
      ('{"id": "broken", "audio": ', "malformed_json"),
      (json.dumps({"id": "m", "audio": "ok.wav", "task": "asr"}), "missing_field"),
      (json.dumps({"id": "t", "audio": "ok.wav", "task": "dance", "text": "x"}), "bad_field"),
      ("", None),  # blank lines are skipped but still counted in line numbers
      (json.dumps({"id": "f", "audio": "nowhere.wav", **good}), "missing_file"),
      (json.dumps({"id": "c", "audio": "garbage.wav", **good}), "corrupt_audio"),
      (json.dumps({"id": "e", "audio": "empty.flac", **good}), "empty_file"),
      (json.dumps({"id": "s", "audio": "short.wav", **good}), "too_short"),
      (json.dumps({"id": "l", "audio": "long.wav", **good}), "too_long"),
      (json.dumps({"id": "n", "audio": "nan.wav", **good}), "non_finite_audio"),
      (json.dumps({"id": "o", "audio": "ok24k.flac", "task": "asr_timestamps", "text": "a b",
                   "segments": [{"start": 1.0, "end": 1.5, "text": "b"},
                                {"start": 0.1, "end": 0.5, "text": "a"}]}), "bad_timestamps"),
      (json.dumps({"id": "p", "audio": "ok.wav", "task": "asr_timestamps", "text": "a",
                   "segments": [{"start": 0.2, "end": 3.5, "text": "a"}]}), "bad_timestamps"),
      (json.dumps({"id": "g2", "audio": "ok24k.flac", "task": "qa", "question": "What?",
                   "text": "A tone."}), None),
  ]
  path = root / "mixed.jsonl"
  path.write_text("\n".join(line for line, _ in lines) + "\n", encoding="utf-8")
  expected = {i: reason for i, (_, reason) in enumerate(lines, start=1) if reason}
  return str(path), expected


def _command(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, "-m", "data_pipelines.validate", *args],
                        capture_output=True, text=True, cwd=REPO, timeout=300, check=False)


def test_sample_corpus_passes_as_subprocess():
  eval_manifest = os.path.join(CORPUS, "eval.jsonl")
  proc = _command(f"--manifests={eval_manifest}", "--json", "--config=configs/pretrain.py:demo")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  summary = json.loads(proc.stdout.strip().splitlines()[-1])
  with open(eval_manifest, encoding="utf-8") as f:
    num_lines = sum(1 for line in f if line.strip())
  assert summary["records"] == summary["good_records"] == num_lines
  assert summary["problems"] == {}
  assert set(summary["tasks"]) == {"asr", "asr_timestamps", "caption", "qa"}
  assert 0 < summary["distinct_hours"] <= summary["hours"]


def test_every_bad_record_is_listed_with_line_and_reason(bad_manifest, capsys):
  path, expected = bad_manifest
  code = validate.run([path], max_audio_seconds=3.0)
  out = capsys.readouterr().out
  assert code == 1
  problem_lines = [l for l in out.splitlines() if l.startswith(path + ":")]
  assert len(problem_lines) == len(expected), out
  for lineno, reason in expected.items():
    assert any(l.startswith(f"{path}:{lineno}: {reason}: ") for l in problem_lines), (lineno, out)
  assert f"records: {len(expected) + 2} (2 good, {len(expected)} with problems)" in out
  assert "bad_timestamps 2" in out and "too_long 1" in out


def test_config_adds_the_row_fit_check(capsys):
  """With a config, records are encoded as it trains them; ones longer than a row are named."""
  config = pretrain.get_config("demo")
  config.data.max_tokens = 100
  manifest_path = os.path.join(CORPUS, "eval.jsonl")
  results = list(validate.check_manifests([manifest_path], config=config))
  too_big = [r for r in results if r.reason]
  assert too_big and all(r.reason == "does_not_fit" for r in too_big)
  assert len(too_big) < len(results)  # short ASR records still fit 100 tokens
  assert all(r.source.startswith(manifest_path + ":") and "100" in r.detail for r in too_big)
  # The decode-only check has no notion of rows: the same records pass.
  assert not any(r.reason for r in validate.check_manifests([manifest_path]))


def test_problem_counts_and_workers_agree(bad_manifest):
  path, expected = bad_manifest
  serial = list(validate.check_manifests([path], max_audio_seconds=3.0))
  parallel = list(validate.check_manifests([path], max_audio_seconds=3.0, workers=2))
  assert serial == parallel
  summary = validate.Summary()
  for result in serial:
    summary.add(result)
  want = {}
  for reason in expected.values():
    want[reason] = want.get(reason, 0) + 1
  assert summary.as_dict()["problems"] == want
  assert summary.as_dict()["tasks"] == {"asr": 1, "qa": 1}
  assert summary.seconds == pytest.approx(3.0, abs=1e-3)


def test_limit_is_configurable(bad_manifest, capsys):
  path, expected = bad_manifest
  validate.run([path])  # default 600 s: the 4 s clip is fine
  out = capsys.readouterr().out
  assert "too_long" not in out
  assert f"records: {len(expected) + 2} (3 good, {len(expected) - 1} with problems)" in out


def test_missing_manifest_is_a_user_error(tmp_path):
  with pytest.raises(UserError, match="manifest not found: .*absent.jsonl"):
    validate.run([str(tmp_path / "absent.jsonl")])


def test_command_takes_config_overrides_and_fails_in_one_line(tmp_path):
  """--config overrides apply (a 100-token row rejects long records, exit 1); a missing manifest
  is one `error:` line and exit 2."""
  eval_manifest = os.path.join(CORPUS, "eval.jsonl")
  proc = _command(f"--manifests={eval_manifest}", "--config=configs/pretrain.py:demo",
                  "--config.data.max_tokens=100", "--json")
  assert proc.returncode == 1, proc.stdout + proc.stderr
  problems = [l for l in proc.stdout.splitlines() if l.startswith(eval_manifest + ":")]
  assert problems and all(": does_not_fit: " in l and "max_tokens=100" in l for l in problems)
  proc = _command(f"--manifests={tmp_path / 'absent.jsonl'}")
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == (
      f"error: manifest not found: {tmp_path / 'absent.jsonl'}")

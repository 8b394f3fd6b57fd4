"""The shipped sample corpus: parses, decodes, stays small, has exact in-range timestamps, and its
tokenizer fits the demo model (<= 512 ids, specials and digits as single pieces)."""

from __future__ import annotations

import collections
import hashlib
import json
import os
import shutil
import subprocess

import numpy as np
import pytest
import sentencepiece as spm
import soundfile as sf

from configs import pretrain
from data_pipelines import errors, make_sample_corpus, manifest, templates, tokenizers

CONFIG = pretrain.get_config("demo")
CORPUS = pretrain.SAMPLE_CORPUS
MANIFESTS = {"train": CONFIG.data.train_manifests, "eval": CONFIG.data.eval_manifest}
SPEECH_TASKS = ("asr", "asr_timestamps")


def _samples(split: str) -> list[manifest.Sample]:
  out = list(manifest.read_manifest(MANIFESTS[split]))
  bad = [s for s in out if isinstance(s, errors.BadRecordError)]
  assert not bad, bad
  return out


def _timeline() -> tuple[dict, list[dict]]:
  with open(os.path.join(CORPUS, "timeline.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f]
  return rows[0], rows[1:]


def test_demo_config_points_at_the_corpus():
  for path in (CONFIG.data.train_manifests, CONFIG.data.eval_manifest, CONFIG.data.tokenizer.path):
    assert os.path.isfile(path), path


def test_manifests_parse_with_the_sizes_the_demo_expects():
  counts = {split: collections.Counter(s.task for s in _samples(split)) for split in MANIFESTS}
  assert counts["train"] == {"asr": 48, "asr_timestamps": 16, "caption": 16, "qa": 32}
  assert counts["eval"] == {"asr": 10, "asr_timestamps": 4, "caption": 4, "qa": 4}
  ids = [s.id for split in MANIFESTS for s in _samples(split)]
  assert len(ids) == len(set(ids))
  for s in _samples("train") + _samples("eval"):
    assert len(s.audios) == 1 and s.text.strip()
    assert (s.question is not None) == (s.task == "qa")
    assert os.path.dirname(s.audios[0].path) == os.path.join(CORPUS, "audio")


def test_eval_speech_is_unseen_in_training():
  def sentences(split):
    return {seg.text for s in _samples(split) if s.task == "asr_timestamps" for seg in s.segments}
  train_text = {s.text for s in _samples("train") if s.task == "asr"}
  eval_text = {s.text for s in _samples("eval") if s.task == "asr"}
  assert not train_text & eval_text
  assert not sentences("train") & sentences("eval")


def test_every_audio_decodes_and_timestamps_lie_inside_it():
  decoded = {}
  for sample in _samples("train") + _samples("eval"):
    (wave,) = manifest.load_audios(sample, CONFIG.data.max_audio_seconds)  # also the range checks
    seconds = len(wave) / 16000
    decoded[sample.audios[0].path] = seconds
    assert np.isfinite(wave).all() and 0.05 < np.abs(wave).max() <= 1.0
    if sample.task in SPEECH_TASKS:
      assert 1.5 <= seconds <= 4.0, (sample.source, seconds)
    segs = sample.segments or ()
    assert (len(segs) > 0) == (sample.task in ("asr_timestamps", "caption")), sample.source
    for prev, seg in zip((None,) + segs, segs):
      assert 0.0 < seg.start < seg.end < seconds, (sample.source, seg)
      if prev is not None:
        assert prev.end <= seg.start, (sample.source, prev, seg)  # ordered and disjoint
    if sample.task == "asr_timestamps":
      assert " ".join(seg.text for seg in segs) == sample.text
  assert len(decoded) == 78


def test_formats_rates_and_timeline_match_the_files():
  header, rows = _timeline()
  assert header["generator"] == "data_pipelines.make_sample_corpus"
  pairs = collections.Counter()
  for row in rows:
    info = sf.info(os.path.join(CORPUS, row["audio"]))
    assert (info.samplerate, info.frames, info.channels) == (row["sample_rate"], row["num_samples"], 1)
    pairs[(info.samplerate, info.format)] += 1
    seconds = row["num_samples"] / row["sample_rate"]
    if row["kind"] == "speech":
      words, sentences = row["words"], row["sentences"]
      assert " ".join(w["text"] for w in words) == row["text"].lower().replace(".", "")
      for a, b in zip(words, words[1:]):
        assert a["end"] < b["start"]  # silence between words, by construction
      for s in sentences:  # each sentence spans exactly its first to its last word
        inside = [w for w in words if s["start"] <= w["start"] and w["end"] <= s["end"]]
        assert (inside[0]["start"], inside[-1]["end"]) == (s["start"], s["end"])
      assert 0 < words[0]["start"] and words[-1]["end"] < seconds
    else:
      for event in row["events"]:
        for seg in event["segments"]:  # event onsets sit on the 0.1 s grid
          assert abs(seg["start"] * 10 - round(seg["start"] * 10)) < 1e-9
          assert seg["end"] <= seconds
  assert len(pairs) == 9  # every (16 / 22.05 / 24 kHz) x (FLAC / OGG / WAV) pairing


def test_word_timestamps_match_the_audio_energy():
  """Speech energy lives inside the stated words: the timestamps describe the actual audio."""
  _, rows = _timeline()
  for row in rows[:12]:
    wave, rate = sf.read(os.path.join(CORPUS, row["audio"]), dtype="float32")
    spans = row.get("words") or [s for e in row["events"] for s in e["segments"]]
    inside = np.zeros(len(wave), bool)
    for s in spans:
      inside[int(s["start"] * rate):int(s["end"] * rate)] = True
    rms_in = np.sqrt(np.mean(wave[inside] ** 2))
    rms_out = np.sqrt(np.mean(wave[~inside] ** 2))
    assert rms_in > 20 * rms_out, row["audio"]


def test_corpus_is_at_most_10_mb():
  total = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(CORPUS) for f in fs)
  assert total <= 10 * 1024 * 1024, total


def test_tokenizer_fits_the_demo_model():
  tok = tokenizers.load_tokenizer(CONFIG.data.tokenizer)
  sp = spm.SentencePieceProcessor(model_file=CONFIG.data.tokenizer.path)
  assert tok.vocab_size == sp.get_piece_size() <= CONFIG.model.text.vocab_size == 512
  for piece in (*tokenizers.SPECIAL_PIECES.values(), *"0123456789", "[", "]", "."):
    ids = sp.encode(piece)
    assert len(ids) == 1 and sp.id_to_piece(ids[0]) == piece, (piece, sp.encode(piece, out_type=str))
  assert sp.encode("[12.05]", out_type=str) == ["[", "1", "2", ".", "0", "5", "]"]
  assert sp.encode("there.[3.31]", out_type=str)[-7:] == [".", "[", "3", ".", "3", "1", "]"]
  assert len(tok.encode(templates.SYSTEM_PROMPT)) <= 8  # prompt strings are learned pieces
  for sample in _samples("train") + _samples("eval"):
    for text in templates.sample_texts(sample):
      ids = tok.encode(text)
      assert sp.unk_id() not in ids and tok.decode(ids) == text


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="rebuilding needs espeak-ng")
def test_rebuild_reproduces_the_shipped_files(tmp_path):
  header, _ = _timeline()
  version = subprocess.run(["espeak-ng", "--version"], capture_output=True, text=True).stdout
  if version.strip() != header["espeak"]:
    pytest.skip(f"shipped corpus was made with {header['espeak']!r}")
  make_sample_corpus.build(str(tmp_path), seed=header["seed"])

  def digests(root):
    return {os.path.relpath(os.path.join(d, f), root):
            hashlib.sha256(open(os.path.join(d, f), "rb").read()).hexdigest()
            for d, _, fs in os.walk(root) for f in fs}
  assert digests(str(tmp_path)) == digests(CORPUS)

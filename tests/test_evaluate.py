"""Scores of `moss_jax.evaluate` against values computed by hand on a small fixture."""

from __future__ import annotations

import pytest

from data_pipelines.manifest import Segment
from moss_jax import evaluate


def test_normaliser():
  assert evaluate.normalize_text("  Hello,   World! ") == "hello world"
  assert evaluate.normalize_text("ＡＢＣ，你好。") == "abc 你好"  # NFKC: full-width forms
  assert evaluate.words("我用 Python 写代码。") == "我 用 python 写 代 码"
  assert evaluate.chars("The cat sat.") == "thecatsat"


def test_wer_and_cer_by_hand():
  rates = evaluate.error_rates(["The cat sat.", "A dog", "..."], ["the cat sat", "a dig", "x"])
  assert rates["num_samples"] == 2  # the reference that normalises to nothing is left out
  assert rates["wer"] == pytest.approx(1 / 5)  # 1 substitution in 3 + 2 words
  assert rates["cer"] == pytest.approx(1 / 13)  # "thecatsat" + "adog": 9 + 4 characters
  # Chinese: one wrong character of six; each CJK character is a word for WER.
  zh = evaluate.error_rates(["今天天气很好"], ["今天天汽很好。"])
  assert zh["cer"] == pytest.approx(1 / 6) and zh["wer"] == pytest.approx(1 / 6)
  # Corpus level, not the mean of per-sample rates: (1 + 2) / (2 + 4) words.
  pooled = evaluate.error_rates(["a b", "c d e f"], ["a x", "c"])
  assert pooled["wer"] == pytest.approx(4 / 6)


def test_aas_matches_segments_and_averages_boundary_offsets():
  ref = [Segment(0.0, 1.0, "hello world"), Segment(1.0, 2.5, "good morning")]
  hyp = [Segment(0.1, 1.0, "hello world"), Segment(1.2, 2.4, "good mourning"),
         Segment(3.0, 3.5, "extra words")]
  assert evaluate.match_segments(ref, hyp) == [(0, 0), (1, 1)]
  got = evaluate.boundary_offsets(ref, hyp)
  # |0 - 0.1| + |1 - 1| + |1 - 1.2| + |2.5 - 2.4| = 0.4 s over 4 boundaries; 1 unmatched.
  assert got == {"offset_ms_sum": pytest.approx(400.0), "boundaries": 4.0, "unmatched": 1.0}
  # A dropped first segment: the alignment skips it instead of shifting every pair.
  assert evaluate.match_segments(ref, hyp[1:2]) == [(1, 0)]


def test_records_scored_and_summarised_per_task():
  recs = [
      evaluate.Record("m:1", "a", "asr", "The cat sat.", hypothesis="the cat sat"),
      evaluate.Record("m:2", "b", "asr", "A dog", hypothesis="a dig"),
      evaluate.Record("m:3", "c", "asr_timestamps", "[0.00]hello world[1.00][1.00]good day[2.00]",
                      segments=(Segment(0.0, 1.0, "hello world"), Segment(1.0, 2.0, "good day")),
                      hypothesis="[0.05]hello world[1.00][1.10]good day[2.25]"),
      evaluate.Record("m:4", "d", "qa", "B", hypothesis="The answer is (B)."),
      evaluate.Record("m:5", "e", "qa", "C", hypothesis="I think A"),
      evaluate.Record("m:6", "f", "qa", "a red car", hypothesis="A red car!"),
      evaluate.Record("m:7", "", "?", "", error="missing_file: no such audio file"),
  ]
  for r in recs:
    if r.error is None:
      r.scores = evaluate.score(r)
  report = evaluate.summarize(recs)
  assert report["num_records"] == 7 and report["errors"] == 1
  assert report["tasks"]["asr"] == {"samples": 2, "wer": pytest.approx(0.2),
                                    "cer": pytest.approx(1 / 13)}
  ts = report["tasks"]["asr_timestamps"]
  assert ts["wer"] == 0 and ts["aas_unmatched"] == 0
  assert ts["aas_ms"] == pytest.approx((50 + 0 + 100 + 250) / 4)
  assert report["tasks"]["qa"] == {"samples": 3, "accuracy": pytest.approx(2 / 3)}
  assert recs[6].to_json()["error"].startswith("missing_file")
  assert evaluate.choice_letter("I think A") == "A" and evaluate.choice_letter("none") is None

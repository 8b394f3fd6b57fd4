"""Decoding with the KV cache against full recomputation, batching, sampling, reference parity,
transcript formats and the `python -m moss_jax.generate` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from data_pipelines import templates
from data_pipelines.manifest import Segment
from moss_jax import decoding
from moss_jax import generate
from moss_jax import sharding
from moss_jax import train_step as ts
from moss_jax.model import MossAudioModel, init_params, param_shardings
from moss_jax.model.mel import model_audio_mel
from test_train_helpers import (REPO, tiny_config, train_command, train_env,
                                write_run_config)

pytestmark = pytest.mark.usefixtures("fast_compiles")

NEW = 32
NO_STOP = (-1,)
PAD = 0


def _prompts(config, rows: int, seed: int = 11):
  """Row r: the first segment of a synthetic batch row (audio + prompt), shortened by 3r tokens."""
  batch = ts.synthetic_batch(config, seed=seed, batch_size=rows)
  first = batch["segment_ids"] == 1
  for name in ("input_ids", "positions", "segment_ids", "task_ids"):
    batch[name] = np.where(first, batch[name], 0).astype(np.int32)
  batch["audio_token_index"] = np.where(first, batch["audio_token_index"], -1).astype(np.int32)
  batch["labels"][:] = -100
  for r in range(rows):
    n = int(first[r].sum()) - 3 * r
    for name in ("input_ids", "positions", "segment_ids"):
      batch[name][r, n:] = 0
    batch["audio_token_index"][r, n:] = -1
  return batch


def _full_recompute(model, params, batch, config, new: int, stop=NO_STOP):
  """Token by token, alone: the whole model on the growing sequence, argmax at the last token."""
  fwd = jax.jit(lambda p, row: model.apply(
      {"params": p}, row["input_ids"], row["positions"], row["segment_ids"],
      model_audio_mel(row, config.model), row["audio_chunk_frames"], row["audio_token_index"]))
  out = []
  for r in range(batch["input_ids"].shape[0]):
    n = int((batch["segment_ids"][r] > 0).sum())
    row = {k: v[r:r + 1].copy() for k, v in batch.items() if k not in ("labels", "task_ids")}
    for name in ("input_ids", "positions", "segment_ids", "audio_token_index"):
      extra = np.full((1, new), -1 if name == "audio_token_index" else 0, np.int32)
      row[name] = np.concatenate([row[name][:, :n], extra], axis=1)
    got = []
    for _ in range(new):
      tok = int(jnp.argmax(fwd(params, row)[0, n - 1]))
      got.append(tok)
      if tok in stop:
        break
      row["input_ids"][0, n], row["segment_ids"][0, n], row["positions"][0, n] = tok, 1, n
      n += 1
    out.append(got)
  return out


@pytest.fixture(scope="module")
def tiny():
  config = tiny_config(max_tokens=80)
  model = MossAudioModel(config=config.model)
  # Weights 4x the init scale: the greedy stream then varies instead of repeating one token.
  params = jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x,
                        init_params(config.model, jax.random.key(5)))
  return config, model, params


def _rows(tokens, stop=NO_STOP):
  return [generate.strip(r, stop) + [int(t) for t in r if int(t) in stop][:1] for r in tokens]


def test_cached_greedy_equals_full_recompute_token_for_token(tiny):
  config, model, params = tiny
  assert config.model.dtype == "float32"
  batch = _prompts(config, rows=3)
  got = generate.generate(model, params, batch, max_new_tokens=NEW, stop_ids=NO_STOP, pad_id=PAD)
  assert got.shape == (3, NEW)
  want = _full_recompute(model, params, batch, config, NEW)
  assert got.tolist() == want
  assert all(len(set(w)) > 3 for w in want), want  # not a degenerate constant stream


def test_a_model_with_unrolled_scans_decodes_with_rolled_ones(tiny):
  """The demo trains with its layer scans unrolled (model.scan_unroll 4); its decode program is
  built from a rolled copy of the model (smaller, faster to compile), which decodes the same
  parameters to the same tokens as the whole model recomputed, and leaves the model as it was."""
  config, _, params = tiny
  unrolled_config = config.model.copy_and_resolve_references()
  unrolled_config.scan_unroll = 4
  unrolled = MossAudioModel(config=unrolled_config)
  assert decoding.rolled_scans(unrolled).config.scan_unroll == 1
  batch = _prompts(config, rows=2, seed=6)
  got = generate.generate(unrolled, params, batch, max_new_tokens=12, stop_ids=NO_STOP,
                          pad_id=PAD)
  assert unrolled.config.scan_unroll == 4
  assert got.tolist() == _full_recompute(unrolled, params, batch, config, 12)


def test_batch_of_different_lengths_on_a_mesh_gives_each_prompt_its_own_tokens(tiny):
  """3 prompts of different lengths decoded together, sharded on the 8-device mesh (rows padded
  to 8), give each row exactly the tokens it gets alone on one device."""
  config, model, params = tiny
  batch = _prompts(config, rows=3, seed=4)
  lengths = generate.prompt_lengths(batch)
  assert len(set(lengths.tolist())) == 3
  mesh = sharding.make_mesh(config.mesh)
  sharded = jax.device_put(params, param_shardings(config.model, mesh))
  stop = (int(_full_recompute(model, params, {k: v[:1] for k, v in batch.items()}, config,
                              6)[0][5]),)  # row 0's 6th token stops it; the others may run on
  together = generate.generate(model, sharded, batch, max_new_tokens=12, stop_ids=stop,
                               pad_id=PAD, mesh=mesh)
  for r in range(3):
    alone = generate.generate(model, params, {k: v[r:r + 1] for k, v in batch.items()},
                              max_new_tokens=12, stop_ids=stop, pad_id=PAD)
    np.testing.assert_array_equal(together[r], alone[0])
  # Row 0 stopped at its 6th token: the stop token is kept, then padding.
  assert together[0, 5] == stop[0] and (together[0, 6:] == PAD).all()
  assert generate.strip(together[0], stop) == together[0, :5].tolist()


def _backend_compiles(fn):
  """(fn(), how many XLA compilations it ran) via jax.monitoring's compile-time events."""
  events = []
  listener = lambda name, secs, **kw: events.append(name)
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    out = fn()
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
  return out, events.count("/jax/core/compile/backend_compile_duration")


def test_prompt_widths_in_one_bucket_share_one_compiled_program(tiny):
  """Batches stacked to different widths (the longest prompt of each) decode with the same
  program once their prompts round up to the same PROMPT_BUCKET, and give the same tokens."""
  config, model, params = tiny
  batch = _prompts(config, rows=2, seed=4)
  longest = int(generate.prompt_lengths(batch).max())
  assert longest < batch["input_ids"].shape[1]
  run = lambda b: generate.generate(model, params, b, max_new_tokens=8, stop_ids=NO_STOP,
                                    pad_id=PAD)
  wide, first = _backend_compiles(lambda: run(batch))
  narrow, again = _backend_compiles(lambda: run({k: v[:, :longest] for k, v in batch.items()}))
  assert first >= 1 and again == 0, (first, again)
  np.testing.assert_array_equal(wide, narrow)


def test_sampling_is_reproducible_and_top_k_1_is_greedy(tiny):
  config, model, params = tiny
  batch = _prompts(config, rows=2, seed=7)
  kw = dict(max_new_tokens=16, stop_ids=NO_STOP, pad_id=PAD)
  greedy = generate.generate(model, params, batch, **kw)
  hot = generate.Sampling(temperature=1.5, top_k=0, top_p=1.0)
  a = generate.generate(model, params, batch, sampling=hot, seed=3, **kw)
  b = generate.generate(model, params, batch, sampling=hot, seed=3, **kw)
  c = generate.generate(model, params, batch, sampling=hot, seed=4, **kw)
  np.testing.assert_array_equal(a, b)
  assert (a != c).any() and (a != greedy).any()
  top1 = generate.generate(model, params, batch, seed=9,
                           sampling=generate.Sampling(temperature=1.0, top_k=1), **kw)
  np.testing.assert_array_equal(top1, greedy)


def test_logit_processors_by_hand():
  logits = jnp.array([[2.0, 1.9, -1.0, 0.5]])
  seen = jnp.array([[True, False, False, False]])
  key = jax.random.key(0)
  pick = lambda s, seen=seen: int(decoding.next_tokens(logits, seen, key, s)[0])
  assert pick(generate.GREEDY) == 0
  # Penalty 2: the seen 2.0 becomes 1.0 < 1.9.
  assert pick(generate.Sampling(temperature=0.0, repetition_penalty=2.0)) == 1
  # top_k 2 / top_p 0.5 never draw tokens 2 or 3.
  for s in (generate.Sampling(top_k=2), generate.Sampling(top_k=0, top_p=0.5)):
    draws = decoding.next_tokens(jnp.repeat(logits, 400, 0), jnp.repeat(seen, 400, 0),
                                 key, s)
    assert set(np.asarray(draws).tolist()) <= {0, 1}
  # top_p 0.5: token 0 alone has p = 0.43 < 0.5, so token 1 is kept too, both appear.
  assert set(np.asarray(draws).tolist()) == {0, 1}
  with pytest.raises(decoding.UserError, match="top_p"):
    generate.Sampling(top_p=0.0)


def test_timestamps_round_trip_the_training_format():
  segs = [Segment(0.0, 1.25, "Hello there."), Segment(1.25, 3.5, "How are you?"),
          Segment(62.04, 63.5, "Fine.")]
  text = templates.format_timestamps(segs)
  assert text == "[0.00]Hello there.[1.25][1.25]How are you?[3.50][62.04]Fine.[63.50]"
  assert templates.parse_timestamps(text) == segs
  words = [Segment(0.5, 0.9, "hi"), Segment(1.0, 1.4, "you")]
  assert templates.parse_timestamps(templates.format_timestamps(words, "word")) == words
  # A window starting at 30 s shifts its segments.
  assert generate.offset_segments("[0.50]a[1.00]", 30.0) == [Segment(30.5, 31.0, "a")]
  assert generate.to_srt(segs[:1] + segs[2:]) == (
      "1\n00:00:00,000 --> 00:00:01,250\nHello there.\n\n"
      "2\n00:01:02,040 --> 00:01:03,500\nFine.\n\n")


def test_windows_cover_the_recording():
  assert generate.windows_of(10.0, 30.0) == [(0.0, 10.0)]
  spans = generate.windows_of(70.0, 30.0)
  assert len(spans) == 3 and spans[0] == (0.0, pytest.approx(70 / 3))
  assert sum(l for _, l in spans) == pytest.approx(70.0) and max(l for _, l in spans) <= 30.0


@pytest.mark.slow
def test_reference_generate_matches_a_greedy_loop_over_the_pytorch_reference(tmp_path):
  """A reference-format directory written by the PyTorch reference: 20 greedy tokens after
  prompts with two audios and time markers, through hf.reference_generate, equal a greedy loop
  that reruns the PyTorch model on the growing sequence."""
  torch = pytest.importorskip("torch")
  import torch_reference as tr
  from moss_jax import hf
  audio_id, bos, eos_audio, digits = 7, 8, 9, list(range(15, 25))
  path = str(tmp_path / "ref")
  ref = tr.random_reference_dir(path, audio_id, bos, eos_audio)
  model, params = hf.load_pretrained(path)

  def span(frames):  # bos, placeholders with a marker after every 25 (spec 5.3), eos
    n, ids, done = -(-frames // 8), [bos], 0
    for sec in range(2, int(n / 12.5) + 1, 2):
      ids += [audio_id] * ((sec // 2) * 25 - done) + [digits[int(c)] for c in str(sec)]
      done = (sec // 2) * 25
    return ids + [audio_id] * (n - done) + [eos_audio]

  rng = np.random.default_rng(0)
  frames = [[968, 300], [500, 131]]  # two rows, two audios each
  rows = [rng.integers(30, 300, 6).tolist() + span(a) + [10] + span(b) + [11, 12, 13]
          for a, b in frames]
  width = max(len(r) for r in rows)
  ids = np.array([r + rng.integers(30, 300, width - len(r)).tolist() for r in rows], np.int64)
  assert digits[2] in ids[0] and digits[2] in ids[1]
  lengths = np.array([f for fr in frames for f in fr])
  mel = np.zeros((4, 128, lengths.max()), np.float32)
  for a, n in enumerate(lengths):
    mel[a, :, :n] = np.clip(rng.normal(0.0, 0.5, (128, n)), -1.5, 1.5)

  got = hf.reference_generate(model, params, ids, mel, lengths, max_new_tokens=20,
                              pretrained_dir=path)
  want = torch.from_numpy(ids)
  with torch.no_grad():
    for _ in range(20):
      logits = ref(want, torch.from_numpy(mel), torch.from_numpy(lengths))[:, -1]
      want = torch.cat([want, logits.argmax(-1, keepdim=True)], dim=1)
  want = want[:, ids.shape[1]:].numpy()
  eos, pad = 2, 1  # the tiny config's eos / bos (pad) ids
  for r in range(2):
    stop = np.flatnonzero(want[r] == eos)
    n = stop[0] + 1 if len(stop) else 20
    assert got[r, :n].tolist() == want[r, :n].tolist()
    assert (got[r, n:] == pad).all()
  assert got.shape[1] == max(min(20, (np.flatnonzero(w == eos)[:1] + 1).tolist()[0]
                                 if (w == eos).any() else 20) for w in want)
  assert len(set(got.ravel().tolist())) > 3  # the streams are not one repeated token


# ----------------------------------------------------------------------------- command line

CORPUS = os.path.join(REPO, "data_pipelines", "sample_corpus")


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
  """A tiny run trained for 1 step on the sample corpus by `python -m moss_jax.train`."""
  tmp = tmp_path_factory.mktemp("run")
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  cfg = write_run_config(tmp, train__steps=1, train__checkpoint_every=1, optim__warmup_steps=0)
  workdir = str(tmp / "workdir")
  env = train_env(cache)
  proc = subprocess.run(train_command(cfg, workdir), env=env, capture_output=True, text=True,
                        timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, env


def _cli(module, env, *args, timeout=900):
  return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True,
                        text=True, timeout=timeout)


@pytest.mark.slow
def test_generate_cli_ties_every_result_to_its_file(trained_run, tmp_path):
  """good / missing / empty / NaN / too long / corrupt / good: each good file's result beside
  its own path (the same text as in another order), one error line per bad file, exit 1."""
  import soundfile
  workdir, env = trained_run
  good1 = os.path.join(CORPUS, "audio", "eval_speech_000.flac")
  good2 = os.path.join(CORPUS, "audio", "eval_speech_003.ogg")
  empty = tmp_path / "empty.wav"
  empty.write_bytes(b"")
  nan = str(tmp_path / "nan.wav")
  wave = np.zeros(16000, np.float32)
  wave[8000] = np.nan
  soundfile.write(nan, wave, 16000, subtype="FLOAT")
  missing = str(tmp_path / "missing.flac")
  long = str(tmp_path / "long.wav")  # over --max_audio_seconds: refused from its header
  soundfile.write(long, np.zeros(16000 * 5, np.float32), 16000)
  corrupt = tmp_path / "corrupt.flac"
  corrupt.write_bytes(b"fLaC" + bytes(range(256)) * 4)
  common = [f"--checkpoint={workdir}", "--max_new_tokens=6", "--output=json",
            "--window_seconds=2", "--batch_size=3", "--max_audio_seconds=4"]
  proc = _cli("moss_jax.generate", env, *common, f"--audio={good1}", f"--audio={missing}",
              f"--audio={empty}", f"--audio={nan}", f"--audio={long}", f"--audio={corrupt}",
              f"--audio={good2}")
  assert proc.returncode == 1, proc.stderr[-3000:]
  lines = [json.loads(x) for x in proc.stdout.splitlines()]
  assert [x["audio"] for x in lines] == [good1, missing, str(empty), nan, long, str(corrupt),
                                         good2]
  assert "error" not in lines[0] and "error" not in lines[6]
  assert "missing_file" in lines[1]["error"] and "empty_file" in lines[2]["error"]
  assert "non_finite_audio" in lines[3]["error"] and "too_long" in lines[4]["error"]
  assert "corrupt_audio" in lines[5]["error"]
  errors = [x for x in proc.stderr.splitlines() if x.startswith("error: ")]
  assert len(errors) == 6 and errors[-1] == "error: 5 of 7 files failed"
  assert all(f": {x['audio']}: " in e for e, x in zip(errors, lines[1:6]))
  assert "Traceback" not in proc.stderr
  # The good files alone, in the other order, give the same results.
  again = _cli("moss_jax.generate", env, *common, f"--audio={good2}", f"--audio={good1}")
  assert again.returncode == 0, again.stderr[-3000:]
  by_file = {x["audio"]: x for x in map(json.loads, again.stdout.splitlines())}
  assert by_file[good1] == lines[0] and by_file[good2] == lines[6]
  # 2 s windows: a ~3 s file becomes several windows, each a segment with its own times.
  segs = lines[0]["segments"]
  assert segs == sorted(segs, key=lambda s: s["start"]) and all(s["end"] > s["start"]
                                                               for s in segs)
  # SRT of the same file: one cue per non-empty window.
  srt = _cli("moss_jax.generate", env, *common[:2], "--output=srt", "--window_seconds=2",
             "--batch_size=3",
             f"--audio={good1}")
  assert srt.returncode == 0, srt.stderr[-3000:]
  assert srt.stdout.startswith(f"==> {good1} <==\n")
  cues = [c for c in srt.stdout.split("\n\n") if " --> " in c]
  assert len(cues) == len(segs)
  if segs:
    first = cues[0].split("\n")
    assert first[-1] == segs[0]["text"] and first[-2].startswith("00:00:00,000 --> 00:00:0")


@pytest.mark.slow
def test_generate_cli_errors_are_one_line(trained_run, tmp_path):
  workdir, env = trained_run
  proc = _cli("moss_jax.generate", env, f"--checkpoint={tmp_path}", "--audio=x.flac")
  assert proc.returncode == 2 and proc.stderr.strip().splitlines()[-1].startswith("error: ")
  assert "Traceback" not in proc.stderr
  proc = _cli("moss_jax.generate", env, f"--checkpoint={workdir}", "--audio=x.flac",
              "--task=qa")
  assert proc.returncode == 2 and "--task qa needs --prompt" in proc.stderr


@pytest.mark.slow
def test_evaluate_cli_writes_report_and_hypotheses(trained_run, tmp_path):
  workdir, env = trained_run
  manifest = tmp_path / "eval.jsonl"
  lines = open(os.path.join(CORPUS, "eval.jsonl"), encoding="utf-8").read().splitlines()[:3]
  lines = [json.loads(x) for x in lines]
  for x in lines:
    x["audio"] = os.path.join(CORPUS, x["audio"])
  lines.insert(1, {"id": "gone", "audio": str(tmp_path / "gone.flac"), "task": "asr", "text": "x"})
  manifest.write_text("".join(json.dumps(x) + "\n" for x in lines))
  out = tmp_path / "report.json"
  proc = _cli("moss_jax.evaluate", env, f"--checkpoint={workdir}", f"--manifest={manifest}",
              f"--output={out}", "--max_new_tokens=6", "--batch_size=2")
  assert proc.returncode == 1, proc.stderr[-3000:]  # one record's audio is missing
  report = json.loads(out.read_text())
  assert report["num_records"] == 4 and report["errors"] == 1
  assert report["tasks"]["asr"]["samples"] == 2 and report["tasks"]["asr"]["wer"] >= 0
  assert report["tasks"]["asr_timestamps"]["samples"] == 1
  assert "aas_ms" in report["tasks"]["asr_timestamps"]
  hyps = [json.loads(x) for x in (tmp_path / "report.hypotheses.jsonl").read_text().splitlines()]
  assert [h["source"].rsplit(":", 1)[1] for h in hyps] == ["1", "2", "3", "4"]
  assert "missing_file" in hyps[1]["error"] and all("hypothesis" in h for h in hyps[:1] + hyps[2:])
  assert hyps[0]["reference"] == "My quiet ship runs fast."
  assert sum(x.startswith("error: ") for x in proc.stderr.splitlines()) == 1

"""Prompt templates: exact token layouts (spec 5.2/5.3), label masks, timestamp targets, chat formats.

Expected sequences are built here from the spec's rules, independently of templates.py: a
stand-in tokenizer.json gives the words of the reference prompt their real Qwen3 ids, so the
literal id lists of spec 5.2 can be compared.
"""

import json
import math

import numpy as np
import pytest
from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from data_pipelines import manifest, templates, tokenizers

QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
              r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
WORDS = {"system": 8948, "\n": 198, "You": 2610, " are": 525, " a": 264, " helpful": 10950,
         " assistant": 17847, ".": 13, "user": 872, "assistant": 77091, "Transcribe": 3,
         " the": 279, " audio": 7699, "Hello": 9707, " world": 1879, "[": 58, "]": 60,
         "What": 3838, "?": 30, "Fine": 63716, "ok": 562}
WORDS.update({str(d): 15 + d for d in range(10)})

# Spec 5.2, the finetune script's literal ids.
SYSTEM_IDS = [151644, 8948, 198, 2610, 525, 264, 10950, 17847, 13, 151645, 198]
USER_HEADER = [151644, 872, 198, 151669]
AFTER_AUDIO = [151670, 198]
ASSISTANT_HEADER = [151645, 198, 151644, 77091, 198]
A, IM_END, IM_START, PAD = 151654, 151645, 151644, 151643


@pytest.fixture(scope="module")
def qwen_like(tmp_path_factory):
  """A tokenizer.json with Qwen3's pre-tokenizer, specials and ids for the words used here."""
  inverse = {v: k for k, v in WORDS.items()}
  vocab = {inverse.get(i, f"<unused{i}>"): i for i in range(151643)}
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unused0>"))
  tok.pre_tokenizer = pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated")
  tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
  path = tmp_path_factory.mktemp("qwen_like") / "tokenizer.json"
  tok.save(str(path))
  return tokenizers.load_tokenizer({"kind": "hf", "path": str(path)})


def wave(seconds: float) -> np.ndarray:
  n = int(round(seconds * 16000))
  return (0.1 * np.sin(2 * np.pi * 440 * np.arange(n) / 16000)).astype(np.float32)


def spec_audio_tokens(num_samples: int) -> int:
  return math.ceil((num_samples // 160) / 8)


def spec_audio_span(num_samples: int, markers: bool = True) -> list[int]:
  """Spec 5.3 literally: for s = 2, 4, ... <= int(N / 12.5), audio up to (s/2)*25, digits of s."""
  n = spec_audio_tokens(num_samples)
  out, done = [], 0
  if markers:
    for s in range(2, int(n / 12.5) + 1, 2):
      upto = int(s / 2 * 25)
      out += [A] * (upto - done) + [15 + int(c) for c in str(s)]
      done = upto
  return out + [A] * (n - done)


def asr_sample(text="Hello world.", task="asr", **kw) -> manifest.Sample:
  return manifest.Sample(id="x", task=task, audios=(manifest.AudioRef("/a.wav"),), text=text,
                         source="m.jsonl:1", **kw)


def test_special_ids_default_to_the_reference(qwen_like):
  assert (qwen_like.audio_token_id, qwen_like.audio_bos_id, qwen_like.audio_eos_id) == (
      151654, 151669, 151670)
  assert (qwen_like.im_start_id, qwen_like.im_end_id, qwen_like.pad_id) == (151644, 151645, 151643)
  assert qwen_like.digit_ids == tuple(range(15, 25))


@pytest.mark.parametrize("seconds", [1.9, 2.0, 10.0, 61.0])
def test_asr_layout_with_time_markers(qwen_like, seconds):
  w = wave(seconds)
  enc = templates.encode_sample(asr_sample(), [w], qwen_like)
  answer = [9707, 1879, 13]
  expected = (SYSTEM_IDS + USER_HEADER + spec_audio_span(len(w)) + AFTER_AUDIO + [3, 279, 7699, 13]
              + ASSISTANT_HEADER + answer + [IM_END])
  assert enc.tokens.tolist() == expected
  n_label = len(answer) + 1
  assert enc.labels.tolist() == [-100] * (len(expected) - n_label) + answer + [IM_END]
  # Placeholders read encoder tokens 0..n-1 in order; everything else reads nothing.
  n = spec_audio_tokens(len(w))
  assert (enc.tokens == A).sum() == n
  assert enc.audio_index[enc.tokens == A].tolist() == list(range(n))
  assert (enc.audio_index[enc.tokens != A] == -1).all()
  frames = len(w) // 160
  assert enc.chunk_frames.tolist() == [400] * (frames // 400) + ([frames % 400] if frames % 400
                                                                  else [])
  assert enc.chunk_audio.tolist() == [0] * enc.num_chunks


def test_ten_seconds_matches_the_spec_example(qwen_like):
  enc = templates.encode_sample(asr_sample(), [wave(10.0)], qwen_like)
  start = enc.tokens.tolist().index(151669) + 1
  stop = enc.tokens.tolist().index(151670)
  two, four, six, eight, one, zero = 17, 19, 21, 23, 16, 15
  expected = ([A] * 25 + [two] + [A] * 25 + [four] + [A] * 25 + [six] + [A] * 25 + [eight]
              + [A] * 25 + [one, zero])
  assert enc.tokens[start:stop].tolist() == expected
  assert stop - start == 131


@pytest.mark.parametrize("seconds,count", [(1.9, 24), (2.0, 25), (10.0, 125), (61.0, 763)])
def test_placeholder_count_and_no_markers_when_off(qwen_like, seconds, count):
  enc = templates.encode_sample(asr_sample(), [wave(seconds)], qwen_like, time_markers=False)
  start = enc.tokens.tolist().index(151669) + 1
  stop = enc.tokens.tolist().index(151670)
  assert enc.tokens[start:stop].tolist() == [A] * count


def test_sixty_one_seconds_markers(qwen_like):
  enc = templates.encode_sample(asr_sample(), [wave(61.0)], qwen_like)
  span = enc.tokens[enc.tokens.tolist().index(151669) + 1:enc.tokens.tolist().index(151670)]
  digits = [int(t) - 15 for t in span if t != A]
  markers = "".join(str(d) for d in digits)
  assert markers == "".join(str(s) for s in range(2, 61, 2))  # 30 markers, then 13 tokens
  assert span[-13:].tolist() == [A] * 13 and span[-14] != A


def test_timestamp_targets():
  segs = (manifest.Segment(0.0, 1.234, "Hello world."), manifest.Segment(1.5, 61.004, " Fine "))
  assert templates.format_timestamps(segs) == "[0.00]Hello world.[1.23][1.50]Fine[61.00]"
  words = (manifest.Segment(0.1, 0.456, "Hello"), manifest.Segment(0.5, 0.9, "world"))
  assert templates.format_timestamps(words, "word") == "[0.10]Hello[0.46] [0.50]world[0.90]"
  parsed = templates.parse_timestamps("[0.00]Hello world.[1.23][1.50]Fine[61.00]")
  assert [(s.start, s.end, s.text) for s in parsed] == [(0.0, 1.23, "Hello world."),
                                                        (1.5, 61.0, "Fine")]


def test_timestamp_asr_sample_targets_the_formatted_segments(qwen_like):
  segs = (manifest.Segment(0.0, 1.0, "Hello"), manifest.Segment(1.0, 1.5, "world"))
  sample = asr_sample(text="", task="asr_timestamps", segments=segs)
  enc = templates.encode_sample(sample, [wave(2.0)], qwen_like)
  answer = qwen_like.encode("[0.00]Hello[1.00][1.00]world[1.50]")
  assert enc.tokens[-len(answer) - 1:].tolist() == answer + [IM_END]
  assert enc.labels[-len(answer) - 1:].tolist() == answer + [IM_END]
  assert (enc.labels[:-len(answer) - 1] == -100).all()
  sentence_q = templates.question_for(sample)
  word_q = templates.question_for(asr_sample(task="asr_timestamps", segments=segs,
                                             timestamp_level="word"))
  assert "sentence-level" in sentence_q and "word-level" in word_q
  assert enc.tokens.tolist()[:len(SYSTEM_IDS)] == SYSTEM_IDS


def _parse(tmp_path, record) -> manifest.Sample:
  return manifest.parse_line(json.dumps(record), str(tmp_path / "m.jsonl"), 1)


def test_messages_and_conversation_formats_give_the_reference_layout(qwen_like, tmp_path):
  w = [wave(3.0)]
  native = templates.encode_sample(asr_sample(), w, qwen_like)
  messages = _parse(tmp_path, {"messages": [
      {"role": "user", "content": "<audio>\nTranscribe the audio."},
      {"role": "assistant", "content": "Hello world."}], "audios": ["a.wav"], "task": "asr"})
  conversation = _parse(tmp_path, {"conversation": [
      {"role": "user", "message_type": "audio", "content": "a.wav"},
      {"role": "user", "message_type": "text", "content": "Transcribe the audio."},
      {"role": "assistant", "message_type": "text", "content": "Hello world."}], "task": "asr"})
  for sample in (messages, conversation):
    enc = templates.encode_sample(sample, w, qwen_like)
    for field in ("tokens", "labels", "audio_index", "chunk_frames", "chunk_audio"):
      np.testing.assert_array_equal(getattr(enc, field), getattr(native, field), err_msg=field)


def test_multi_turn_chat_learns_every_assistant_turn(qwen_like, tmp_path):
  sample = _parse(tmp_path, {"messages": [
      {"role": "system", "content": "ok"},
      {"role": "user", "content": "<audio>What?"},
      {"role": "assistant", "content": "Fine."},
      {"role": "user", "content": "What?"},
      {"role": "assistant", "content": "ok"}], "audios": ["a.wav"]})
  enc = templates.encode_sample(sample, [wave(1.0)], qwen_like)
  n = spec_audio_tokens(16000)
  expected = ([IM_START, 8948, 198, 562, IM_END, 198]
              + [IM_START, 872, 198, 151669] + [A] * n + [151670, 3838, 30, IM_END, 198]
              + [IM_START, 77091, 198, 63716, 13, IM_END, 198]
              + [IM_START, 872, 198, 3838, 30, IM_END, 198]
              + [IM_START, 77091, 198, 562, IM_END])
  assert enc.tokens.tolist() == expected
  learned = [int(t) for t, l in zip(enc.tokens, enc.labels) if l != -100]
  assert learned == [63716, 13, IM_END, 562, IM_END]
  assert sample.task == "qa" and sample.text == "ok"


def test_prompt_stops_after_the_assistant_header(qwen_like):
  w = [wave(2.5)]
  full = templates.encode_sample(asr_sample(), w, qwen_like)
  prompt = templates.encode_prompt(asr_sample(), w, qwen_like)
  assert prompt.tokens.tolist()[-3:] == [IM_START, 77091, 198]
  np.testing.assert_array_equal(prompt.tokens, full.tokens[:prompt.num_tokens])
  np.testing.assert_array_equal(prompt.audio_index, full.audio_index[:prompt.num_tokens])
  assert (prompt.labels == -100).all()
  assert full.num_tokens - prompt.num_tokens == len([9707, 1879, 13]) + 1


def test_two_audios_take_consecutive_chunks(qwen_like):
  sample = manifest.Sample(id="x", task="caption", text="ok", source="m:1",
                           audios=(manifest.AudioRef("/a.wav"), manifest.AudioRef("/b.wav")))
  w = [wave(5.0), wave(1.0)]  # 500 frames -> chunks [400, 100]; 100 frames -> [100]
  enc = templates.encode_sample(sample, w, qwen_like, time_markers=False)
  assert enc.chunk_frames.tolist() == [400, 100, 100]
  assert enc.chunk_audio.tolist() == [0, 0, 1]
  idx = enc.audio_index[enc.audio_index >= 0].tolist()
  assert idx == list(range(63)) + [100 + t for t in range(13)]  # audio 2 starts at chunk 2
  bos = [i for i, t in enumerate(enc.tokens) if t == 151669]
  assert len(bos) == 2 and enc.tokens[bos[1] - 2:bos[1]].tolist() == [151670, 198]


def test_text_task(qwen_like):
  doc = manifest.Sample(id="d", task="text", audios=(), text="Hello world.", source="m:1")
  enc = templates.encode_sample(doc, [], qwen_like)
  assert enc.tokens.tolist() == [9707, 1879, 13, PAD]
  assert enc.labels.tolist() == [-100, 1879, 13, PAD]
  assert enc.num_chunks == 0 and (enc.audio_index == -1).all()
  chat = manifest.Sample(id="d", task="text", audios=(), text="ok", question="What?", source="m:1")
  enc = templates.encode_sample(chat, [], qwen_like)
  assert enc.tokens.tolist() == (SYSTEM_IDS + [IM_START, 872, 198, 3838, 30]
                                 + ASSISTANT_HEADER + [562, IM_END])


def test_default_questions_are_fixed():
  assert templates.question_for(asr_sample()) == "Transcribe the audio."
  assert templates.question_for(asr_sample(task="caption")) == templates.DEFAULT_QUESTIONS["caption"]
  assert templates.question_for(asr_sample(task="qa", question="What?")) == "What?"
  with pytest.raises(ValueError):
    templates.question_for(asr_sample(task="qa"))

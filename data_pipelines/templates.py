"""Prompt templates: a Sample plus its decoded audio -> token ids, loss labels and audio placement.

The layout reproduces the reference (spec 5.2), one chat turn at a time:

  <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
  <|im_start|>user\\n<|audio_bos|> A...A <|audio_eos|>\\n{question}<|im_end|>\\n
  <|im_start|>assistant\\n{answer}<|im_end|>

where A...A are `num_audio_tokens(num_mel_frames(samples))` placeholders, with the digits of the
elapsed seconds after every 25 of them when time markers are on (spec 5.3). Labels are -100
except the answer and its <|im_end|> (every assistant turn in chat formats). Text pieces are
encoded separately (role, "\\n", content), which for Qwen's BPE equals encoding the joined
string because its pre-tokenizer splits at newlines.

Tokens of audio `a` of a sample point at encoder outputs through a sample-local flat index
`(first_chunk(a) + t // 50) * 50 + t % 50 = first_chunk(a) * 50 + t`; packing shifts it by the
row's chunk slot offset.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Iterator, Sequence

import numpy as np

from data_pipelines.manifest import Message, Sample, Segment
from moss_jax import batch as batch_lib

SYSTEM_PROMPT = "You are a helpful assistant."
# Default user questions per task (deterministic: one fixed prompt each).
DEFAULT_QUESTIONS = {
    "asr": "Transcribe the audio.",
    "asr_timestamps": ("Transcribe the audio with sentence-level timestamps: "
                       "[start]sentence[end], times in seconds."),
    "asr_timestamps_word": ("Transcribe the audio with word-level timestamps: "
                            "[start]word[end], times in seconds."),
    "caption": "Describe the audio in detail.",
}
MARKER_EVERY = 25  # audio tokens per 2 s of audio (12.5 tokens/s)
IGNORE = batch_lib.IGNORE_INDEX
TASK_IDS = {t: i for i, t in enumerate(batch_lib.TASKS)}


@dataclasses.dataclass
class EncodedSample:
  """One sample as ids, ready to pack. Arrays are int32 unless noted.

  tokens/labels/audio_index: [n]; audio_index is -1 off audio, else the sample-local flat index
  chunk * 50 + t. chunk_frames/chunk_audio: [k] valid mel frames and 0-based audio number of
  each of the sample's 4 s chunks. features: float32 [k, 64240] waveform or [k, 128, 400] mel
  chunks, attached by the pipeline (None until then).
  """
  tokens: np.ndarray
  labels: np.ndarray
  audio_index: np.ndarray
  task_id: int
  chunk_frames: np.ndarray
  chunk_audio: np.ndarray
  features: np.ndarray | None = None
  source: str = ""

  @property
  def num_tokens(self) -> int:
    return int(self.tokens.shape[0])

  @property
  def num_chunks(self) -> int:
    return int(self.chunk_frames.shape[0])


def format_time(seconds: float) -> str:
  """Centisecond timestamp in the reference's ASR format: 3.456 -> '[3.46]'."""
  return f"[{seconds:.2f}]"


def format_timestamps(segments: Sequence[Segment], level: str = "sentence") -> str:
  """'[s]text[e]' per segment; sentences concatenate, words are separated by a space."""
  sep = " " if level == "word" else ""
  return sep.join(f"{format_time(s.start)}{s.text.strip()}{format_time(s.end)}" for s in segments)


_TIMESTAMP_RE = re.compile(r"\[(\d+(?:\.\d+)?)\](.*?)\[(\d+(?:\.\d+)?)\]", re.S)


def parse_timestamps(text: str) -> list[Segment]:
  """Inverse of `format_timestamps` for evaluation; ignores text outside the brackets."""
  return [Segment(float(a), float(b), t.strip()) for a, t, b in _TIMESTAMP_RE.findall(text)]


def question_for(sample: Sample) -> str:
  if sample.question:
    return sample.question
  if sample.task == "asr_timestamps" and sample.timestamp_level == "word":
    return DEFAULT_QUESTIONS["asr_timestamps_word"]
  if sample.task not in DEFAULT_QUESTIONS:
    raise ValueError(f"task {sample.task} needs a question ({sample.source})")
  return DEFAULT_QUESTIONS[sample.task]


def answer_for(sample: Sample) -> str:
  if sample.task == "asr_timestamps":
    return format_timestamps(sample.segments or (), sample.timestamp_level)
  return sample.text


class _Builder:
  """Accumulates ids with their labels and audio indices."""

  def __init__(self, tokenizer, audio_tokens: Sequence[int], first_chunks: Sequence[int],
               time_markers: bool):
    self.tok = tokenizer
    self.audio_tokens = audio_tokens
    self.first_chunks = first_chunks
    self.time_markers = time_markers
    self.tokens: list[int] = []
    self.labels: list[int] = []
    self.audio_index: list[int] = []

  def ids(self, ids: Sequence[int], learn: bool = False) -> None:
    self.tokens.extend(ids)
    self.labels.extend(ids if learn else [IGNORE] * len(ids))
    self.audio_index.extend([-1] * len(ids))

  def text(self, text: str, learn: bool = False) -> None:
    if text:
      self.ids(self.tok.encode(text), learn)

  def audio(self, number: int) -> None:
    """<|audio_bos|>, the placeholders (with time-marker digits), <|audio_eos|>."""
    tok = self.tok
    self.ids([tok.audio_bos_id])
    base = self.first_chunks[number] * batch_lib.TOKENS_PER_CHUNK
    for t in range(self.audio_tokens[number]):
      self.tokens.append(tok.audio_token_id)
      self.labels.append(IGNORE)
      self.audio_index.append(base + t)
      if self.time_markers and (t + 1) % MARKER_EVERY == 0:
        self.ids(tok.digits(2 * (t + 1) // MARKER_EVERY))
    self.ids([tok.audio_eos_id])

  def header(self, role: str) -> None:
    self.ids([self.tok.im_start_id])
    self.text(role)
    self.text("\n")

  def turn(self, role: str, content: Sequence[str | int], learn: bool = False,
           last: bool = False) -> None:
    """A whole turn; for an assistant turn `learn` supervises the content and <|im_end|>."""
    self.header(role)
    for piece in content:
      if isinstance(piece, str):
        self.text(piece, learn)
      else:
        self.audio(piece)
    self.ids([self.tok.im_end_id], learn)
    if not last:
      self.text("\n")


def _native_user_content(sample: Sample) -> list[str | int]:
  content: list[str | int] = []
  for i in range(len(sample.audios)):
    content += [i, "\n"]
  return content + [question_for(sample)]


def _chat_messages(sample: Sample) -> list[Message]:
  """The sample as turns; a default system turn is added where the record has none."""
  if sample.messages is not None:
    msgs = list(sample.messages)
  else:
    msgs = [Message("user", tuple(_native_user_content(sample))),
            Message("assistant", (answer_for(sample),))]
  if not msgs or msgs[0].role != "system":
    msgs.insert(0, Message("system", (SYSTEM_PROMPT,)))
  return msgs


def _audio_layout(waveforms: Sequence[np.ndarray]):
  frames = [batch_lib.num_mel_frames(len(w)) for w in waveforms]
  tokens = [batch_lib.num_audio_tokens(f) for f in frames]
  chunk_frames, chunk_audio, first_chunks = [], [], []
  for i, f in enumerate(frames):
    first_chunks.append(len(chunk_frames))
    counts = batch_lib.chunk_frame_counts(f)
    chunk_frames += counts
    chunk_audio += [i] * len(counts)
  return tokens, first_chunks, chunk_frames, chunk_audio


def _finish(b: _Builder, sample: Sample, chunk_frames, chunk_audio) -> EncodedSample:
  labels = np.asarray(b.labels, np.int32)
  if labels.size:
    labels[0] = IGNORE  # nothing inside the sample predicts its first token
  return EncodedSample(
      tokens=np.asarray(b.tokens, np.int32), labels=labels,
      audio_index=np.asarray(b.audio_index, np.int32), task_id=TASK_IDS[sample.task],
      chunk_frames=np.asarray(chunk_frames, np.int32).reshape(-1),
      chunk_audio=np.asarray(chunk_audio, np.int32).reshape(-1), source=sample.source)


def _encode(sample: Sample, waveforms: Sequence[np.ndarray], tokenizer, time_markers: bool,
            prompt_only: bool) -> EncodedSample:
  if len(waveforms) != len(sample.audios):
    raise ValueError(f"{len(waveforms)} waveforms for {len(sample.audios)} audios "
                     f"({sample.source})")
  tokens, first_chunks, chunk_frames, chunk_audio = _audio_layout(waveforms)
  b = _Builder(tokenizer, tokens, first_chunks, time_markers)
  if sample.task == "text" and sample.messages is None and not sample.question:
    # A plain document: every token is a target, <|endoftext|> closes it.
    if not prompt_only:
      b.text(sample.text, learn=True)
      b.ids([tokenizer.pad_id], learn=True)
    return _finish(b, sample, chunk_frames, chunk_audio)
  if sample.task == "text" and sample.messages is None:
    msgs = [Message("system", (SYSTEM_PROMPT,)), Message("user", (sample.question,)),
            Message("assistant", (sample.text,))]
  else:
    msgs = _chat_messages(sample)
  if prompt_only:
    last_assistant = max(i for i, m in enumerate(msgs) if m.role == "assistant")
    for m in msgs[:last_assistant]:
      b.turn(m.role, m.content)
    b.header("assistant")
  else:
    for i, m in enumerate(msgs):
      b.turn(m.role, m.content, learn=m.role == "assistant", last=i == len(msgs) - 1)
  return _finish(b, sample, chunk_frames, chunk_audio)


def encode_sample(sample: Sample, waveforms: Sequence[np.ndarray], tokenizer,
                  time_markers: bool = True) -> EncodedSample:
  """The full training sequence of a sample (prompt, answer, labels)."""
  return _encode(sample, waveforms, tokenizer, time_markers, prompt_only=False)


def encode_prompt(sample: Sample, waveforms: Sequence[np.ndarray], tokenizer,
                  time_markers: bool = True) -> EncodedSample:
  """The sequence up to and including the last assistant header, for generation (no labels)."""
  return _encode(sample, waveforms, tokenizer, time_markers, prompt_only=True)


def fixed_texts() -> Iterator[str]:
  """Template strings a tokenizer should learn (roles, system prompt, default questions)."""
  yield from ("system", "user", "assistant", SYSTEM_PROMPT)
  yield from DEFAULT_QUESTIONS.values()


def sample_texts(sample: Sample) -> Iterator[str]:
  """All text of a sample that its encoding can contain (for tokenizer training)."""
  if sample.messages is not None:
    for m in sample.messages:
      yield from (p for p in m.content if isinstance(p, str) and p.strip())
    return
  if sample.text:
    yield sample.text
  if sample.question:
    yield sample.question
  if sample.segments:
    yield format_timestamps(sample.segments, sample.timestamp_level)

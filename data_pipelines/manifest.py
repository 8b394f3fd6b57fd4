"""JSON Lines manifests: one training sample per line, in three formats users already have.

1. Native:   {"id", "audio" (path or list), "task", "text", "segments"?, "offset"?, "duration"?,
              "question"?, "timestamp_level"?}
2. Messages: {"messages": [{"role", "content"}...], "audios": [...]} with one `<audio>` tag in the
             content per entry of "audios" (the common fine-tuning format). An assistant message
             may carry "reasoning_content" (rendered `<think>\n...\n</think>\n\n` before its
             content, as Qwen3's chat template does) and "loss": false (context, not learned).
3. Conversation (the reference finetune script's format):
             {"conversation": [{"role", "message_type": "audio"|"text", "content"}...]}

Every format parses into one `Sample`. Parsing never touches audio files; `load_audios` does,
so a reader can index a manifest of millions of lines cheaply and decode in workers.
A bad line raises `BadRecordError` with a reason, so pipelines skip and count it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import threading
from typing import Any, Iterator, Sequence

import numpy as np

from data_pipelines import audio, errors
from data_pipelines.errors import BadRecordError
from moss_jax import batch as batch_lib

TASKS = batch_lib.TASKS
ROLES = ("system", "user", "assistant")
AUDIO_TAG = "<audio>"
TIMESTAMP_LEVELS = ("sentence", "word")
# A clip needs at least one encoder token's worth of mel frames (8 frames = 80 ms).
MIN_AUDIO_SAMPLES = batch_lib.DOWNSAMPLE * batch_lib.HOP_LENGTH
# Segments may end this far past the decoded audio (aligners round; decoders drop a frame).
SEGMENT_SLACK_S = 0.05


@dataclasses.dataclass(frozen=True)
class AudioRef:
  """One audio file (absolute path) and the span of it the sample uses."""
  path: str
  offset: float = 0.0
  duration: float | None = None


@dataclasses.dataclass(frozen=True)
class Segment:
  """A timed piece of the transcript, seconds from the start of the (offset) clip."""
  start: float
  end: float
  text: str


@dataclasses.dataclass(frozen=True)
class Message:
  """One chat turn. `content` mixes text pieces (str) and audio numbers (int, into Sample.audios).

  `learn`: whether the turn is a training target (None: assistant turns are, others are not).
  """
  role: str
  content: tuple[str | int, ...]
  learn: bool | None = None


@dataclasses.dataclass(frozen=True)
class Sample:
  """A parsed manifest record; `messages` is set for the two chat formats, else None."""
  id: str
  task: str
  audios: tuple[AudioRef, ...]
  text: str
  question: str | None = None
  segments: tuple[Segment, ...] | None = None
  messages: tuple[Message, ...] | None = None
  source: str = ""
  timestamp_level: str = "sentence"


def _bad(reason: str, detail: str, source: str, path: str | None = None) -> BadRecordError:
  return BadRecordError(reason, detail, record=source, path=path)


def _check_utf8(value: str, field: str, source: str) -> str:
  # json.loads accepts escaped lone surrogates ("\ud800"), which no tokenizer can encode.
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise _bad(errors.BAD_ENCODING, f"field {field!r} is not valid Unicode: {e}", source) from None
  return value


def _get_str(obj: dict, field: str, source: str, *, required: bool,
             default: str | None = None) -> str | None:
  if field not in obj or obj[field] is None:
    if required:
      raise _bad(errors.MISSING_FIELD, f"missing field {field!r}", source)
    return default
  value = obj[field]
  if not isinstance(value, str):
    raise _bad(errors.BAD_FIELD, f"field {field!r} must be a string, got {type(value).__name__}",
               source)
  return _check_utf8(value, field, source)


def _get_seconds(obj: dict, field: str, source: str, *, positive: bool = False) -> float | None:
  if obj.get(field) is None:
    return None
  value = obj[field]
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
    raise _bad(errors.BAD_FIELD, f"field {field!r} must be a finite number, got {value!r}", source)
  if value < 0 or (positive and value == 0):
    raise _bad(errors.BAD_FIELD, f"field {field!r} must be {'> 0' if positive else '>= 0'}, "
               f"got {value}", source)
  return float(value)


def _resolve(path: Any, manifest_dir: str, source: str) -> str:
  if not isinstance(path, str) or not path:
    raise _bad(errors.BAD_FIELD, f"audio path must be a non-empty string, got {path!r}", source)
  _check_utf8(path, "audio", source)
  return path if os.path.isabs(path) else os.path.normpath(os.path.join(manifest_dir, path))


def _audio_ref(entry: Any, manifest_dir: str, source: str, offset: float | None,
               duration: float | None) -> AudioRef:
  """A path string, or {"path", "offset"?, "duration"?}; top-level offset/duration are defaults."""
  if isinstance(entry, dict):
    if "path" not in entry:
      raise _bad(errors.MISSING_FIELD, "audio entry lacks 'path'", source)
    path = _resolve(entry["path"], manifest_dir, source)
    own_offset = _get_seconds(entry, "offset", source)
    own_duration = _get_seconds(entry, "duration", source, positive=True)
    offset = own_offset if own_offset is not None else offset
    duration = own_duration if own_duration is not None else duration
  else:
    path = _resolve(entry, manifest_dir, source)
  return AudioRef(path=path, offset=offset or 0.0, duration=duration)


def _audio_list(value: Any, manifest_dir: str, source: str, obj: dict) -> tuple[AudioRef, ...]:
  offset = _get_seconds(obj, "offset", source)
  duration = _get_seconds(obj, "duration", source, positive=True)
  entries = value if isinstance(value, list) else [value]
  return tuple(_audio_ref(e, manifest_dir, source, offset, duration) for e in entries)


def parse_segments(value: Any, source: str) -> tuple[Segment, ...]:
  """Validates a segments list: numbers, start <= end, starts and ends non-decreasing."""
  if not isinstance(value, list):
    raise _bad(errors.BAD_FIELD, "field 'segments' must be a list", source)
  segments = []
  for i, seg in enumerate(value):
    if not isinstance(seg, dict):
      raise _bad(errors.BAD_FIELD, f"segment {i} must be an object", source)
    for key in ("start", "end", "text"):
      if key not in seg:
        raise _bad(errors.MISSING_FIELD, f"segment {i} lacks {key!r}", source)
    start = _get_seconds(seg, "start", source)
    end = _get_seconds(seg, "end", source)
    text = _get_str(seg, "text", source, required=True)
    if end < start:
      raise _bad(errors.BAD_TIMESTAMPS, f"segment {i} ends before it starts ({start} > {end})",
                 source)
    if segments and (start < segments[-1].start or end < segments[-1].end):
      raise _bad(errors.BAD_TIMESTAMPS, f"segment {i} [{start}, {end}] is out of order after "
                 f"[{segments[-1].start}, {segments[-1].end}]", source)
    segments.append(Segment(start, end, text))
  return tuple(segments)


def _parse_native(obj: dict, manifest_dir: str, source: str) -> Sample:
  task = _get_str(obj, "task", source, required=True)
  if task not in TASKS:
    raise _bad(errors.BAD_FIELD, f"unknown task {task!r}; expected one of {TASKS}", source)
  if task != "text" and obj.get("audio") in (None, [], ""):
    raise _bad(errors.MISSING_FIELD, f"missing field 'audio' (task {task})", source)
  audios = () if obj.get("audio") in (None, []) else _audio_list(obj["audio"], manifest_dir,
                                                                 source, obj)
  segments = None
  if obj.get("segments") is not None:
    segments = parse_segments(obj["segments"], source)
  if task == "asr_timestamps" and not segments:
    raise _bad(errors.MISSING_FIELD, "task asr_timestamps needs a non-empty 'segments' list",
               source)
  text = _get_str(obj, "text", source, required=task != "asr_timestamps", default="")
  if task != "asr_timestamps" and not text.strip():
    # The answer is the whole target: an empty one trains the model to stop at once.
    raise _bad(errors.BAD_FIELD, "field 'text' is empty: there is no answer to learn", source)
  question = _get_str(obj, "question", source, required=task == "qa")
  level = _get_str(obj, "timestamp_level", source, required=False, default="sentence")
  if level not in TIMESTAMP_LEVELS:
    raise _bad(errors.BAD_FIELD, f"timestamp_level must be one of {TIMESTAMP_LEVELS}", source)
  return Sample(id=_record_id(obj, source), task=task, audios=audios, text=text,
                question=question, segments=segments, source=source, timestamp_level=level)


def _record_id(obj: dict, source: str) -> str:
  value = obj.get("id")
  if value is None:
    return source
  if isinstance(value, bool) or not isinstance(value, (str, int)):
    raise _bad(errors.BAD_FIELD, f"field 'id' must be a string, got {value!r}", source)
  return _check_utf8(str(value), "id", source)


def _split_tags(text: str, first_audio: int) -> list[str | int]:
  """'a<audio>b' -> ['a', first_audio, 'b'] (empty text pieces dropped)."""
  pieces: list[str | int] = []
  for i, part in enumerate(text.split(AUDIO_TAG)):
    if i:
      pieces.append(first_audio + i - 1)
    if part:
      pieces.append(part)
  return pieces


def _message_content(content: Any, audios: list, manifest_dir: str, source: str,
                     obj: dict) -> list[str | int]:
  """A string with <audio> tags (numbered in order), or a list of {"type": "text"|"audio"} parts."""
  if isinstance(content, str):
    _check_utf8(content, "content", source)
    pieces = _split_tags(content, len(audios))
    audios.extend([None] * content.count(AUDIO_TAG))  # filled from the "audios" list later
    return pieces
  if not isinstance(content, list):
    raise _bad(errors.BAD_FIELD, "message content must be a string or a list of parts", source)
  pieces = []
  for part in content:
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
      pieces.extend(_split_tags(_get_str(part, "text", source, required=True), len(audios)))
    elif kind == "audio":
      path = part.get("audio", part.get("path"))
      pieces.append(len(audios))
      audios.append(_audio_ref(path, manifest_dir, source, _get_seconds(obj, "offset", source),
                               _get_seconds(obj, "duration", source, positive=True)))
    else:
      raise _bad(errors.BAD_FIELD, f"unknown message part {part!r}", source)
  return pieces


def _finish_chat(obj: dict, messages: list[Message], audios: tuple[AudioRef, ...],
                 source: str) -> Sample:
  if not any(m.role == "assistant" and m.learn is not False for m in messages):
    raise _bad(errors.MISSING_FIELD, "the conversation has no assistant turn to learn", source)
  task = _get_str(obj, "task", source, required=False, default="qa" if audios else "text")
  if task not in TASKS:
    raise _bad(errors.BAD_FIELD, f"unknown task {task!r}; expected one of {TASKS}", source)
  text = "".join(p for p in [m for m in messages if m.role == "assistant"][-1].content
                 if isinstance(p, str))
  if not text.strip():
    raise _bad(errors.BAD_FIELD, "the last assistant turn is empty: there is no answer to learn",
               source)
  users = [m for m in messages if m.role == "user"]
  question = "".join(p for p in users[-1].content if isinstance(p, str)).strip() if users else None
  return Sample(id=_record_id(obj, source), task=task, audios=audios, text=text,
                question=question or None, messages=tuple(messages), source=source)


def think_block(reasoning: str) -> str:
  """Qwen3's rendering of an assistant turn's reasoning: kept as text before the answer."""
  return f"<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"


def _parse_messages(obj: dict, manifest_dir: str, source: str) -> Sample:
  raw = obj["messages"]
  if not isinstance(raw, list) or not raw:
    raise _bad(errors.BAD_FIELD, "field 'messages' must be a non-empty list", source)
  slots: list[AudioRef | None] = []
  messages = []
  for i, msg in enumerate(raw):
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
      raise _bad(errors.MISSING_FIELD, f"message {i} needs 'role' and 'content'", source)
    if msg["role"] not in ROLES:
      raise _bad(errors.BAD_FIELD, f"message {i} has unknown role {msg['role']!r}", source)
    content = _message_content(msg["content"], slots, manifest_dir, source, obj)
    reasoning = _get_str(msg, "reasoning_content", source, required=False)
    learn = msg.get("loss")
    if reasoning is not None or learn is not None:
      if msg["role"] != "assistant":
        raise _bad(errors.BAD_FIELD, f"message {i}: 'reasoning_content' and 'loss' belong on "
                   f"assistant messages, not {msg['role']!r}", source)
      if learn is not None and not isinstance(learn, bool):
        raise _bad(errors.BAD_FIELD, f"message {i}: 'loss' must be true or false, got "
                   f"{learn!r}", source)
    if reasoning is not None:
      content = [think_block(reasoning)] + [p.lstrip("\n") if isinstance(p, str) and j == 0
                                            else p for j, p in enumerate(content)]
    messages.append(Message(msg["role"], tuple(p for p in content if p != ""), learn))
  listed_value = obj.get("audios", obj.get("audio"))
  listed = [] if listed_value in (None, []) else list(
      _audio_list(listed_value, manifest_dir, source, obj))
  tags = [i for i, a in enumerate(slots) if a is None]
  if len(tags) != len(listed):
    raise _bad(errors.BAD_FIELD, f"{len(tags)} {AUDIO_TAG} tags but {len(listed)} audios", source)
  for i, ref in zip(tags, listed):
    slots[i] = ref
  return _finish_chat(obj, messages, tuple(slots), source)


def _parse_conversation(obj: dict, manifest_dir: str, source: str) -> Sample:
  """Reference finetune format; consecutive same-role entries form one turn, parts joined by \\n."""
  raw = obj["conversation"]
  if not isinstance(raw, list) or not raw:
    raise _bad(errors.BAD_FIELD, "field 'conversation' must be a non-empty list", source)
  audios: list[AudioRef] = []
  turns: list[tuple[str, list[str | int]]] = []
  for i, msg in enumerate(raw):
    if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
      raise _bad(errors.MISSING_FIELD, f"conversation entry {i} needs 'role' and 'content'", source)
    role, kind = msg["role"], msg.get("message_type", "text")
    if role not in ROLES:
      raise _bad(errors.BAD_FIELD, f"conversation entry {i} has unknown role {role!r}", source)
    if kind == "audio":
      audios.append(_audio_ref(msg["content"], manifest_dir, source,
                               _get_seconds(obj, "offset", source),
                               _get_seconds(obj, "duration", source, positive=True)))
      part: str | int = len(audios) - 1
    elif kind == "text":
      part = _get_str(msg, "content", source, required=True)
    else:
      raise _bad(errors.BAD_FIELD, f"unknown message_type {kind!r}", source)
    if turns and turns[-1][0] == role:
      turns[-1][1].extend(["\n", part])
    else:
      turns.append((role, [part]))
  messages = [Message(role, tuple(p for p in parts if p != "")) for role, parts in turns]
  return _finish_chat(obj, messages, tuple(audios), source)


def parse_line(line: bytes | str, manifest_path: str, lineno: int) -> Sample:
  """Parses one manifest line (1-based `lineno`) into a Sample; raises BadRecordError."""
  source = f"{manifest_path}:{lineno}"
  if isinstance(line, bytes):
    try:
      line = line.decode("utf-8")
    except UnicodeDecodeError as e:
      raise _bad(errors.BAD_ENCODING, f"line is not UTF-8: {e}", source) from None
  try:
    obj = json.loads(line)
  except json.JSONDecodeError as e:
    raise _bad(errors.MALFORMED_JSON, f"invalid JSON: {e}", source) from None
  if not isinstance(obj, dict):
    raise _bad(errors.MALFORMED_JSON, f"a line must hold a JSON object, got {type(obj).__name__}",
               source)
  manifest_dir = os.path.dirname(os.path.abspath(manifest_path))
  if "messages" in obj:
    return _parse_messages(obj, manifest_dir, source)
  if "conversation" in obj:
    return _parse_conversation(obj, manifest_dir, source)
  return _parse_native(obj, manifest_dir, source)


def read_manifest(path: str) -> Iterator[Sample | BadRecordError]:
  """Yields a Sample or the BadRecordError of every non-blank line; never stops on a bad line."""
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        yield parse_line(line, path, lineno)
      except BadRecordError as e:
        yield e


def index_lines(path: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Byte offsets, byte lengths and 1-based numbers of the non-blank lines (random access)."""
  offsets, lengths, numbers = [], [], []
  pos = 0
  with open(path, "rb") as f:
    for lineno, line in enumerate(f, start=1):
      if line.strip():
        offsets.append(pos)
        lengths.append(len(line))
        numbers.append(lineno)
      pos += len(line)
  return (np.asarray(offsets, np.int64), np.asarray(lengths, np.int64),
          np.asarray(numbers, np.int64))


@dataclasses.dataclass(frozen=True)
class RawLine:
  """An unparsed manifest line with its location: what a random-access source hands out."""
  data: bytes
  manifest: str
  lineno: int


class ManifestSource:
  """Random access to the non-blank lines of one manifest (a Grain data source).

  Reads with os.pread (no shared file position), so Grain's reader threads can share it; picklable
  for worker processes, which reopen the file.
  """

  def __init__(self, path: str):
    if not os.path.isfile(path):
      raise errors.ManifestNotFound(f"manifest not found: {path}")
    self.path = path
    self._offsets, self._lengths, self._numbers = index_lines(path)
    self._fd = None
    self._pid = None
    self._lock = threading.Lock()

  def __len__(self) -> int:
    return len(self._offsets)

  def __getitem__(self, index: int) -> RawLine:
    if self._fd is None or self._pid != os.getpid():
      with self._lock:
        if self._fd is None or self._pid != os.getpid():
          self._fd = os.open(self.path, os.O_RDONLY)
          self._pid = os.getpid()
    data = os.pread(self._fd, int(self._lengths[index]), int(self._offsets[index]))
    return RawLine(data, self.path, int(self._numbers[index]))

  def __getstate__(self):
    state = dict(self.__dict__)
    state["_fd"] = None
    state["_pid"] = None
    del state["_lock"]
    return state

  def __setstate__(self, state):
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def __del__(self):
    if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
      os.close(self._fd)

  def __repr__(self) -> str:
    return f"ManifestSource({self.path!r}, {len(self)} lines)"


def check_segments_within(sample: Sample, duration_s: float) -> None:
  """Raises bad_timestamps if a segment ends past the (first) audio's decoded duration."""
  if not sample.segments:
    return
  last = max(seg.end for seg in sample.segments)
  if last > duration_s + SEGMENT_SLACK_S:
    raise _bad(errors.BAD_TIMESTAMPS, f"segment ends at {last:.2f}s but the audio lasts "
               f"{duration_s:.2f}s", sample.source, sample.audios[0].path if sample.audios else None)


def _check_length(num_samples: int, ref: AudioRef, max_audio_seconds: float, source: str) -> None:
  seconds = num_samples / batch_lib.SAMPLE_RATE
  if num_samples < MIN_AUDIO_SAMPLES:
    raise _bad(errors.TOO_SHORT, f"clip lasts {seconds * 1000:.1f} ms, under one encoder token "
               f"({MIN_AUDIO_SAMPLES / batch_lib.SAMPLE_RATE * 1000:.0f} ms)", source, ref.path)
  if seconds > max_audio_seconds:
    raise _bad(errors.TOO_LONG, f"clip lasts {seconds:.1f}s, over max_audio_seconds="
               f"{max_audio_seconds}", source, ref.path)


def load_audios(sample: Sample, max_audio_seconds: float = math.inf) -> list[np.ndarray]:
  """Decodes every audio of a sample (16 kHz mono float32) and checks lengths and segments.

  The header duration is checked before decoding so an hour-long file over the limit costs a
  header read, not a decode. Raises BadRecordError (the audio module's reasons, too_short,
  too_long, bad_timestamps).
  """
  waves = []
  for ref in sample.audios:
    expected = ref.duration
    if expected is None and math.isfinite(max_audio_seconds):
      expected = audio.audio_duration(ref.path, record=sample.source) - ref.offset
    if expected is not None and expected > max_audio_seconds + 1.0 / batch_lib.SAMPLE_RATE:
      raise _bad(errors.TOO_LONG, f"clip lasts {expected:.1f}s, over max_audio_seconds="
                 f"{max_audio_seconds}", sample.source, ref.path)
    wave = audio.load_audio(ref.path, ref.offset, ref.duration, record=sample.source)
    _check_length(len(wave), ref, max_audio_seconds, sample.source)
    waves.append(wave)
  if waves:
    check_segments_within(sample, len(waves[0]) / batch_lib.SAMPLE_RATE)
  return waves


def manifest_paths(spec: str | Sequence[str]) -> list[str]:
  """'a.jsonl,b.jsonl' or a list -> list of paths (blank entries dropped)."""
  items = spec.split(",") if isinstance(spec, str) else list(spec)
  return [p.strip() for p in items if p and p.strip()]

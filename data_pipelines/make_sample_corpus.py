"""Builds the tiny corpus shipped in data_pipelines/sample_corpus (the `demo` preset trains on it).

    python -m data_pipelines.make_sample_corpus --out=data_pipelines/sample_corpus [--seed=0]

Why synthetic: the demo has to ship inside the repository (< 10 MB), train on a laptop CPU in
minutes and carry timestamps that are exact, not estimated. So every clip is built from parts
whose position we choose:

* speech: each word is synthesised on its own with espeak-ng, its silence trimmed, and the words
  are laid end to end with silences of known length. A word's start and end are therefore sample
  indices we wrote, and so are the sentence boundaries (first word start, last word end).
* sound events: tones, chords, noise bursts and clicks placed on a 0.1 s grid (an integer number
  of samples at 16, 22.05 and 24 kHz), so the caption's "from 0.50 s to 1.50 s" is exact.

espeak-ng and sox are needed only to rebuild the corpus, never to use it. The output is a pure
function of --seed and the espeak-ng version (recorded in timeline.jsonl).
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import shutil
import subprocess
import tempfile

import numpy as np
import sentencepiece as spm
import soundfile as sf
import soxr
from absl import flags

from data_pipelines import templates, tokenizers
from moss_jax import cli
from moss_jax.errors import UserError

ESPEAK = "espeak-ng"
ESPEAK_RATE = 22050  # espeak-ng's native output rate

# (espeak voice, what docs/sample_corpus.md calls it). Words like "a" and "I" are left out of the
# vocabulary because espeak reads an isolated "a" as the letter name.
VOICES = ("en-us", "en-gb", "en-us+f3", "en-gb-x-rp+m3", "en+f2")
SPEEDS = (130, 150, 170, 190)  # words per minute
PITCHES = (35, 45, 55, 65)
SAMPLE_RATES = (16000, 22050, 24000)
FORMATS = (("flac", "FLAC", "PCM_16"), ("ogg", "OGG", "VORBIS"), ("wav", "WAV", "PCM_16"))

DETERMINERS = ("the", "my", "your", "this", "one")
ADJECTIVES = ("red", "blue", "green", "big", "small", "old", "young", "happy", "quiet")
NOUNS = ("cat", "dog", "bird", "fish", "man", "girl", "boy", "horse", "ship", "tree")
VERBS = ("runs", "sits", "sings", "jumps", "sleeps", "swims", "waits", "walks", "eats", "falls")
ADVERBS = ("fast", "slowly", "here", "there", "today", "now", "again", "outside")

ASR_SECONDS = (1.5, 4.0)
GRID = 0.1  # seconds; event times are multiples of it
CHORDS = {"C major": (261.63, 329.63, 392.00), "A minor": (220.00, 261.63, 329.63),
          "G major": (196.00, 246.94, 293.66)}
TONE_HZ = (220, 330, 440, 550, 660, 880, 1000)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five")
CLICK_SECONDS = 0.005

# Sizes asked for by the demo (docs/sample_corpus.md): train / eval.
SIZES = {"train": dict(speech=48, events=16, qa_per_clip=2),
         "eval": dict(speech=10, events=4, qa_per_clip=1)}


@dataclasses.dataclass(frozen=True)
class Span:
  """A timed piece of a clip: a word, a sentence or a sound event (seconds, end exclusive)."""
  start: float
  end: float
  text: str

  def as_dict(self) -> dict:
    return {"start": round(self.start, 3), "end": round(self.end, 3), "text": self.text}


@dataclasses.dataclass
class Clip:
  """One audio file and everything known about it by construction."""
  name: str
  waveform: np.ndarray
  sample_rate: int
  fmt: tuple[str, str, str]
  info: dict

  @property
  def path(self) -> str:
    return f"audio/{self.name}.{self.fmt[0]}"

  @property
  def seconds(self) -> float:
    return len(self.waveform) / self.sample_rate


# ----------------------------------------------------------------------------------------- speech


@functools.lru_cache(maxsize=None)
def _espeak_word(word: str, voice: str, speed: int, pitch: int) -> np.ndarray:
  """One word from espeak-ng at 22.05 kHz, float32 (cached: words repeat a lot)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "w.wav")
    subprocess.run([ESPEAK, "-v", voice, "-s", str(speed), "-p", str(pitch), "-w", path, word],
                   check=True, capture_output=True)
    audio, rate = sf.read(path, dtype="float32")
  if rate != ESPEAK_RATE:
    raise RuntimeError(f"espeak-ng wrote {rate} Hz, expected {ESPEAK_RATE}")
  return audio


def _trim(audio: np.ndarray, rel_threshold: float = 0.02) -> np.ndarray:
  """Cuts leading/trailing silence: the word then starts and ends at its first/last loud sample."""
  loud = np.nonzero(np.abs(audio) > rel_threshold * np.abs(audio).max())[0]
  return audio[loud[0]:loud[-1] + 1]


def _word_audio(word: str, voice: str, speed: int, pitch: int, rate: int) -> np.ndarray:
  audio = _espeak_word(word, voice, speed, pitch)
  if rate != ESPEAK_RATE:
    audio = soxr.resample(audio, ESPEAK_RATE, rate, quality="VHQ").astype(np.float32)
  return _trim(audio)


def _sentence(rng: np.random.Generator, num_words: int) -> list[str]:
  """A grammatical sentence from the small vocabulary: det (adj) noun verb (adverb)."""
  words = [str(rng.choice(DETERMINERS))]
  if num_words >= 5:
    words.append(str(rng.choice(ADJECTIVES)))
  words += [str(rng.choice(NOUNS)), str(rng.choice(VERBS))]
  if num_words >= 4:
    words.append(str(rng.choice(ADVERBS)))
  return words


def _display(words: list[str]) -> str:
  text = " ".join(words)
  return text[0].upper() + text[1:] + "."


def _silence(rng: np.random.Generator, lo: float, hi: float, rate: int) -> np.ndarray:
  return np.zeros(int(round(rng.uniform(lo, hi) * rate)), np.float32)


def speech_clip(rng: np.random.Generator, name: str, rate: int, fmt, used: set[str]) -> Clip:
  """Synthesises one or two sentences word by word, retrying until 1.5-4 s and every sentence
  is new to the corpus (so eval speech is never heard in training)."""
  while True:
    voice, speed, pitch = (str(rng.choice(VOICES)), int(rng.choice(SPEEDS)),
                           int(rng.choice(PITCHES)))
    sentences = ([_sentence(rng, int(rng.integers(3, 5))) for _ in range(2)]
                 if rng.random() < 0.5 else [_sentence(rng, int(rng.integers(4, 6)))])
    shown = [_display(s) for s in sentences]
    if len(set(shown)) < len(shown) or used.intersection(shown):
      continue
    text = " ".join(shown)
    pieces, words, spans = [_silence(rng, 0.15, 0.4, rate)], [], []
    cursor = len(pieces[0])
    for si, sentence in enumerate(sentences):
      if si:
        pieces.append(_silence(rng, 0.3, 0.5, rate))
        cursor += len(pieces[-1])
      first = cursor
      for wi, word in enumerate(sentence):
        if wi:
          pieces.append(_silence(rng, 0.05, 0.12, rate))
          cursor += len(pieces[-1])
        audio = _word_audio(word, voice, speed, pitch, rate)
        words.append(Span(cursor / rate, (cursor + len(audio)) / rate, word))
        pieces.append(audio)
        cursor += len(audio)
      spans.append(Span(first / rate, cursor / rate, _display(sentence)))
    pieces.append(_silence(rng, 0.15, 0.4, rate))
    waveform = np.concatenate(pieces)
    seconds = len(waveform) / rate
    if ASR_SECONDS[0] <= seconds <= ASR_SECONDS[1]:
      break
  used.update(shown)
  waveform = waveform / np.abs(waveform).max() * rng.uniform(0.4, 0.9)
  info = dict(kind="speech", text=text, voice=voice, speed_wpm=speed, pitch=pitch,
              sentences=[s.as_dict() for s in spans], words=[w.as_dict() for w in words])
  return Clip(name, _add_floor(rng, waveform), rate, fmt, info)


def _add_floor(rng: np.random.Generator, waveform: np.ndarray) -> np.ndarray:
  """A faint noise floor (-66 dBFS) so silences are not digital zero, as in real recordings."""
  noise = rng.normal(0.0, 5e-4, len(waveform))
  return np.clip(waveform + noise, -1.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------- sound events


def _fade(x: np.ndarray, rate: int, seconds: float = 0.01) -> np.ndarray:
  n = min(int(seconds * rate), len(x) // 2)
  ramp = np.linspace(0.0, 1.0, n, dtype=np.float32)
  x = x.copy()
  x[:n] *= ramp
  x[len(x) - n:] *= ramp[::-1]
  return x


def _sines(freqs, seconds: float, rate: int) -> np.ndarray:
  t = np.arange(int(round(seconds * rate))) / rate
  return sum(np.sin(2 * np.pi * f * t) for f in freqs).astype(np.float32) / len(freqs)


def _fmt_s(t: float) -> str:
  return f"{t:.2f} s"


def _event(rng: np.random.Generator, kind: str, start: float, rate: int):
  """Returns (audio, phrase for the caption, segments, facts for the questions)."""
  if kind == "tone":
    hz = int(rng.choice(TONE_HZ))
    dur = GRID * int(rng.integers(4, 13))
    audio = _fade(_sines([hz], dur, rate), rate) * rng.uniform(0.2, 0.5)
    name = f"{hz} Hz tone"
    phrase = f"a {name} from {_fmt_s(start)} to {_fmt_s(start + dur)}"
    return audio, phrase, [Span(start, start + dur, name)], dict(name=name, hz=hz)
  if kind == "chord":
    chord = str(rng.choice(sorted(CHORDS)))
    dur = GRID * int(rng.integers(5, 13))
    audio = _fade(_sines(CHORDS[chord], dur, rate), rate) * rng.uniform(0.3, 0.6)
    name = f"{chord} chord"
    phrase = f"a {name} from {_fmt_s(start)} to {_fmt_s(start + dur)}"
    return audio, phrase, [Span(start, start + dur, name)], dict(name=name)
  if kind == "noise":
    dur = GRID * int(rng.integers(2, 5))
    audio = _fade(rng.uniform(-1, 1, int(round(dur * rate))).astype(np.float32), rate, 0.005)
    audio *= rng.uniform(0.1, 0.3)
    phrase = f"a noise burst at {_fmt_s(start)}"
    return audio, phrase, [Span(start, start + dur, "noise burst")], dict(name="noise burst")
  # clicks: 2-4 short decaying impulses on the grid, 0.2-0.3 s apart
  count, step = int(rng.integers(2, 5)), GRID * int(rng.integers(2, 4))
  onsets = [start + i * step for i in range(count)]
  length = int(round(step * (count - 1) * rate)) + int(round(CLICK_SECONDS * rate))
  audio = np.zeros(length, np.float32)
  click = np.exp(-np.arange(int(round(CLICK_SECONDS * rate))) / (0.001 * rate)).astype(np.float32)
  for i in range(count):
    at = int(round(i * step * rate))
    audio[at:at + len(click)] = click * rng.choice([-1.0, 1.0]) * rng.uniform(0.5, 0.8)
  times = ", ".join(_fmt_s(t) for t in onsets[:-1]) + f" and {_fmt_s(onsets[-1])}"
  phrase = f"{NUMBER_WORDS[count]} clicks at {times}"
  segs = [Span(t, t + CLICK_SECONDS, "click") for t in onsets]
  return audio, phrase, segs, dict(name="click", count=count)


def _event_length(audio: np.ndarray, rate: int) -> float:
  """Length on the grid, rounded up, so the next event starts on the grid too."""
  return GRID * np.ceil(len(audio) / rate / GRID - 1e-9)


def events_clip(rng: np.random.Generator, name: str, rate: int, fmt) -> Clip:
  """1-3 non-overlapping sound events in silence; caption and questions describe their timeline."""
  kinds = list(rng.choice(["tone", "chord", "noise", "clicks"], size=int(rng.integers(1, 4)),
                          replace=False))
  cursor = GRID * int(rng.integers(2, 8))
  placed = []  # (audio, start sample, phrase, segments, facts, kind)
  for kind in kinds:
    audio, phrase, segs, facts = _event(rng, kind, round(cursor, 1), rate)
    placed.append((audio, int(round(cursor * rate)), phrase, segs, facts, kind))
    cursor += _event_length(audio, rate) + GRID * int(rng.integers(3, 9))
  total = round(cursor + GRID * int(rng.integers(0, 5)), 1)
  waveform = np.zeros(int(round(total * rate)), np.float32)
  for audio, at, *_ in placed:
    waveform[at:at + len(audio)] += audio
  phrases = [p[2] for p in placed]
  caption = ", then ".join(phrases)
  caption = caption[0].upper() + caption[1:] + "."
  segments = [s for p in placed for s in p[3]]
  info = dict(kind="events", text=caption, events=[
      dict(kind=p[5], **p[4], segments=[s.as_dict() for s in p[3]]) for p in placed])
  return Clip(name, _add_floor(rng, waveform), rate, fmt, info | {"segments": segments})


def _what_happens_at(rng: np.random.Generator, clip: Clip) -> tuple[str, str]:
  """'What happens at T seconds?' for a T inside an event (or in a silence)."""
  events = clip.info["events"]
  ev = events[int(rng.integers(len(events)))]
  first, last = ev["segments"][0], ev["segments"][-1]
  if ev["kind"] == "clicks":
    t = first["start"]
    answer = "A click."
  else:
    lo, hi = first["start"] + GRID, last["end"] - GRID
    t = round(float(rng.choice(np.arange(lo, hi + 1e-6, GRID))), 1) if hi >= lo else first["start"]
    answer = f"A {ev['name']}."
  return f"What happens at {t:g} seconds?", answer


def _qa_pairs(rng: np.random.Generator, clip: Clip, count: int) -> list[tuple[str, str]]:
  """Time-aware questions with answers read from the clip's construction."""
  events = clip.info["events"]
  options = [_what_happens_at(rng, clip)]
  ev = events[int(rng.integers(len(events)))]
  noun = "first click" if ev["kind"] == "clicks" else ev["name"]
  options.append((f"When does the {noun} start?",
                  f"At {_fmt_s(ev['segments'][0]['start'])}."))
  options.append(("How many sounds are there?", f"{NUMBER_WORDS[len(events)].capitalize()}."))
  for e in events:
    if e["kind"] == "clicks":
      options.append(("How many clicks are there?", f"{NUMBER_WORDS[e['count']].capitalize()}."))
    if e["kind"] == "tone":
      options.append(("What is the frequency of the tone?", f"{e['hz']} Hz."))
  picks = rng.choice(len(options), size=min(count, len(options)), replace=False)
  # The time question always comes first: it is the one the corpus exists to teach.
  return [options[0]] + [options[int(i)] for i in sorted(picks) if i != 0][:count - 1]


# ------------------------------------------------------------------------------------ manifests


def _records(split: str, clips: list[Clip], rng: np.random.Generator, qa_per_clip: int,
             timestamp_every: int) -> list[dict]:
  records, speech_i = [], 0
  for clip in clips:
    base = {"audio": clip.path}
    if clip.info["kind"] == "speech":
      records.append({"id": f"{split}-asr-{clip.name}", **base, "task": "asr",
                      "text": clip.info["text"]})
      if speech_i % timestamp_every == 0:
        records.append({"id": f"{split}-ts-{clip.name}", **base, "task": "asr_timestamps",
                        "text": clip.info["text"], "segments": clip.info["sentences"]})
      speech_i += 1
      continue
    segments = [s.as_dict() for s in clip.info["segments"]]
    records.append({"id": f"{split}-cap-{clip.name}", **base, "task": "caption",
                    "text": clip.info["text"], "segments": segments})
    for qi, (question, answer) in enumerate(_qa_pairs(rng, clip, qa_per_clip)):
      records.append({"id": f"{split}-qa-{clip.name}-{qi}", **base, "task": "qa",
                      "question": question, "text": answer})
  return records


def _write_audio(out: str, clip: Clip) -> None:
  path = os.path.join(out, clip.path)
  ext, container, subtype = clip.fmt
  kwargs = {"compression_level": 0.6} if ext == "ogg" else {}
  sf.write(path, clip.waveform, clip.sample_rate, format=container, subtype=subtype, **kwargs)
  if ext == "ogg":
    _fix_ogg_serial(path)


def _crc_table() -> tuple[int, ...]:
  table = []
  for byte in range(256):
    crc = byte << 24
    for _ in range(8):
      crc = ((crc << 1) ^ 0x04C11DB7 if crc & 0x80000000 else crc << 1) & 0xFFFFFFFF
    table.append(crc)
  return tuple(table)


_OGG_CRC_TABLE = _crc_table()


def _ogg_crc(data: bytes) -> int:
  """Ogg's page checksum: CRC-32, polynomial 0x04c11db7, not reflected, zero init."""
  crc = 0
  for byte in data:
    crc = ((crc << 8) & 0xFFFFFFFF) ^ _OGG_CRC_TABLE[(crc >> 24) ^ byte]
  return crc


def _fix_ogg_serial(path: str, serial: int = 1) -> None:
  """libsndfile gives each Ogg stream a random serial number; a fixed one keeps rebuilds
  byte-identical (the samples are already deterministic)."""
  with open(path, "rb") as f:
    data = bytearray(f.read())
  pos = 0
  while pos < len(data):
    if data[pos:pos + 4] != b"OggS":
      raise ValueError(f"{path}: no Ogg page at byte {pos}")
    nsegs = data[pos + 26]
    end = pos + 27 + nsegs + sum(data[pos + 27:pos + 27 + nsegs])
    data[pos + 14:pos + 18] = serial.to_bytes(4, "little")
    data[pos + 22:pos + 26] = bytes(4)
    data[pos + 22:pos + 26] = _ogg_crc(bytes(data[pos:end])).to_bytes(4, "little")
    pos = end
  with open(path, "wb") as f:
    f.write(bytes(data))


def _formats(i: int):
  """Cycles through all 9 (rate, format) pairs so every decoder path is exercised."""
  return SAMPLE_RATES[i % 3], FORMATS[(i // 3) % 3]


def build_split(split: str, seed: int, used: set[str]) -> list[Clip]:
  sizes = SIZES[split]
  rng = np.random.default_rng([seed, 0 if split == "train" else 1])
  clips = []
  for i in range(sizes["speech"]):
    rate, fmt = _formats(i)
    clips.append(speech_clip(rng, f"{split}_speech_{i:03d}", rate, fmt, used))
  for i in range(sizes["events"]):
    rate, fmt = _formats(i + 1)
    clips.append(events_clip(rng, f"{split}_events_{i:03d}", rate, fmt))
  return clips


def _timeline_row(split: str, clip: Clip) -> dict:
  info = {k: v for k, v in clip.info.items() if k != "segments"}
  return {"audio": clip.path, "split": split, "sample_rate": clip.sample_rate,
          "num_samples": len(clip.waveform), "seconds": round(clip.seconds, 4), **info}


def _espeak_version() -> str:
  out = subprocess.run([ESPEAK, "--version"], check=True, capture_output=True, text=True).stdout
  return out.strip()


def _write_jsonl(path: str, rows: list[dict]) -> None:
  with open(path, "w", encoding="utf-8") as f:
    for row in rows:
      f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ------------------------------------------------------------------------------------ tokenizer

# Timestamps "[1.25]" follow sentence ends ("...there.[3.31]"); without these as user-defined
# pieces BPE learns ".[" and "][" and the same bracket gets two spellings.
PUNCT_TOKENS = ("[", "]", ".")
VOCAB_SIZE = 512  # configs/base.py: the demo LLM has 512 embedding rows


def train_tokenizer(out: str, manifests: list[str], vocab_size: int = VOCAB_SIZE) -> None:
  """Writes tokenizer.model/.vocab: data_pipelines.tokenizers' sentencepiece settings and text
  (templates included), plus PUNCT_TOKENS, as BPE (unigram degenerates on a few hundred lines).

  Trained from memory into memory so no path ends up inside the model (rebuilds stay
  byte-identical wherever --out points).
  """
  texts = [t for t in tokenizers.manifest_texts(manifests) if t]
  # The prompt strings occur in every sample the model sees, so they get a sample's weight each
  # and end up as a few pieces (shorter rows, faster demo) instead of letter soup.
  texts += list(templates.fixed_texts()) * len(texts)
  model = io.BytesIO()
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_writer=model, vocab_size=vocab_size,
      model_type="bpe",
      user_defined_symbols=(list(tokenizers.SPECIAL_PIECES.values()) + list(tokenizers.DIGITS)
                            + ["\n"] + list(PUNCT_TOKENS)),
      normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
      split_digits=True, byte_fallback=True, character_coverage=1.0,
      unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, hard_vocab_limit=False,
      num_threads=1, shuffle_input_sentence=False, minloglevel=2)
  prefix = os.path.join(out, "tokenizer")
  with open(prefix + ".model", "wb") as f:
    f.write(model.getvalue())
  sp = spm.SentencePieceProcessor(model_proto=model.getvalue())
  with open(prefix + ".vocab", "w", encoding="utf-8") as f:
    for i in range(sp.get_piece_size()):
      piece = sp.id_to_piece(i).replace("\n", "\\n")  # one line per piece
      f.write(f"{piece}\t{sp.get_score(i):g}\n")


# ----------------------------------------------------------------------------------------- main


def build(out: str, seed: int = 0) -> dict:
  """Writes audio/, train.jsonl, eval.jsonl, timeline.jsonl and the tokenizer into `out`."""
  if os.path.isdir(os.path.join(out, "audio")):
    shutil.rmtree(os.path.join(out, "audio"))
  os.makedirs(os.path.join(out, "audio"), exist_ok=True)
  used: set[str] = set()
  timeline, summary = [], {}
  for split in ("train", "eval"):
    clips = build_split(split, seed, used)
    rng = np.random.default_rng([seed, 2 if split == "train" else 3])
    records = _records(split, clips, rng, SIZES[split]["qa_per_clip"], timestamp_every=3)
    for clip in clips:
      _write_audio(out, clip)
    _write_jsonl(os.path.join(out, f"{split}.jsonl"), records)
    timeline += [_timeline_row(split, c) for c in clips]
    summary[split] = dict(clips=len(clips), records=len(records),
                          seconds=round(sum(c.seconds for c in clips), 2))
  header = {"generator": "data_pipelines.make_sample_corpus", "seed": seed,
            "espeak": _espeak_version()}
  _write_jsonl(os.path.join(out, "timeline.jsonl"), [header] + timeline)
  train_tokenizer(out, [os.path.join(out, "train.jsonl"), os.path.join(out, "eval.jsonl")])
  return summary


def _define_flags() -> None:
  """The command's flags; defined only when run as a command (tests import this module)."""
  flags.DEFINE_string("out", os.path.join(os.path.dirname(__file__), "sample_corpus"),
                      "Output directory.")
  flags.DEFINE_integer("seed", 0, "Seed of every random choice (the corpus is a function of it).")


def main(argv) -> None:
  del argv  # cli.run rejects stray arguments
  if shutil.which(ESPEAK) is None:
    raise UserError("espeak-ng is needed to rebuild the sample corpus (apt-get install espeak-ng)")
  print(json.dumps(build(flags.FLAGS.out, flags.FLAGS.seed)))


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

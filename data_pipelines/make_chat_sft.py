r"""A chat fine-tuning set from the sample corpus: word-level timestamp transcription as chats.

The demo pretraining run (configs/pretrain.py:demo) learns plain and sentence-level timestamped
transcription; this set asks for something it never saw, in the chat format fine-tuning data
usually come in ({"messages": [...], "audios": [...]}, docs/finetuning.md):

  - a system prompt, then "<audio>\nTranscribe the audio with word-level timestamps: ..." and the
    answer "[0.18]the[0.72] [0.82]green[1.30] ..." (times from the corpus's timeline.jsonl);
  - every third clip as a two-turn chat: plain transcription first, timestamps as a follow-up;
  - every fourth pair of clips as one sample with two audios, transcribed one after the other.

  python -m data_pipelines.make_chat_sft --out /tmp/chat_sft.jsonl [--split train]

Audio paths are written absolute, so the manifest can live anywhere. Deterministic: the output
depends only on the shipped corpus.
"""

from __future__ import annotations

import json
import os

from absl import flags

from data_pipelines import templates
from data_pipelines.manifest import Segment
from moss_jax import cli

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "sample_corpus")
WORD_QUESTION = templates.DEFAULT_QUESTIONS["asr_timestamps_word"]
PLAIN_QUESTION = templates.DEFAULT_QUESTIONS["asr"]


def _clips(split: str) -> list[dict]:
  with open(os.path.join(CORPUS, "timeline.jsonl"), encoding="utf-8") as f:
    rows = [json.loads(line) for line in f if line.strip()][1:]  # line 1 is the header
  return [r for r in rows if r["split"] == split and r["kind"] == "speech"]


def _words(clip: dict) -> str:
  segments = [Segment(w["start"], w["end"], w["text"]) for w in clip["words"]]
  return templates.format_timestamps(segments, "word")


def records(split: str = "train") -> list[dict]:
  """The chat records of a corpus split."""
  clips = _clips(split)
  out = []
  system = {"role": "system", "content": templates.SYSTEM_PROMPT}
  for i, clip in enumerate(clips):
    path = os.path.join(CORPUS, clip["audio"])
    if i % 3 == 2:
      messages = [system,
                  {"role": "user", "content": f"<audio>\n{PLAIN_QUESTION}"},
                  {"role": "assistant", "content": clip["text"]},
                  {"role": "user", "content": WORD_QUESTION},
                  {"role": "assistant", "content": _words(clip)}]
    else:
      messages = [system,
                  {"role": "user", "content": f"<audio>\n{WORD_QUESTION}"},
                  {"role": "assistant", "content": _words(clip)}]
    out.append({"id": f"chat-{split}-{i}", "task": "asr_timestamps", "messages": messages,
                "audios": [path]})
  for i in range(0, len(clips) - 1, 8):
    a, b = clips[i], clips[i + 1]
    out.append({"id": f"chat-{split}-pair-{i}", "task": "asr", "messages": [
        system,
        {"role": "user", "content": f"<audio>\n<audio>\n{PLAIN_QUESTION}"},
        {"role": "assistant", "content": f"{a['text']} {b['text']}"}],
        "audios": [os.path.join(CORPUS, a["audio"]), os.path.join(CORPUS, b["audio"])]})
  return out


def write(out: str, split: str = "train") -> int:
  """Writes the chat records of `split` to `out`; returns how many."""
  recs = records(split)
  os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    for r in recs:
      f.write(json.dumps(r) + "\n")
  return len(recs)


def _define_flags() -> None:
  """The command's flags; defined only when run as a command (tests import this module)."""
  flags.DEFINE_string("out", None, "Output JSONL path.")
  flags.DEFINE_enum("split", "train", ["train", "eval"], "Corpus split whose speech clips are used.")


def main(argv) -> None:
  del argv  # cli.run rejects stray arguments
  cli.require("out")
  n = write(flags.FLAGS.out, flags.FLAGS.split)
  print(f"wrote {n} chat records to {flags.FLAGS.out}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

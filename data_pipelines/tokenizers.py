"""Text tokenizers behind one interface: sentencepiece models and Hugging Face tokenizer.json files.

The prompt templates need six special ids (audio placeholder, audio bos/eos, im_start/im_end, pad)
and one id per decimal digit (time markers). Where they come from:
  * config.data.tokenizer.<name> when set (e.g. moss_jax/model_config.py QWEN3_SPECIAL_IDS);
  * sentencepiece: the pieces in SPECIAL_PIECES, which `train` adds as user-defined symbols;
  * Hugging Face: the token of that name if the vocab has it, else the Qwen3 reference id
    (spec 5.1: the reference reuses ids the Qwen3 vocab does not name).

Train a small sentencepiece model on manifest text:
  python -m data_pipelines.tokenizers --manifests=train.jsonl --vocab_size=512 --out=tok
"""

from __future__ import annotations

import abc
import os
from typing import Any, Iterable, Iterator, Mapping, Sequence

import sentencepiece as spm
import tokenizers as hf_tokenizers  # the Hugging Face package, not this module
from absl import flags

from data_pipelines import errors
from data_pipelines import manifest as manifest_lib
from data_pipelines import templates
from moss_jax import cli
from moss_jax.errors import UserError
from moss_jax.model_config import QWEN3_SPECIAL_IDS

# Attribute name -> piece name. The pad piece is Qwen's <|endoftext|> (also its document end).
SPECIAL_PIECES = {
    "im_start_id": "<|im_start|>",
    "im_end_id": "<|im_end|>",
    "audio_token_id": "<|AUDIO|>",
    "audio_bos_id": "<|audio_bos|>",
    "audio_eos_id": "<|audio_eos|>",
    "pad_id": "<|endoftext|>",
}
SPECIAL_NAMES = tuple(SPECIAL_PIECES)
DIGITS = "0123456789"


def _get(cfg: Any, name: str, default: Any = None) -> Any:
  if isinstance(cfg, Mapping):
    return cfg.get(name, default)
  return getattr(cfg, name, default) if hasattr(cfg, name) else default


class Tokenizer(abc.ABC):
  """Text <-> ids plus the special ids the templates need.

  `vocab_size` is the number of embedding rows the ids need: the tokenizer's own vocab, grown to
  cover special ids placed beyond it (Qwen3's audio bos/eos are).
  """

  audio_token_id: int
  audio_bos_id: int
  audio_eos_id: int
  im_start_id: int
  im_end_id: int
  pad_id: int

  def __init__(self, path: str, overrides: Mapping[str, int] | None = None):
    self.path = path
    self._overrides = {k: int(v) for k, v in (overrides or {}).items()
                       if k in SPECIAL_NAMES and v is not None and int(v) >= 0}
    self._load()

  def _load(self) -> None:
    self._load_model()
    for name in SPECIAL_NAMES:
      setattr(self, name, self._overrides.get(name, self._default_id(name)))
    self.special_ids = frozenset(getattr(self, n) for n in SPECIAL_NAMES)
    self.digit_ids = self._digit_ids()
    self.vocab_size = max(self._model_vocab_size(), max(self.special_ids) + 1)

  def _digit_token(self, digit: str) -> list[int]:
    return self.encode(digit)

  def _digit_ids(self) -> tuple[int, ...]:
    ids = []
    for d in DIGITS:
      enc = self._digit_token(d)
      if len(enc) != 1:
        raise ValueError(f"tokenizer {self.path} encodes digit {d!r} as {enc}; time markers need "
                         "one token per digit (train sentencepiece with this module's command)")
      ids.append(enc[0])
    return tuple(ids)

  def digits(self, number: int) -> list[int]:
    """Ids of the decimal digits of a non-negative integer, one token each (time markers)."""
    return [self.digit_ids[int(c)] for c in str(int(number))]

  def __getstate__(self) -> dict:
    # Native tokenizer objects are rebuilt from the file in worker processes.
    return {"path": self.path, "_overrides": self._overrides}

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._load()

  @abc.abstractmethod
  def _load_model(self) -> None:
    """Opens the underlying tokenizer file."""

  @abc.abstractmethod
  def _default_id(self, name: str) -> int:
    """The id of special `name` when the config gives none."""

  @abc.abstractmethod
  def _model_vocab_size(self) -> int:
    """Ids the tokenizer file itself defines."""

  @abc.abstractmethod
  def encode(self, text: str) -> list[int]:
    """Plain text to ids; adds no bos/eos."""

  @abc.abstractmethod
  def _decode(self, ids: list[int]) -> str:
    """Ids (specials already removed) to text."""

  def decode(self, ids: Iterable[int]) -> str:
    """Ids to text, skipping the special ids, padding and ids the tokenizer does not know."""
    limit = self._model_vocab_size()
    return self._decode([int(i) for i in ids
                         if int(i) not in self.special_ids and 0 <= int(i) < limit])


class SentencePieceTokenizer(Tokenizer):
  """A sentencepiece model; specials are looked up by piece name."""

  def _load_model(self) -> None:
    if not os.path.isfile(self.path):
      raise errors.TokenizerNotFound(f"sentencepiece model not found: {self.path}")
    try:
      self._sp = spm.SentencePieceProcessor(model_file=self.path)
    except (RuntimeError, OSError) as e:
      hint = (" (it looks like a Hugging Face tokenizer: set data.tokenizer.kind=hf)"
              if _looks_like_json(self.path) else "")
      raise errors.TokenizerError(f"{self.path} is not a sentencepiece model{hint}: "
                                  f"{str(e).strip().splitlines()[-1]}") from None

  def _default_id(self, name: str) -> int:
    piece = SPECIAL_PIECES[name]
    pid = self._sp.piece_to_id(piece)
    if self._sp.id_to_piece(pid) != piece:
      raise ValueError(f"sentencepiece model {self.path} has no piece {piece!r} for {name}; "
                       f"set config.data.tokenizer.{name} or train it with this module")
    return pid

  def _model_vocab_size(self) -> int:
    return self._sp.get_piece_size()

  def _digit_token(self, digit: str) -> list[int]:
    # By piece, so a model with a dummy prefix ("0" -> "▁", "0") still gives one id per digit.
    pid = self._sp.piece_to_id(digit)
    return [pid] if self._sp.id_to_piece(pid) == digit else self.encode(digit)

  def encode(self, text: str) -> list[int]:
    return list(self._sp.encode(text, out_type=int))

  def _decode(self, ids: list[int]) -> str:
    return self._sp.decode(ids)


class HFTokenizer(Tokenizer):
  """A Hugging Face `tokenizers` file (tokenizer.json, or a directory holding one), e.g. Qwen3's."""

  def _load_model(self) -> None:
    path = self.path
    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise errors.TokenizerNotFound(f"tokenizer.json not found: {self.path}")
    try:
      self._tok = hf_tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # pylint: disable=broad-except  (tokenizers raises plain Exception)
      hint = ("" if _looks_like_json(path) else
              " (a sentencepiece .model? set data.tokenizer.kind=sentencepiece)")
      raise errors.TokenizerError(f"{path} is not a Hugging Face tokenizer.json{hint}: "
                                  f"{str(e).strip().splitlines()[-1]}") from None

  def _default_id(self, name: str) -> int:
    tid = self._tok.token_to_id(SPECIAL_PIECES[name])
    return QWEN3_SPECIAL_IDS[name] if tid is None else tid

  def _model_vocab_size(self) -> int:
    return self._tok.get_vocab_size(with_added_tokens=True)

  def encode(self, text: str) -> list[int]:
    return list(self._tok.encode(text, add_special_tokens=False).ids)

  def _decode(self, ids: list[int]) -> str:
    return self._tok.decode(ids, skip_special_tokens=True)


def _looks_like_json(path: str) -> bool:
  with open(path, "rb") as f:
    return f.read(64).lstrip().startswith(b"{")


def load_tokenizer(cfg: Any) -> Tokenizer:
  """Builds the tokenizer of config.data.tokenizer (kind: sentencepiece | hf, path, optional ids)."""
  kind = _get(cfg, "kind", "sentencepiece")
  path = _get(cfg, "path", "")
  if not path:
    raise errors.TokenizerError("config.data.tokenizer.path is empty: point it at a sentencepiece .model or "
                     "a tokenizer.json (or its directory)")
  overrides = {name: _get(cfg, name) for name in SPECIAL_NAMES if _get(cfg, name) is not None}
  if kind in ("sentencepiece", "spm"):
    return SentencePieceTokenizer(path, overrides)
  if kind in ("hf", "huggingface"):
    return HFTokenizer(path, overrides)
  raise errors.TokenizerError(f"unknown tokenizer kind {kind!r}; use 'sentencepiece' or 'hf'")


def manifest_texts(paths: Sequence[str]) -> Iterator[str]:
  """Every text a template can emit for the samples of the manifests (bad lines skipped)."""
  yield from templates.fixed_texts()
  for path in paths:
    for sample in manifest_lib.read_manifest(path):
      if isinstance(sample, Exception):
        continue
      yield from templates.sample_texts(sample)


def train_sentencepiece(texts: Iterable[str], out_prefix: str, vocab_size: int, *,
                        model_type: str = "unigram", byte_fallback: bool = True,
                        character_coverage: float = 1.0) -> str:
  """Trains a sentencepiece model whose pieces include the specials, each digit and "\\n".

  Identity normalisation and no dummy prefix keep text and newlines byte-exact, so template
  pieces encoded separately concatenate to what the template means.
  """
  texts = [t for t in texts if t]
  if not texts:
    raise ValueError("no text to train a tokenizer on")
  os.makedirs(os.path.dirname(os.path.abspath(out_prefix)), exist_ok=True)
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(texts), model_prefix=out_prefix, vocab_size=vocab_size,
      model_type=model_type,
      user_defined_symbols=list(SPECIAL_PIECES.values()) + list(DIGITS) + ["\n"],
      normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
      split_digits=True, byte_fallback=byte_fallback, character_coverage=character_coverage,
      unk_id=0, bos_id=-1, eos_id=-1, pad_id=-1, hard_vocab_limit=False,
      max_sentence_length=1 << 16, input_sentence_size=2_000_000, shuffle_input_sentence=True,
      minloglevel=2)
  return out_prefix + ".model"


def _define_flags() -> None:
  """The command's flags; defined only when run as a command, so importing this module (train,
  validate) adds no flags to another program."""
  flags.DEFINE_list("manifests", None, "JSONL manifests whose text the tokenizer learns (a,b,c).")
  flags.DEFINE_integer("vocab_size", None, "Pieces of the model (the LLM's embedding rows).")
  flags.DEFINE_string("out", None, "Output prefix: writes PREFIX.model and PREFIX.vocab.")
  flags.DEFINE_enum("model_type", "unigram", ["unigram", "bpe"], "sentencepiece model type.")
  flags.DEFINE_bool("byte_fallback", True, "Keep the 256 byte pieces (--nobyte_fallback: unseen "
                    "characters become <unk>).")
  flags.DEFINE_float("character_coverage", 1.0, "Share of characters covered by pieces.")


def main(argv: Sequence[str]) -> None:
  del argv  # cli.run rejects stray arguments
  cli.require("manifests", "vocab_size", "out")
  f = flags.FLAGS
  paths = [p for p in f.manifests if p]
  missing = [p for p in paths if not os.path.isfile(p)]
  if missing:
    raise UserError(f"manifest not found: {', '.join(missing)}")
  model = train_sentencepiece(manifest_texts(paths), f.out, f.vocab_size,
                              model_type=f.model_type, byte_fallback=f.byte_fallback,
                              character_coverage=f.character_coverage)
  tok = SentencePieceTokenizer(model)
  print(f"wrote {model}: {tok.vocab_size} pieces")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)

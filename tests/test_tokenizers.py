"""Tokenizers: the sentencepiece training command, special-id lookup, HF tokenizer.json, pickling."""

import json
import os
import pickle
import subprocess
import sys

import pytest
import sentencepiece as spm
from tokenizers import Tokenizer, models, pre_tokenizers

from data_pipelines import templates, tokenizers
from moss_jax.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SENTENCES = ["The quick brown fox jumps over the lazy dog.", "A small cat sleeps here.",
             "Birds sing in the morning.", "今天天气很好。", "Rain falls on the red roof."]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory):
  """Trained by the module's command on a manifest in all three formats."""
  root = tmp_path_factory.mktemp("spm")
  lines = [{"id": str(i), "audio": "a.wav", "task": "asr", "text": s}
           for i, s in enumerate(SENTENCES * 4)]
  lines.append({"messages": [{"role": "user", "content": "<audio>Who speaks?"},
                             {"role": "assistant", "content": "A tall man."}], "audios": ["a.wav"]})
  lines.append({"conversation": [{"role": "user", "message_type": "audio", "content": "a.wav"},
                                 {"role": "assistant", "content": "Wind and rain."}]})
  manifest = root / "train.jsonl"
  manifest.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n")
  proc = subprocess.run([sys.executable, "-m", "data_pipelines.tokenizers",
                         f"--manifests={manifest}", "--vocab_size=400", f"--out={root / 'tok'}"],
                        capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert proc.stdout.startswith(f"wrote {root / 'tok.model'}: ")
  return str(root / "tok.model")


def test_command_names_a_missing_manifest_on_one_line(tmp_path):
  proc = subprocess.run([sys.executable, "-m", "data_pipelines.tokenizers",
                         f"--manifests={tmp_path / 'absent.jsonl'}", "--vocab_size=400",
                         f"--out={tmp_path / 'tok'}"],
                        capture_output=True, text=True, cwd=REPO, timeout=300, check=False)
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1] == f"error: manifest not found: {tmp_path / 'absent.jsonl'}"


def test_trained_model_has_single_piece_specials_and_digits(spm_model):
  tok = tokenizers.load_tokenizer({"kind": "sentencepiece", "path": spm_model})
  sp = spm.SentencePieceProcessor(model_file=spm_model)
  for name, piece in tokenizers.SPECIAL_PIECES.items():
    assert sp.id_to_piece(getattr(tok, name)) == piece
    assert tok.encode(piece) == [getattr(tok, name)]
  assert len(set(getattr(tok, n) for n in tokenizers.SPECIAL_NAMES)) == 6
  assert [sp.id_to_piece(i) for i in tok.digit_ids] == list("0123456789")
  assert tok.encode("2024") == [tok.digit_ids[d] for d in (2, 0, 2, 4)]
  assert tok.digits(10) == [tok.digit_ids[1], tok.digit_ids[0]]
  assert tok.encode("\n") == [sp.piece_to_id("\n")]
  assert tok.vocab_size == sp.get_piece_size() <= 400


def test_text_round_trips_and_decode_skips_specials(spm_model):
  tok = tokenizers.load_tokenizer({"kind": "sentencepiece", "path": spm_model})
  for text in SENTENCES + ["user\nTranscribe the audio.", "Ω 12 ok"]:
    assert tok.decode(tok.encode(text)) == text
  ids = [tok.im_start_id] + tok.encode("A small cat.") + [tok.audio_token_id] * 3 + [tok.im_end_id]
  assert tok.decode(ids + [tok.pad_id, -100]) == "A small cat."


def test_template_strings_are_in_the_training_text():
  texts = list(tokenizers.manifest_texts([]))
  assert templates.SYSTEM_PROMPT in texts and "assistant" in texts
  assert set(templates.DEFAULT_QUESTIONS.values()) <= set(texts)


def test_config_ids_override_lookup(spm_model):
  tok = tokenizers.load_tokenizer({"kind": "sentencepiece", "path": spm_model, "pad_id": 0})
  assert tok.pad_id == 0
  assert tok.decode([0] + tok.encode("ok")) == "ok"


def test_model_without_special_pieces_is_rejected(tmp_path):
  spm.SentencePieceTrainer.train(sentence_iterator=iter(SENTENCES * 10),
                                 model_prefix=str(tmp_path / "plain"), vocab_size=60,
                                 hard_vocab_limit=False, minloglevel=2)
  with pytest.raises(ValueError, match="<|im_start|>"):
    tokenizers.load_tokenizer({"kind": "sentencepiece", "path": str(tmp_path / "plain.model")})


def _hf_file(path, specials=()):
  vocab = {"<unk>": 0, "hello": 1, "world": 2}
  vocab.update({str(d): 3 + d for d in range(10)})
  tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(),
                                               pre_tokenizers.Digits(individual_digits=True)])
  tok.add_special_tokens(list(specials))
  path.mkdir(parents=True, exist_ok=True)
  tok.save(str(path / "tokenizer.json"))
  return path


def test_hf_defaults_to_the_qwen3_reference_ids(tmp_path):
  tok = tokenizers.load_tokenizer({"kind": "hf", "path": str(_hf_file(tmp_path / "t"))})
  for name, value in tokenizers.QWEN3_SPECIAL_IDS.items():
    assert getattr(tok, name) == value
  assert tok.vocab_size == 151671  # covers <|audio_eos|> = 151670
  assert tok.digit_ids == tuple(range(3, 13))
  assert tok.encode("hello world 42") == [1, 2, 7, 5]
  assert tok.decode([1, 151654, 2, 151669, 151643]) == "hello world"


def test_hf_uses_named_tokens_and_config_ids(tmp_path):
  path = _hf_file(tmp_path / "t", ["<|AUDIO|>", "<|im_start|>"])
  tok = tokenizers.load_tokenizer({"kind": "hf", "path": str(path / "tokenizer.json"),
                                   "im_end_id": 2})
  assert tok.audio_token_id == 13 and tok.im_start_id == 14 and tok.im_end_id == 2
  assert tok.audio_bos_id == 151669  # not in the vocab: the reference id


def test_tokenizers_pickle_for_worker_processes(spm_model, tmp_path):
  for cfg in ({"kind": "sentencepiece", "path": spm_model},
              {"kind": "hf", "path": str(_hf_file(tmp_path / "t")), "pad_id": 0}):
    tok = tokenizers.load_tokenizer(cfg)
    clone = pickle.loads(pickle.dumps(tok))
    assert clone.encode("hello world 7") == tok.encode("hello world 7")
    assert [getattr(clone, n) for n in tokenizers.SPECIAL_NAMES] == [
        getattr(tok, n) for n in tokenizers.SPECIAL_NAMES]


def test_bad_tokenizer_configs(tmp_path):
  with pytest.raises(ValueError, match="path"):
    tokenizers.load_tokenizer({"kind": "hf", "path": ""})
  with pytest.raises(ValueError, match="kind"):
    tokenizers.load_tokenizer({"kind": "bpe", "path": "x"})
  with pytest.raises(FileNotFoundError):
    tokenizers.load_tokenizer({"kind": "hf", "path": str(tmp_path / "nope")})


def test_tokenizer_of_the_other_kind_is_named(spm_model, tmp_path):
  with pytest.raises(UserError, match="kind=sentencepiece"):
    tokenizers.load_tokenizer({"kind": "hf", "path": spm_model}).vocab_size
  hf = _hf_file(tmp_path / "hf") / "tokenizer.json"
  with pytest.raises(UserError, match="kind=hf"):
    tokenizers.load_tokenizer({"kind": "sentencepiece", "path": str(hf)}).vocab_size

"""Chat SFT data: multi-turn messages with system prompts, several audios, reasoning kept as text,
loss on assistant turns only, time markers laid out as inference lays them out, and packing that
changes nothing: a packed row of several chats gives each chat's logits and loss alone.
"""

import json

import jax
import numpy as np
import pytest

from configs import sft
from data_pipelines import make_chat_sft, manifest, packing, pipeline, templates, tokenizers
from moss_jax import batch as batch_lib
from moss_jax import train_step as ts
from moss_jax.model import MossAudioModel, init_params
# The Qwen3-like tokenizer and the spec-literal audio span of the template tests.
from test_templates import A, IM_END, IM_START, qwen_like, spec_audio_span, wave  # noqa: F401

pytestmark = pytest.mark.usefixtures("fast_compiles")
SYSTEM, USER, ASSISTANT, NL = 8948, 872, 77091, 198
BOS, EOS = 151669, 151670


def _parse(tmp_path, record) -> manifest.Sample:
  return manifest.parse_line(json.dumps(record), str(tmp_path / "chat.jsonl"), 1)


def chat_record():
  return {"messages": [
      {"role": "system", "content": "ok"},
      {"role": "user", "content": "<audio>\n<audio>\nWhat?"},
      {"role": "assistant", "content": "Fine.", "loss": False},
      {"role": "user", "content": "What?"},
      {"role": "assistant", "content": "ok", "reasoning_content": "\nHello world.\n"}],
      "audios": ["a.wav", "b.wav"]}


def test_layout_and_loss_mask_of_a_multi_turn_chat(qwen_like, tmp_path):
  sample = _parse(tmp_path, chat_record())
  waves = [wave(4.2), wave(2.5)]  # both over 2 s: time markers after every 25 audio tokens
  enc = templates.encode_sample(sample, waves, qwen_like)
  span = lambda w: [BOS] + spec_audio_span(len(w)) + [EOS]
  think = qwen_like.encode("<think>\nHello world.\n</think>\n\n")
  expected = ([IM_START, SYSTEM, NL, 562, IM_END, NL]
              + [IM_START, USER, NL] + span(waves[0]) + [NL] + span(waves[1]) + [NL, 3838, 30,
                                                                              IM_END, NL]
              + [IM_START, ASSISTANT, NL, 63716, 13, IM_END, NL]
              + [IM_START, USER, NL, 3838, 30, IM_END, NL]
              + [IM_START, ASSISTANT, NL] + think + [562, IM_END])
  assert enc.tokens.tolist() == expected
  assert 15 + 2 in enc.tokens.tolist() and 15 + 4 in enc.tokens.tolist()  # markers '2', '4'
  # Loss: only the last assistant turn (its reasoning, answer and <|im_end|>); "loss": false
  # keeps the first answer as context; no system, user, audio or marker token is a target.
  learned = [int(t) for t, l in zip(enc.tokens, enc.labels) if l != -100]
  assert learned == think + [562, IM_END]
  assert (enc.labels[enc.labels != -100] == enc.tokens[enc.labels != -100]).all()
  # Audio tokens point at consecutive chunks: 4.2 s takes chunks 0-1, 2.5 s chunk 2.
  idx = enc.audio_index[enc.audio_index >= 0]
  assert enc.chunk_audio.tolist() == [0, 0, 1] and idx.max() // 50 == 2


def test_the_training_prompt_is_what_inference_feeds(qwen_like, tmp_path):
  """Generation encodes the prompt with the same template (time markers included): the training
  sequence starts with exactly the ids inference feeds before the model answers."""
  sample = _parse(tmp_path, chat_record())
  waves = [wave(6.0), wave(2.5)]
  full = templates.encode_sample(sample, waves, qwen_like)
  prompt = templates.encode_prompt(sample, waves, qwen_like)
  assert prompt.tokens.tolist()[-3:] == [IM_START, ASSISTANT, NL]
  np.testing.assert_array_equal(prompt.tokens, full.tokens[:prompt.num_tokens])
  np.testing.assert_array_equal(prompt.audio_index, full.audio_index[:prompt.num_tokens])
  # With markers off (the reference's finetune script) the placeholders run unbroken.
  plain = templates.encode_prompt(sample, waves, qwen_like, time_markers=False)
  assert not set(range(15, 25)) & set(plain.tokens.tolist())


@pytest.mark.parametrize("record,reason", [
    ({"messages": [{"role": "user", "content": "x", "loss": True},
                   {"role": "assistant", "content": "y"}]}, "belong on assistant"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": "y", "loss": "no"}]}, "true or false"),
    ({"messages": [{"role": "user", "content": "x"},
                   {"role": "assistant", "content": "y", "loss": False}]}, "no assistant turn"),
])
def test_bad_chat_fields_name_the_problem(tmp_path, record, reason):
  with pytest.raises(manifest.BadRecordError, match=reason):
    _parse(tmp_path, record)


def test_chat_demo_set_parses_and_fits_the_demo_rows():
  config = sft.get_config("lora")
  tok = tokenizers.load_tokenizer(config.data.tokenizer)
  recs = make_chat_sft.records("train")
  assert any(len(r["audios"]) == 2 for r in recs)
  assert any(sum(m["role"] == "assistant" for m in r["messages"]) == 2 for r in recs)
  for i, r in enumerate(recs[:6] + recs[-2:]):
    sample = manifest.parse_line(json.dumps(r), "chat.jsonl", i + 1)
    enc = templates.encode_sample(sample, manifest.load_audios(sample), tok)
    assert enc.num_tokens <= config.data.max_tokens
    assert (enc.labels != -100).any()


def test_a_packed_row_of_chats_equals_each_chat_alone():
  config = sft.get_config("lora")
  config.model.lora.rank = 0  # the base model; LoRA changes no layout
  tok = tokenizers.load_tokenizer(config.data.tokenizer)
  recs = [r for r in make_chat_sft.records("train") if len(r["audios"]) == 2][:1]
  recs += make_chat_sft.records("train")[:3:2]  # one 1-turn and one 2-turn chat
  samples = []
  for i, r in enumerate(recs):
    sample = manifest.parse_line(json.dumps(r), "chat.jsonl", i + 1)
    waves = manifest.load_audios(sample)
    samples.append(pipeline.attach_features(templates.encode_sample(sample, waves, tok), waves,
                                            "waveform"))
  length = sum(s.num_tokens for s in samples)
  chunks = sum(s.num_chunks for s in samples)
  spec = packing.PackSpec(rows=1, max_tokens=length, max_chunks=chunks, pad_id=tok.pad_id)

  def pack(group):
    packer = packing.BatchPacker(spec)
    assert all(packer.try_add(s) for s in group)
    return packer.build()

  model = MossAudioModel(config.model)
  params = init_params(config.model, jax.random.key(0))
  forward = jax.jit(ts.make_forward(model, config.model))
  stats = jax.jit(lambda logits, b: ts.token_stats(logits, b["labels"], b["task_ids"]))
  packed = pack(samples)
  assert packed["segment_ids"].max() == len(samples)
  logits = np.asarray(forward(params, packed))
  start = 0
  for s in samples:
    alone = pack([s])
    want = np.asarray(forward(params, alone))
    n = s.num_tokens
    np.testing.assert_allclose(logits[0, start:start + n], want[0, :n], atol=1e-5, rtol=0)
    # The sample's loss inside the packed row equals its loss alone.
    part = {k: v.copy() for k, v in packed.items()}
    keep = np.zeros_like(part["labels"], bool)
    keep[0, start:start + n] = True
    part["labels"] = np.where(keep, part["labels"], batch_lib.IGNORE_INDEX)
    got_stats, want_stats = stats(logits, part), stats(want, alone)
    assert float(got_stats["tokens"]) == float(want_stats["tokens"]) > 0
    np.testing.assert_allclose(float(got_stats["ce_sum"]), float(want_stats["ce_sum"]),
                               rtol=1e-5)
    start += n

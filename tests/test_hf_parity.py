"""Parity with the PyTorch reference: files written as the official repo writes them load into our
model and give the same logits; our exports load into the reference strictly and round-trip
bit-identically; a plain Qwen3 checkpoint initialises the LLM.

Run `pytest -s -q tests/test_hf_parity.py` to see the measured max abs logit differences.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import torch_reference as tr
from configs import base
from moss_jax import hf, sharding
from moss_jax import model as M
from moss_jax.hf import io, mapping
from moss_jax.hf.safetensors_file import SafetensorsFile

AUDIO_ID, AUDIO_BOS, AUDIO_EOS = 7, 8, 9
DIGITS = list(range(15, 25))  # '0'..'9' as in Qwen's vocab (spec 5.1)
SEQ = 232  # every case is right-filled to this length with text, so compiled shapes repeat
TOL = 1e-4

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
  """(torch model, dir of reference-format files it wrote, our loaded model, params)."""
  path = str(tmp_path_factory.mktemp("ref"))
  ref = tr.random_reference_dir(path, AUDIO_ID, AUDIO_BOS, AUDIO_EOS)
  model, params = hf.load_pretrained(path)
  return ref, path, model, params


def audio_span(n_tokens: int, markers: bool) -> list[int]:
  """bos, placeholders (with a time marker after every 25 when `markers`, spec 5.3), eos."""
  ids, done = [AUDIO_BOS], 0
  if markers:
    for s in range(2, int(n_tokens / 12.5) + 1, 2):
      end = (s // 2) * 25
      ids += [AUDIO_ID] * (end - done) + [DIGITS[int(ch)] for ch in str(s)]
      done = end
  return ids + [AUDIO_ID] * (n_tokens - done) + [AUDIO_EOS]


def prompt(frames: list[int], markers: bool, rng) -> list[int]:
  text = lambda n: rng.integers(30, 300, n).tolist()
  ids = text(6)
  for f in frames:
    ids += audio_span(-(-f // 8), markers) + text(3)
  return ids + text(SEQ - len(ids))


def make_case(frames_per_row: list[list[int]], markers: bool, seed: int):
  rng = np.random.default_rng(seed)
  ids = np.array([prompt(fr, markers, rng) for fr in frames_per_row], np.int64)
  lengths = [f for fr in frames_per_row for f in fr]
  mel = np.zeros((len(lengths), 128, max(lengths)), np.float32)
  for a, n in enumerate(lengths):
    mel[a, :, :n] = np.clip(rng.normal(0.0, 0.5, (128, n)), -1.5, 1.5)
  return ids, mel, np.array(lengths)


def torch_logits(ref, ids, mel, lengths) -> np.ndarray:
  with torch.no_grad():
    return ref(torch.from_numpy(ids), torch.from_numpy(mel), torch.from_numpy(lengths)).numpy()


CASES = {
    "clip_1.28s": ([[128]], False),
    "clip_4s": ([[400]], False),
    "clip_9.68s_three_chunks": ([[968]], False),
    "two_clips_one_prompt": ([[968, 131]], False),  # odd tail: padding reaches the conv stem
    "time_markers_two_clips": ([[968, 300]], True),
    "two_rows": ([[400], [968]], True),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_logits_match_pytorch(reference, case):
  ref, path, model, params = reference
  frames, markers = CASES[case]
  ids, mel, lengths = make_case(frames, markers, seed=len(case))
  if markers:
    assert DIGITS[2] in ids[0]  # the layout really carries markers
  want = torch_logits(ref, ids, mel, lengths)
  # 4 chunk slots for every case: fewer compiled shapes (empty slots are ignored).
  got = np.asarray(hf.reference_logits(model, params, ids, mel, lengths, pretrained_dir=path,
                                       num_chunk_slots=4))
  diff = float(np.abs(got - want).max())
  print(f"\n{case}: max abs diff {diff:.3e} (logit scale {np.abs(want).max():.2f})")
  assert got.shape == want.shape
  assert diff <= TOL


def test_audio_actually_matters(reference):
  """Guards the parity test: different mel -> different logits after the audio span."""
  ref, path, model, params = reference
  ids, mel, lengths = make_case([[128]], False, seed=3)
  a = np.asarray(hf.reference_logits(model, params, ids, mel, lengths, AUDIO_ID, num_chunk_slots=4))
  b = np.asarray(hf.reference_logits(model, params, ids, mel * 0.5, lengths, AUDIO_ID,
                                     num_chunk_slots=4))
  assert np.abs(a - b)[0, 30:].max() > 1e-2


def test_save_pretrained_loads_strictly_into_pytorch(reference, tmp_path):
  ref, path, model, params = reference
  out = str(tmp_path / "export")
  files = hf.save_pretrained(out, model, params, dtype=jnp.float32,
                             token_ids=dict(audio_token_id=AUDIO_ID, audio_start_id=AUDIO_BOS,
                                            audio_end_id=AUDIO_EOS, bos_token_id=1, eos_token_id=2))
  assert files == ["model.safetensors"]
  from safetensors import safe_open
  from safetensors.torch import load_file
  with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
    assert f.metadata() == {"format": "pt"}
  with open(os.path.join(out, "config.json")) as f:
    config = json.load(f)
  with open(os.path.join(out, "processor_config.json")) as f:
    proc = json.load(f)
  assert config["architectures"] == ["MossAudioModel"] and proc["audio_token_id"] == AUDIO_ID
  again = tr.TorchMossAudio(config, audio_token_id=proc["audio_token_id"])
  again.load_state_dict(load_file(os.path.join(out, "model.safetensors")), strict=True)
  again.eval()
  ids, mel, lengths = make_case([[968, 128]], True, seed=5)
  np.testing.assert_array_equal(torch_logits(again, ids, mel, lengths),
                                torch_logits(ref, ids, mel, lengths))


def _assert_same_tree(a, b):
  fa, fb = mapping.flatten_leaves(a), mapping.flatten_leaves(b)
  assert fa.keys() == fb.keys()
  for k in fa:
    assert fa[k].dtype == fb[k].dtype, k
    np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=str(k))


@pytest.mark.parametrize("scan", [True, False])
def test_load_save_load_is_bit_identical(reference, tmp_path, scan):
  _, path, _, _ = reference
  model, params = hf.load_pretrained(path, config_overrides={"scan_layers": scan})
  assert mapping.tree_is_scanned(params) == scan
  hf.save_pretrained(str(tmp_path), model, params, dtype=jnp.float32)
  model2, params2 = hf.load_pretrained(str(tmp_path), config_overrides={"scan_layers": scan})
  _assert_same_tree(params, params2)
  src, dst = io.CheckpointReader(path), io.CheckpointReader(str(tmp_path))
  assert sorted(src.keys()) == sorted(dst.keys()) and len(src.keys()) == 129
  for name in src.keys():
    assert src.raw_bytes(name) == dst.raw_bytes(name), name


def test_sharded_save_writes_an_index_and_loads_back(reference, tmp_path):
  _, _, model, params = reference
  files = hf.save_pretrained(str(tmp_path), model, params, dtype=jnp.bfloat16,
                             max_shard_size="150KB")
  assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
  assert not os.path.exists(tmp_path / "model.safetensors")
  with open(tmp_path / "model.safetensors.index.json") as f:
    index = json.load(f)
  assert set(index["weight_map"].values()) == set(files) and len(index["weight_map"]) == 129
  sizes = 0
  for fname in files:
    st = SafetensorsFile(str(tmp_path / fname))
    assert st.metadata == {"format": "pt"} and os.path.getsize(tmp_path / fname) < 150_000 + 20_000
    sizes += sum(int(np.prod(st.shape(k))) * 2 for k in st.keys())
    assert all(st.header[k]["dtype"] == "BF16" for k in st.keys())
  assert index["metadata"]["total_size"] == sizes
  _, loaded = hf.load_pretrained(str(tmp_path))
  want = jax.tree.map(lambda x: np.asarray(x.astype(jnp.bfloat16).astype(jnp.float32)), params)
  _assert_same_tree(want, loaded)
  with open(tmp_path / "config.json") as f:
    assert json.load(f)["dtype"] == "bfloat16"
  # Saving again unsharded into the same dir removes the stale shards and index.
  hf.save_pretrained(str(tmp_path), model, params, dtype=jnp.float32)
  assert not any(n.startswith("model-") or n.endswith("index.json") for n in os.listdir(tmp_path))


def test_mismatched_checkpoint_errors_name_every_tensor(reference, tmp_path):
  ref, path, _, _ = reference
  from safetensors.torch import save_file
  state = {k: v.clone() for k, v in ref.state_dict().items()}
  del state["audio_encoder.layers.2.fc1.bias"]
  state["audio_encoder.out_proj.weight"] = torch.zeros(64, 64)
  state["language_model.layers.1.self_attn.k_proj.weight"] = torch.zeros(16, 48)
  shutil.copytree(path, tmp_path / "bad")
  save_file(state, str(tmp_path / "bad" / "model.safetensors"), metadata={"format": "pt"})
  with pytest.raises(hf.CheckpointMismatchError) as err:
    hf.load_pretrained(str(tmp_path / "bad"))
  msg = str(err.value)
  for name in ("audio_encoder.layers.2.fc1.bias", "audio_encoder.out_proj.weight",
               "language_model.layers.1.self_attn.k_proj.weight: file (16, 48), expected (32, 48)"):
    assert name in msg, msg


def test_save_rejects_a_tree_with_extra_or_missing_leaves(reference, tmp_path):
  _, _, model, params = reference
  bad = jax.tree.map(lambda x: x, params)
  bad["audio_encoder"]["layers"]["self_attn"]["k_proj"]["bias"] = jnp.zeros((4, 64))
  del bad["lm_head"]
  with pytest.raises(hf.CheckpointMismatchError, match="lm_head/kernel.*k_proj/bias"):
    hf.save_pretrained(str(tmp_path), model, bad)


_TEXT_APPLY = {}


def _text_apply(model):
  if "fn" not in _TEXT_APPLY:
    _TEXT_APPLY["fn"] = jax.jit(model.apply)
  return _TEXT_APPLY["fn"]


@pytest.mark.parametrize("tied", [True, False])
def test_qwen3_causal_lm_initialises_the_llm(reference, tmp_path, tied):
  from transformers import Qwen3Config, Qwen3ForCausalLM
  _, _, model, params = reference  # the base tree; its LLM leaves get replaced
  lang = {k: v for k, v in tr.tiny_reference_config()["language_config"].items()
          if k not in ("architectures", "model_type")}
  lang["tie_word_embeddings"] = tied
  qcfg = Qwen3Config(**lang)
  qcfg._attn_implementation = "eager"
  torch.manual_seed(0)
  qwen = Qwen3ForCausalLM(qcfg)
  tr.randomize_(qwen, seed=2)
  qwen.eval()
  qwen.save_pretrained(str(tmp_path), safe_serialization=True)
  from safetensors import safe_open
  with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
    assert ("lm_head.weight" in f.keys()) == (not tied)
  loaded = hf.load_qwen3_llm(str(tmp_path), params)
  up = ("audio_adapter", "up_proj", "kernel")
  assert mapping.get_leaf(loaded, up) is mapping.get_leaf(params, up)
  np.testing.assert_array_equal(np.asarray(loaded["language_model"]["norm"]["scale"]),
                                qwen.model.norm.weight.detach().numpy())
  ids = np.random.default_rng(0).integers(0, 300, (2, 40))
  with torch.no_grad():
    want = qwen(torch.from_numpy(ids)).logits.numpy()
  pos = np.broadcast_to(np.arange(40, dtype=np.int32), (2, 40))
  got = np.asarray(_text_apply(model)({"params": loaded}, jnp.asarray(ids, jnp.int32),
                                      jnp.asarray(pos), jnp.ones((2, 40), jnp.int32)))
  diff = float(np.abs(got - want).max())
  print(f"\nqwen3 text-only (tied={tied}): max abs diff {diff:.3e}")
  assert diff <= TOL
  # An abstract tree works too: LLM leaves become arrays, the rest stays abstract.
  abstract = M.abstract_params(model.config)
  filled = hf.load_qwen3_llm(str(tmp_path), abstract)
  assert isinstance(filled["lm_head"]["kernel"], jax.Array)
  assert isinstance(filled["audio_adapter"]["up_proj"]["kernel"], jax.ShapeDtypeStruct)
  np.testing.assert_array_equal(np.asarray(filled["lm_head"]["kernel"]),
                                np.asarray(loaded["lm_head"]["kernel"]))


def test_load_onto_a_mesh_and_export_from_sharded_params(reference, tmp_path):
  """On an 8-device fsdp mesh each leaf is placed sharded; exporting gathers it bit-exactly."""
  _, path, _, _ = reference
  mesh = sharding.make_mesh(base.mesh_config())
  model, params = hf.load_pretrained(path, mesh=mesh)
  q = params["language_model"]["layers"]["self_attn"]["q_proj"]["kernel"]  # [layers, embed, heads]
  path_q = ("language_model", "layers", "self_attn", "q_proj", "kernel")
  want = mapping.get_leaf(M.param_shardings(model.config, mesh), path_q)
  assert q.sharding.spec == want.spec
  assert len(q.sharding.device_set) == 8 and not q.sharding.is_fully_replicated
  hf.save_pretrained(str(tmp_path), model, params, dtype=jnp.float32)
  src, dst = io.CheckpointReader(path), io.CheckpointReader(str(tmp_path))
  assert all(src.raw_bytes(n) == dst.raw_bytes(n) for n in src.keys())


def test_qwen3_checkpoint_that_does_not_fit_names_the_leaves(reference, tmp_path):
  from transformers import Qwen3Config, Qwen3ForCausalLM
  _, _, _, params = reference
  lang = {k: v for k, v in tr.tiny_reference_config()["language_config"].items()
          if k not in ("architectures", "model_type", "layer_types")}
  lang.update(num_hidden_layers=3, max_window_layers=3)
  Qwen3ForCausalLM(Qwen3Config(**lang)).save_pretrained(str(tmp_path), safe_serialization=True)
  want = r"language_model/layers/mlp/up_proj/kernel: tree \(4, 48, 96\)"
  with pytest.raises(hf.CheckpointMismatchError, match=want):
    hf.load_qwen3_llm(str(tmp_path), params)

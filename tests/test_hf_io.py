"""HF format pieces without the PyTorch model: name table, config I/O, files, input planning."""

import json
import os

import ml_dtypes
import numpy as np
import pytest

from configs import base
from moss_jax.hf import config_io, io, mapping, reference
from moss_jax.hf.safetensors_file import SafetensorsFile, write_file

# Spec 6.1 (4B, torch layout).
SPEC_4B_SHAPES = {
    "audio_encoder.conv1.weight": (480, 1, 3, 3), "audio_encoder.conv1.bias": (480,),
    "audio_encoder.conv2.weight": (480, 480, 3, 3), "audio_encoder.conv3.bias": (480,),
    "audio_encoder.stem_proj.weight": (1280, 7680), "audio_encoder.stem_proj.bias": (1280,),
    "audio_encoder.layers.0.self_attn_layer_norm.weight": (1280,),
    "audio_encoder.layers.31.self_attn.q_proj.weight": (1280, 1280),
    "audio_encoder.layers.31.self_attn.q_proj.bias": (1280,),
    "audio_encoder.layers.7.self_attn.k_proj.weight": (1280, 1280),
    "audio_encoder.layers.7.self_attn.v_proj.bias": (1280,),
    "audio_encoder.layers.7.self_attn.out_proj.weight": (1280, 1280),
    "audio_encoder.layers.7.final_layer_norm.bias": (1280,),
    "audio_encoder.layers.7.fc1.weight": (5120, 1280), "audio_encoder.layers.7.fc1.bias": (5120,),
    "audio_encoder.layers.7.fc2.weight": (1280, 5120), "audio_encoder.layers.7.fc2.bias": (1280,),
    "audio_encoder.layer_norm.weight": (1280,), "audio_encoder.layer_norm.bias": (1280,),
    "audio_adapter.gate_proj.weight": (8192, 1280), "audio_adapter.up_proj.weight": (8192, 1280),
    "audio_adapter.down_proj.weight": (2560, 8192),
    "deepstack_audio_merger_list.2.down_proj.weight": (2560, 8192),
    "language_model.embed_tokens.weight": (151936, 2560),
    "language_model.layers.35.input_layernorm.weight": (2560,),
    "language_model.layers.35.self_attn.q_proj.weight": (4096, 2560),
    "language_model.layers.35.self_attn.q_norm.weight": (128,),
    "language_model.layers.35.self_attn.k_proj.weight": (1024, 2560),
    "language_model.layers.35.self_attn.k_norm.weight": (128,),
    "language_model.layers.35.self_attn.v_proj.weight": (1024, 2560),
    "language_model.layers.35.self_attn.o_proj.weight": (2560, 4096),
    "language_model.layers.35.post_attention_layernorm.weight": (2560,),
    "language_model.layers.35.mlp.gate_proj.weight": (9728, 2560),
    "language_model.layers.35.mlp.up_proj.weight": (9728, 2560),
    "language_model.layers.35.mlp.down_proj.weight": (2560, 9728),
    "language_model.norm.weight": (2560,), "lm_head.weight": (151936, 2560),
}


def test_4b_manifest_has_the_901_reference_names_and_shapes():
  manifest = mapping.hf_manifest(base.model_config("4b"))
  assert len(manifest) == 901
  for name, shape in SPEC_4B_SHAPES.items():
    assert manifest[name] == shape, name
  enc = [n for n in manifest if n.startswith("audio_encoder.")]
  llm = [n for n in manifest if n.startswith("language_model.")]
  assert (len(enc), len(llm)) == (490, 398)
  assert sum(n.startswith(("audio_adapter.", "deepstack_")) for n in manifest) == 12
  assert not [n for n in manifest if "k_proj.bias" in n or n.startswith("audio_encoder.out_proj")
              or "embed_positions" in n]
  # Spec 4: 5.223 B parameters for 4B, 9.052 B for 8B.
  assert sum(int(np.prod(s)) for s in manifest.values()) == 5_222_820_736
  m8 = mapping.hf_manifest(base.model_config("8b"))
  assert len(m8) == 901 and m8["audio_adapter.down_proj.weight"] == (4096, 8192)
  assert sum(int(np.prod(s)) for s in m8.values()) == 9_052_463_488


@pytest.mark.parametrize("scan", [True, False])
def test_table_matches_the_model_param_tree_for_4b(scan):
  """The table's Flax paths/shapes equal the model's abstract tree (eval_shape: no allocation)."""
  from moss_jax.model import abstract_params
  cfg = base.model_config("4b")
  cfg.scan_layers = scan
  tree = abstract_params(cfg)
  got = {p: tuple(v.shape) for p, v in mapping.flatten_leaves(tree).items()}
  assert got == mapping.flax_shapes(cfg)
  assert mapping.tree_is_scanned(tree) == scan


def test_scanned_and_unrolled_entries_name_the_same_tensors():
  cfg = base.model_config("tiny")
  scanned, unrolled = mapping.entries(cfg, True), mapping.entries(cfg, False)
  assert [e.hf_key for e in scanned] == [e.hf_key for e in unrolled]
  by = {e.hf_key: e for e in scanned}
  e = by["audio_encoder.layers.3.fc1.weight"]
  assert e.flax_path == ("audio_encoder", "layers", "fc1", "kernel") and e.stack_index == 3
  u = {e.hf_key: e for e in unrolled}["audio_encoder.layers.3.fc1.weight"]
  assert u.flax_path == ("audio_encoder", "layers_3", "fc1", "kernel") and u.stack_index is None
  m = by["deepstack_audio_merger_list.1.up_proj.weight"]
  assert m.flax_path == ("deepstack_audio_merger_list_1", "up_proj", "kernel")
  assert len(mapping.entries(cfg, parts=mapping.LLM_PARTS)) == 2 + 11 * 4 + 1


def test_layout_transforms_invert_and_follow_torch():
  rng = np.random.default_rng(0)
  conv = rng.normal(size=(3, 3, 2, 5))  # HWIO
  torch_conv = mapping.to_hf(mapping.CONV, conv)
  assert torch_conv.shape == (5, 2, 3, 3)
  assert torch_conv[4, 1, 0, 2] == conv[0, 2, 1, 4]  # [out, in, h, w] == [h, w, in, out]
  np.testing.assert_array_equal(mapping.from_hf(mapping.CONV, torch_conv), conv)
  dense = rng.normal(size=(3, 7))
  assert mapping.to_hf(mapping.LINEAR, dense).shape == (7, 3)
  back = mapping.from_hf(mapping.LINEAR, mapping.to_hf(mapping.LINEAR, dense))
  np.testing.assert_array_equal(back, dense)
  assert mapping.flax_shape(mapping.CONV, (5, 2, 3, 3)) == (3, 3, 2, 5)


def test_config_json_round_trip_and_reference_fields():
  cfg = base.model_config("4b")
  hf = config_io.hf_config_from_model(cfg, "bfloat16")
  assert hf["architectures"] == ["MossAudioModel"] and hf["model_type"] == "moss_audio"
  assert hf["tie_word_embeddings"] is False and hf["dtype"] == "bfloat16"
  assert "hidden_size" not in hf and hf["num_hidden_layers"] == 36 and hf["vocab_size"] == 151936
  assert len(hf["audio_config"]) == 18 and "n_window" not in hf["audio_config"]
  assert hf["audio_config"]["deepstack_encoder_layer_indexes"] == [8, 16, 24]
  lang = hf["language_config"]
  assert lang["model_type"] == "qwen3" and lang["layer_types"] == ["full_attention"] * 36
  assert (lang["bos_token_id"], lang["eos_token_id"]) == (151643, 151645)
  back = config_io.model_config_from_hf(json.loads(json.dumps(hf)))
  for section in ("audio", "text"):
    assert back[section].to_dict() == cfg[section].to_dict(), section
  assert back.adapter_hidden_size == 8192 and back.deepstack_num_inject_layers == 3
  proc = config_io.processor_config()
  ids = (proc["audio_token_id"], proc["audio_start_id"], proc["audio_end_id"])
  assert ids == (151654, 151669, 151670)
  assert proc["mel_config"]["mel_dtype"] == "bfloat16" and proc["enable_time_marker"] is True


def test_config_rejects_what_the_model_cannot_run():
  hf = config_io.hf_config_from_model(base.model_config("tiny"))
  hf["audio_config"]["output_dim"] = 7
  hf["language_config"]["rope_scaling"] = {"type": "yarn", "factor": 4.0}
  with pytest.raises(ValueError, match="output_dim.*rope_scaling"):
    config_io.model_config_from_hf(hf)


def test_overrides_nested_and_dotted():
  cfg = config_io.apply_overrides(base.model_config("tiny"),
                                  {"dtype": "bfloat16", "text.rope_theta": 10.0,
                                   "audio": {"encoder_layers": 2}})
  assert (cfg.dtype, cfg.text.rope_theta, cfg.audio.encoder_layers) == ("bfloat16", 10.0, 2)
  with pytest.raises(KeyError, match="no_such"):
    config_io.apply_overrides(base.model_config("tiny"), {"text.no_such": 1})


def test_safetensors_writer_reads_back_with_the_safetensors_package(tmp_path):
  from safetensors.numpy import load_file, save_file
  rng = np.random.default_rng(0)
  tensors = {"a.weight": rng.normal(size=(3, 5)).astype(np.float32),
             "b.bias": rng.normal(size=(7,)).astype(ml_dtypes.bfloat16)}
  path = str(tmp_path / "x.safetensors")
  write_file(path, [(k, v.shape, v.dtype) for k, v in tensors.items()], tensors.__getitem__,
             metadata={"format": "pt"})
  ours = SafetensorsFile(path)
  assert ours.metadata == {"format": "pt"}
  for k, v in tensors.items():
    np.testing.assert_array_equal(ours.get(k), v)
  import torch
  from safetensors.torch import load_file as torch_load
  t = torch_load(path)
  np.testing.assert_array_equal(t["a.weight"].numpy(), tensors["a.weight"])
  assert t["b.bias"].dtype == torch.bfloat16
  np.testing.assert_array_equal(t["b.bias"].float().numpy(), tensors["b.bias"].astype(np.float32))
  # And the other way: a file from the package reads with ours.
  save_file({"c": tensors["a.weight"]}, str(tmp_path / "y.safetensors"))
  theirs = SafetensorsFile(str(tmp_path / "y.safetensors"))
  np.testing.assert_array_equal(theirs.get("c"), tensors["a.weight"])
  assert load_file(path)["a.weight"].shape == (3, 5)


def test_shard_planning_and_sizes():
  assert io.parse_size("5GB") == 5 * 10 ** 9 and io.parse_size("2MiB") == 2 * 2 ** 20
  assert io.parse_size(123) == 123
  plan = io.plan_shards([("a", 40), ("b", 40), ("c", 150), ("d", 10)], 100)
  assert plan == [["a", "b"], ["c"], ["d"]]


def test_plan_reference_inputs_chunks_pads_to_global_max_and_indexes_row_major():
  tid = 5
  # Row 0: a 968-frame audio (121 tokens) then 3 of the 128-frame audio's 16; row 1: the other 13.
  ids = np.full((2, 140), 1, np.int32)
  ids[0, 2:123] = tid
  ids[0, 130:133] = tid
  ids[1, 4:17] = tid
  mel = np.random.default_rng(0).normal(size=(2, 128, 968)).astype(np.float32)
  out = reference.plan_reference_inputs(ids, mel, [968, 128], tid)
  assert out["audio_mel"].shape == (2, 4, 128, 400)  # global max chunk 400 -> every chunk padded
  assert out["audio_chunk_frames"].tolist() == [[400, 400, 168, 128], [128, 0, 0, 0]]
  np.testing.assert_array_equal(out["audio_mel"][0, 2, :, :168], mel[0, :, 800:968])
  assert not out["audio_mel"][0, 2, :, 168:].any()
  np.testing.assert_array_equal(out["audio_mel"][1, 0, :, :128], mel[1, :, :128])
  idx = out["audio_token_index"]
  assert idx[0, 2:123].tolist() == list(range(50)) + list(range(50, 100)) + list(range(100, 121))
  assert idx[0, 130:133].tolist() == [150, 151, 152]  # slot 3, tokens 0..2
  assert idx[1, 4:17].tolist() == list(range(3, 16))  # same chunk, tokens 3..15, slot 0
  assert (idx[ids != tid] == -1).all()
  assert out["positions"][1].tolist() == list(range(140)) and (out["segment_ids"] == 1).all()
  # A short-only call pads to its own longest chunk, not to 400.
  short = reference.plan_reference_inputs(ids[:1, :20] * 0 + np.array([tid] * 16 + [1] * 4),
                                          mel[:1], [128], tid)
  assert short["audio_mel"].shape == (1, 1, 128, 128)
  padded = reference.plan_reference_inputs(ids, mel, [968, 128], tid, num_chunk_slots=6)
  assert padded["audio_chunk_frames"].shape == (2, 6)
  assert padded["audio_chunk_frames"][0, 4:].sum() == 0
  np.testing.assert_array_equal(padded["audio_token_index"], idx)
  with pytest.raises(ValueError, match="needs 4 chunk slots"):
    reference.plan_reference_inputs(ids, mel, [968, 128], tid, num_chunk_slots=3)


def test_plan_reference_inputs_rejects_count_mismatch():
  ids = np.array([[5] * 15 + [1]])
  with pytest.raises(ValueError, match="15 audio placeholders .* 16 tokens"):
    reference.plan_reference_inputs(ids, np.zeros((1, 128, 128), np.float32), [128], 5)


def test_token_ids_come_from_processor_config(tmp_path):
  assert reference.audio_token_id_for() == 151654
  config_io.write_json(os.path.join(tmp_path, "processor_config.json"),
                       config_io.processor_config({"audio_token_id": 9}))
  assert reference.audio_token_id_for(pretrained_dir=str(tmp_path)) == 9
  assert reference.audio_token_id_for(3, str(tmp_path)) == 3

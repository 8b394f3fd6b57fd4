"""Reference config files (config.json, processor_config.json, generation_config.json) <-> ours.

The reference config.json (spec 6.2) holds an `audio_config` (Whisper-style encoder fields), a
`language_config` (a Qwen3 config) and a few top-level fields. Reading it yields our
`config.model` ConfigDict; writing produces the same keys the released repos carry, so the
official `MossAudioConfig` and vLLM read our exports. Settings our model cannot reproduce
(sliding windows, RoPE scaling, an encoder out_proj, attention biases) raise instead of being
silently ignored.
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping

import ml_collections
import numpy as np

from moss_jax import batch as batch_lib
from moss_jax import model_config as model_config_lib

TRANSFORMERS_VERSION = "4.57.1"
_IDS = model_config_lib.QWEN3_SPECIAL_IDS
DEFAULT_TOKEN_IDS = dict(
    audio_token_id=_IDS["audio_token_id"],
    audio_start_id=_IDS["audio_bos_id"],
    audio_end_id=_IDS["audio_eos_id"],
    bos_token_id=_IDS["pad_id"],  # 151643 <|endoftext|>
    eos_token_id=_IDS["im_end_id"])  # 151645 <|im_end|>


def _dtype_name(dtype) -> str:
  return np.dtype(dtype).name if not isinstance(dtype, str) else dtype


def model_config_from_hf(config: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """config.json (reference fields) -> our config.model.

  Every shape comes from the file; the fields the file does not carry (scan_layers,
  remat_policy, mel_dtype, ...) take the schema's defaults (moss_jax/model_config.py), and the
  dtypes are float32 until the caller picks others.
  """
  a, t = config["audio_config"], config["language_config"]
  problems = _unsupported(config)
  if problems:
    raise ValueError("config.json asks for what this model does not implement: "
                     + "; ".join(problems))
  audio = dict(
      num_mel_bins=int(a["num_mel_bins"]),
      layer_norm_eps=float(a.get("layer_norm_eps", 1e-5)),
      d_model=int(a["d_model"]),
      encoder_layers=int(a["encoder_layers"]),
      encoder_attention_heads=int(a["encoder_attention_heads"]),
      encoder_ffn_dim=int(a["encoder_ffn_dim"]),
      downsample_hidden_size=int(a["downsample_hidden_size"]),
      deepstack_encoder_layer_indexes=tuple(int(i) for i in a["deepstack_encoder_layer_indexes"]))
  text = {key: int(t[key]) for key in (
      "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
      "num_attention_heads", "num_key_value_heads", "max_position_embeddings")}
  text.update(head_dim=int(t.get("head_dim") or t["hidden_size"] // t["num_attention_heads"]),
              rope_theta=float(t.get("rope_theta", 10000.0)),
              rms_norm_eps=float(t.get("rms_norm_eps", 1e-6)))
  return model_config_lib.model_config(
      audio=audio, text=text, adapter_hidden_size=int(config["adapter_hidden_size"]),
      deepstack_num_inject_layers=int(config.get("deepstack_num_inject_layers", 3)),
      dtype="float32", param_dtype="float32")


def _unsupported(config: Mapping[str, Any]) -> list[str]:
  a, t = config["audio_config"], config["language_config"]
  out = []
  if a.get("output_dim", a["d_model"]) != a["d_model"]:
    out.append("audio_config.output_dim != d_model (an encoder out_proj)")
  if (a.get("downsample_rate", batch_lib.DOWNSAMPLE) != batch_lib.DOWNSAMPLE
      or a["num_mel_bins"] != batch_lib.NUM_MEL_BINS):
    out.append(f"the conv stem needs {batch_lib.NUM_MEL_BINS} mel bins and downsample_rate "
               f"{batch_lib.DOWNSAMPLE}")
  if 2 * a.get("n_window", batch_lib.CHUNK_FRAMES // 2) != batch_lib.CHUNK_FRAMES:
    out.append(f"n_window {a['n_window']} (the batch schema fixes {batch_lib.CHUNK_FRAMES}-frame "
               "chunks: n_window 200)")
  if a.get("activation_function", "gelu") != "gelu":
    out.append(f"audio activation {a['activation_function']!r} (gelu only)")
  if t.get("hidden_act", "silu") != "silu":
    out.append(f"language hidden_act {t['hidden_act']!r} (silu only)")
  if t.get("attention_bias", False):
    out.append("language attention_bias")
  if t.get("rope_scaling"):
    out.append(f"rope_scaling {t['rope_scaling']}")
  layer_types = t.get("layer_types") or []
  if t.get("use_sliding_window", False) or any(x != "full_attention" for x in layer_types):
    out.append("sliding-window attention")
  if config.get("tie_word_embeddings", False):
    out.append("tie_word_embeddings at top level (the reference has a separate lm_head)")
  return out


def hf_config_from_model(model_config, dtype="bfloat16", token_ids: Mapping[str, int] | None = None
                         ) -> dict[str, Any]:
  """Our config.model -> config.json with the reference fields (spec 6.2)."""
  ids = dict(DEFAULT_TOKEN_IDS, **(token_ids or {}))
  a, t, dtype = model_config.audio, model_config.text, _dtype_name(dtype)
  audio = dict(
      d_model=a.d_model, output_dim=a.d_model, num_mel_bins=a.num_mel_bins,
      encoder_layers=a.encoder_layers, encoder_attention_heads=a.encoder_attention_heads,
      encoder_ffn_dim=a.encoder_ffn_dim, downsample_rate=batch_lib.DOWNSAMPLE,
      downsample_hidden_size=a.downsample_hidden_size, encoder_attention_window_size=100,
      max_source_positions=1500, dropout=0.1, attention_dropout=0.1, activation_dropout=0.0,
      activation_function="gelu", layer_norm_eps=a.layer_norm_eps, _attn_implementation="eager",
      pretrained_path="", deepstack_encoder_layer_indexes=list(a.deepstack_encoder_layer_indexes))
  language = dict(
      architectures=["Qwen3ForCausalLM"], model_type="qwen3", attention_bias=False,
      attention_dropout=0.0, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
      head_dim=t.head_dim, hidden_act="silu", hidden_size=t.hidden_size, initializer_range=0.02,
      intermediate_size=t.intermediate_size, layer_types=["full_attention"] * t.num_hidden_layers,
      max_position_embeddings=t.max_position_embeddings, max_window_layers=t.num_hidden_layers,
      num_attention_heads=t.num_attention_heads, num_hidden_layers=t.num_hidden_layers,
      num_key_value_heads=t.num_key_value_heads, rms_norm_eps=t.rms_norm_eps, rope_scaling=None,
      rope_theta=t.rope_theta, sliding_window=None, tie_word_embeddings=False, dtype=dtype,
      use_cache=True, use_sliding_window=False, vocab_size=t.vocab_size)
  return dict(
      architectures=["MossAudioModel"], model_type="moss_audio",
      auto_map=dict(AutoConfig="configuration_moss_audio.MossAudioConfig",
                    AutoProcessor="processing_moss_audio.MossAudioProcessor"),
      adapter_hidden_size=model_config.adapter_hidden_size,
      deepstack_num_inject_layers=model_config.deepstack_num_inject_layers, ignore_index=batch_lib.IGNORE_INDEX,
      dtype=dtype, bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
      num_hidden_layers=t.num_hidden_layers, vocab_size=t.vocab_size, tie_word_embeddings=False,
      transformers_version=TRANSFORMERS_VERSION, audio_config=audio, language_config=language)


def processor_config(token_ids: Mapping[str, int] | None = None, enable_time_marker: bool = True
                     ) -> dict[str, Any]:
  """processor_config.json (spec 6.2)."""
  ids = dict(DEFAULT_TOKEN_IDS, **(token_ids or {}))
  return dict(
      processor_class="MossAudioProcessor",
      auto_map=dict(AutoProcessor="processing_moss_audio.MossAudioProcessor"),
      mel_config=dict(mel_sr=batch_lib.SAMPLE_RATE, mel_dim=batch_lib.NUM_MEL_BINS,
                      mel_n_fft=batch_lib.N_FFT, mel_hop_length=batch_lib.HOP_LENGTH,
                      mel_dtype="bfloat16", use_whisper_feature_extractor=True),
      enable_time_marker=enable_time_marker, audio_token_id=ids["audio_token_id"],
      audio_start_id=ids["audio_start_id"], audio_end_id=ids["audio_end_id"])


def generation_config(token_ids: Mapping[str, int] | None = None) -> dict[str, Any]:
  """generation_config.json: the released one sets only bos/eos (spec 5.1)."""
  ids = dict(DEFAULT_TOKEN_IDS, **(token_ids or {}))
  return dict(bos_token_id=ids["bos_token_id"], eos_token_id=ids["eos_token_id"],
              transformers_version=TRANSFORMERS_VERSION)


def read_json(path: str) -> dict[str, Any]:
  with open(path) as f:
    return json.load(f)


def write_json(path: str, obj: Mapping[str, Any]) -> None:
  with open(path, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=False)
    f.write("\n")


def read_token_ids(directory: str) -> dict[str, int]:
  """Special ids of a checkpoint dir: processor_config.json, then config.json, then the defaults."""
  ids = dict(DEFAULT_TOKEN_IDS)
  cfg_path = os.path.join(directory, "config.json")
  if os.path.exists(cfg_path):
    cfg = read_json(cfg_path)
    ids.update({k: cfg[k] for k in ("bos_token_id", "eos_token_id") if isinstance(cfg.get(k), int)})
  proc_path = os.path.join(directory, "processor_config.json")
  if os.path.exists(proc_path):
    proc = read_json(proc_path)
    ids.update({k: int(proc[k]) for k in ("audio_token_id", "audio_start_id", "audio_end_id")
                if k in proc})
  return ids


def apply_overrides(model_config, overrides: Mapping[str, Any] | None) -> ml_collections.ConfigDict:
  """Applies {"dtype": "bfloat16", "audio.encoder_layers": 2, "text": {...}} style overrides."""
  c = ml_collections.ConfigDict(model_config.to_dict())
  if hasattr(overrides, "to_dict"):
    overrides = overrides.to_dict()
  for key, value in _flatten(overrides or {}).items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    if leaf not in node:
      raise KeyError(f"config override {key!r}: no such field in config.model")
    node[leaf] = value
  return c


def _flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in dict(d).items():
    if isinstance(v, Mapping):
      out.update(_flatten(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out

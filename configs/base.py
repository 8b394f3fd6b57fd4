"""Model shapes and the config sections every recipe shares (pretrain.py and sft.py build on these)."""

from __future__ import annotations

import ml_collections

# Reference special ids for the Qwen3 tokenizer (spec section 5.1).
QWEN3_SPECIAL_IDS = dict(
    audio_token_id=151654, audio_bos_id=151669, audio_eos_id=151670,
    im_start_id=151644, im_end_id=151645, pad_id=151643)


def audio_encoder_config(size: str) -> ml_collections.ConfigDict:
  """The audio encoder: reference shapes for '4b'/'8b' (same encoder), tiny for 'demo'/'tiny'."""
  c = ml_collections.ConfigDict()
  c.num_mel_bins = 128
  c.chunk_frames = 400  # 2 * n_window; chunks are encoded independently
  c.layer_norm_eps = 1e-5
  c.mel_dtype = "bfloat16"  # the reference processor rounds the mel to bf16 before the stem
  # auto | conv | patches: how the conv stem runs (moss_jax/model/encoder.py:stem_impl); auto
  # picks a patch matmul on CPU from 32 channels, where XLA's strided-conv backward is slow.
  c.conv_stem_impl = "auto"
  if size in ("4b", "8b"):
    c.d_model = 1280
    c.encoder_layers = 32
    c.encoder_attention_heads = 20
    c.encoder_ffn_dim = 5120
    c.downsample_hidden_size = 480
    c.deepstack_encoder_layer_indexes = (8, 16, 24)
  elif size in ("demo", "tiny"):
    c.d_model = 96
    c.encoder_layers = 4
    c.encoder_attention_heads = 4
    c.encoder_ffn_dim = 256
    c.downsample_hidden_size = 32
    c.deepstack_encoder_layer_indexes = (1, 2)
    if size == "demo":
      c.downsample_hidden_size = 16  # the conv stem dominates a CPU step; the demo must be quick
  else:
    raise ValueError(f"unknown model size {size!r}")
  return c


def text_config(size: str) -> ml_collections.ConfigDict:
  """The Qwen3 language model."""
  c = ml_collections.ConfigDict()
  c.rope_theta = 1_000_000.0
  c.rms_norm_eps = 1e-6
  c.max_position_embeddings = 40960
  if size in ("4b", "8b"):
    c.vocab_size = 151936
    c.hidden_size = 2560 if size == "4b" else 4096
    c.intermediate_size = 9728 if size == "4b" else 12288
    c.num_hidden_layers = 36
    c.num_attention_heads = 32
    c.num_key_value_heads = 8
    c.head_dim = 128
  elif size in ("demo", "tiny"):
    c.vocab_size = 512
    c.hidden_size = 128
    c.intermediate_size = 384
    c.num_hidden_layers = 4
    c.num_attention_heads = 4
    c.num_key_value_heads = 2
    c.head_dim = 32
    c.max_position_embeddings = 4096
  else:
    raise ValueError(f"unknown model size {size!r}")
  return c


def model_config(size: str) -> ml_collections.ConfigDict:
  """The whole MOSS-Audio model: encoder, adapter + DeepStack mergers, Qwen3 LLM."""
  c = ml_collections.ConfigDict()
  c.audio = audio_encoder_config(size)
  c.text = text_config(size)
  c.adapter_hidden_size = 8192 if size in ("4b", "8b") else 256
  c.deepstack_num_inject_layers = 3
  c.dtype = "bfloat16" if size in ("4b", "8b") else "float32"  # activation / compute dtype
  c.param_dtype = "float32"  # master weights
  c.scan_layers = True
  # Layers per scan iteration (1 = a rolled loop; the layer count = fully unrolled, which drops the
  # scan's stacked residual buffers and their zero-fill + copy: faster on CPU, longer to compile).
  # demo: all 4 layers unrolled (measured on the 2-core CPU: -9% step time, same compile time).
  c.scan_unroll = 4 if size == "demo" else 1
  c.remat_policy = "none"  # none | full | dots | dots_no_batch
  return c


def mesh_config() -> ml_collections.ConfigDict:
  """Mesh shape over (data, fsdp, tensor); -1 takes the devices left over."""
  c = ml_collections.ConfigDict()
  c.shape = (1, -1, 1)
  c.axis_names = ("data", "fsdp", "tensor")
  return c

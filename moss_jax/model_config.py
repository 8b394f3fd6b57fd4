"""The schema of `config.model`: every field, its default, and the reference model sizes.

Bottom layer (docs/architecture.md): ml_collections only, no JAX. The model, the reference
checkpoint reader (hf/config_io.py) and the recipes (configs/base.py) all build `config.model`
with `model_config(...)` here, so a field added to the schema gets its default everywhere, and a
shape field nobody set is an error instead of some other size's value.

Fields:
  audio.*   the Whisper-style encoder (spec 2); the chunk length (400 frames) and the 8x conv
            downsampling are architecture constants in moss_jax/batch.py, not config fields
  text.*    the Qwen3 language model (spec 4)
  adapter_hidden_size, deepstack_num_inject_layers   adapter and DeepStack mergers (spec 3)
  dtype, param_dtype, scan_layers, scan_unroll, remat_policy, attention, attention_block_size,
  loss_vocab_block, loss_chunk_size, audio.conv_stem_impl   how it runs (not part of the
            checkpoint)
  lora.*    LoRA adapters on dense layers (rank 0 = off); not part of the reference checkpoint
"""

from __future__ import annotations

from typing import Any, Mapping

import ml_collections

DTYPES = ("float32", "bfloat16", "float16")

# Reference special token ids of the Qwen3 tokenizer (spec 5.1).
QWEN3_SPECIAL_IDS = dict(
    audio_token_id=151654, audio_bos_id=151669, audio_eos_id=151670,
    im_start_id=151644, im_end_id=151645, pad_id=151643)

# Shape fields: no default, every model_config() call sets them.
AUDIO_SHAPE_FIELDS = ("d_model", "encoder_layers", "encoder_attention_heads", "encoder_ffn_dim",
                      "downsample_hidden_size", "deepstack_encoder_layer_indexes")
TEXT_SHAPE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim")
SHAPE_FIELDS = ("adapter_hidden_size",)

AUDIO_DEFAULTS = dict(
    num_mel_bins=128,
    layer_norm_eps=1e-5,
    mel_dtype="bfloat16",  # the reference processor rounds the mel to bf16 before the stem
    # auto | conv | conv_matmul_bwd: how the conv stem runs (moss_jax/model/encoder.py:stem_impl);
    # auto picks a matmul backward pass on CPU from 32 channels (XLA:CPU's strided-conv
    # gradients are slow there).
    conv_stem_impl="auto",
)
TEXT_DEFAULTS = dict(
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    max_position_embeddings=40960,
)
DEFAULTS = dict(
    deepstack_num_inject_layers=3,
    dtype="float32",  # activation / compute dtype
    param_dtype="float32",  # master weights
    scan_layers=True,
    # Layers per scan iteration (1 = a rolled loop; the layer count = fully unrolled, which drops
    # the scans' stacked residual buffers and their zero-fill + copy: faster on CPU).
    scan_unroll=1,
    remat_policy="none",  # one of moss_jax/model/layers.py REMAT_POLICY_NAMES
    # LLM attention (moss_jax/model/attention.py): auto | xla | blockwise | cudnn | splash. auto =
    # splash on TPU, cudnn on GPU (bf16), blockwise elsewhere; xla is the reference einsum path.
    attention="auto",
    attention_block_size=512,  # query/key block of blockwise and splash attention
    # The loss fuses lm_head into a cross-entropy over vocabulary blocks of about
    # loss_vocab_block columns, so [B, L, vocab] float32 logits never exist; loss_chunk_size > 0
    # also cuts rows into token chunks of that many positions (0 = whole rows).
    loss_vocab_block=16384,
    loss_chunk_size=0,
    # LoRA adapters (moss_jax/model/lora.py); rank 0 = none; configs/sft.py:*lora turns them on.
    # targets: comma-separated aliases (llm, llm_attention, llm_mlp, adapter, mergers,
    # encoder_attention, encoder_qkv, encoder_mlp, lm_head) or regexes over module paths;
    # scale = alpha / rank, or alpha / sqrt(rank) with rslora.
    lora=dict(rank=0, alpha=16.0, dropout=0.0, rslora=False, targets="llm"),
)

# Reference shapes. The 4B and 8B models share the encoder (32 x 1280) and differ in the LLM.
_REFERENCE_AUDIO = dict(d_model=1280, encoder_layers=32, encoder_attention_heads=20,
                        encoder_ffn_dim=5120, downsample_hidden_size=480,
                        deepstack_encoder_layer_indexes=(8, 16, 24))
SIZES: dict[str, dict[str, Any]] = {
    "4b": dict(audio=_REFERENCE_AUDIO,
               text=dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728,
                         num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128),
               adapter_hidden_size=8192, dtype="bfloat16"),
    "8b": dict(audio=_REFERENCE_AUDIO,
               text=dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                         num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                         head_dim=128),
               adapter_hidden_size=8192, dtype="bfloat16"),
    # A few-million-parameter model with every part of the architecture, for tests and demos.
    "tiny": dict(audio=dict(d_model=96, encoder_layers=4, encoder_attention_heads=4,
                            encoder_ffn_dim=256, downsample_hidden_size=32,
                            deepstack_encoder_layer_indexes=(1, 2)),
                 text=dict(vocab_size=512, hidden_size=128, intermediate_size=384,
                           num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                           head_dim=32, max_position_embeddings=4096),
                 adapter_hidden_size=256),
}


def model_config(audio: Mapping[str, Any], text: Mapping[str, Any],
                 **fields: Any) -> ml_collections.ConfigDict:
  """`config.model` from the shape fields (and any others), the rest from the defaults.

  Raises ValueError naming every shape field missing and every field the schema does not have.
  """
  problems = [f"audio.{k}" for k in AUDIO_SHAPE_FIELDS if k not in audio]
  problems += [f"text.{k}" for k in TEXT_SHAPE_FIELDS if k not in text]
  problems += [k for k in SHAPE_FIELDS if k not in fields]
  unknown = ([f"audio.{k}" for k in audio if k not in AUDIO_SHAPE_FIELDS + tuple(AUDIO_DEFAULTS)]
             + [f"text.{k}" for k in text if k not in TEXT_SHAPE_FIELDS + tuple(TEXT_DEFAULTS)]
             + [k for k in fields if k not in SHAPE_FIELDS + tuple(DEFAULTS)])
  if problems or unknown:
    raise ValueError("config.model: " + "; ".join(
        ([f"missing shape field(s) {problems}"] if problems else [])
        + ([f"unknown field(s) {unknown}"] if unknown else [])))
  c = ml_collections.ConfigDict(dict(DEFAULTS, **fields))
  c.audio = ml_collections.ConfigDict(dict(AUDIO_DEFAULTS, **audio))
  c.text = ml_collections.ConfigDict(dict(TEXT_DEFAULTS, **text))
  return c


def sized(size: str, **overrides: Any) -> ml_collections.ConfigDict:
  """`config.model` of a named size in SIZES ('4b', '8b', 'tiny'); `overrides` replace fields."""
  if size not in SIZES:
    raise ValueError(f"unknown model size {size!r}; choose one of {sorted(SIZES)}")
  spec = dict(SIZES[size], **overrides)
  return model_config(**spec)


def num_mergers(config) -> int:
  """DeepStack mergers: min(len(encoder taps), deepstack_num_inject_layers), as in the reference."""
  return min(len(config.audio.deepstack_encoder_layer_indexes), config.deepstack_num_inject_layers)

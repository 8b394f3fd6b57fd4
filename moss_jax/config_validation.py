"""Start-up checks of a run config: every problem found is reported at once, in plain words.

Called by train.py before anything is allocated, so a bad override (`--config.data.batch_size=6`
on 8 devices) fails in a second with the reason instead of deep inside XLA.
"""

from __future__ import annotations

import os
from typing import Sequence

from absl import logging

from moss_jax import batch as batch_lib
from moss_jax import optim
from moss_jax import paths
from moss_jax import sharding
from moss_jax.hf import mapping
from moss_jax.errors import UserError
from moss_jax.model import attention, lora
from moss_jax.model.layers import REMAT_POLICY_NAMES
from moss_jax.model_config import DTYPES, num_mergers

CONV_STEM_IMPLS = ("auto", "conv", "conv_matmul_bwd")  # moss_jax/model/encoder.py:STEM_IMPLS


class ConfigError(UserError, ValueError):
  """A config that cannot run; the message lists every problem."""

  def __init__(self, problems: Sequence[str]):
    self.problems = list(problems)
    super().__init__("invalid config:\n  - " + "\n  - ".join(self.problems))


def _mesh_dims(shape, num_devices: int, problems: list[str]) -> tuple[int, ...] | None:
  try:
    return sharding.mesh_shape(shape, num_devices)
  except ValueError as e:
    problems.append(f"mesh.shape: {e}")
    return None


def _check_model(model, tensor: int, problems: list[str]) -> None:
  for name in ("dtype", "param_dtype"):
    if model[name] not in DTYPES:
      problems.append(f"model.{name}={model[name]!r}: choose one of {DTYPES}")
  if model.audio.mel_dtype not in DTYPES:
    problems.append(f"model.audio.mel_dtype={model.audio.mel_dtype!r}: choose one of {DTYPES}")
  if model.remat_policy not in REMAT_POLICY_NAMES:
    problems.append(f"model.remat_policy={model.remat_policy!r}: choose one of "
                    f"{REMAT_POLICY_NAMES}")
  unroll = model.get("scan_unroll", 1)
  if not isinstance(unroll, int) or unroll < 1:
    problems.append(f"model.scan_unroll={unroll!r}: a positive number of layers per scan step")
  if model.audio.get("conv_stem_impl", "auto") not in CONV_STEM_IMPLS:
    problems.append(f"model.audio.conv_stem_impl={model.audio.conv_stem_impl!r}: choose one of "
                    f"{CONV_STEM_IMPLS}")
  impl = model.get("attention", "auto")
  if impl not in attention.IMPLEMENTATIONS:
    problems.append(f"model.attention={impl!r}: choose one of {attention.IMPLEMENTATIONS}")
  if model.get("attention_block_size", 1) < 1:
    problems.append(f"model.attention_block_size must be positive, got {model.attention_block_size}")
  if model.get("loss_vocab_block", 1) < 1:
    problems.append(f"model.loss_vocab_block must be positive, got {model.loss_vocab_block}")
  if model.get("loss_chunk_size", 0) < 0:
    problems.append(f"model.loss_chunk_size must be >= 0 (0 = no chunking), got "
                    f"{model.loss_chunk_size}")
  if impl == "cudnn" and model.dtype == "float32":
    problems.append("model.attention=cudnn needs model.dtype bfloat16 or float16 (cuDNN fused "
                    "attention has no float32 kernel)")
  text, audio = model.text, model.audio
  if text.num_attention_heads % text.num_key_value_heads:
    problems.append(f"model.text.num_attention_heads ({text.num_attention_heads}) must be a "
                    f"multiple of num_key_value_heads ({text.num_key_value_heads})")
  if audio.d_model % audio.encoder_attention_heads:
    problems.append(f"model.audio.d_model ({audio.d_model}) must be divisible by "
                    f"encoder_attention_heads ({audio.encoder_attention_heads})")
  if audio.num_mel_bins != batch_lib.NUM_MEL_BINS:
    problems.append(f"model.audio.num_mel_bins must be {batch_lib.NUM_MEL_BINS} (the conv stem "
                    "expects 16 frequency rows after three stride-2 convolutions)")
  bad_taps = [i for i in audio.deepstack_encoder_layer_indexes
              if not 0 <= i < audio.encoder_layers]
  if bad_taps:
    problems.append(f"model.audio.deepstack_encoder_layer_indexes {bad_taps} are not encoder "
                    f"layers (0..{audio.encoder_layers - 1})")
  n_mergers = num_mergers(model)
  if n_mergers > text.num_hidden_layers:
    problems.append(f"{n_mergers} DeepStack mergers inject into more layers than the LLM has "
                    f"({text.num_hidden_layers})")
  for what, size in (("model.text.num_key_value_heads", text.num_key_value_heads),
                     ("model.text.num_attention_heads", text.num_attention_heads),
                     ("model.text.intermediate_size", text.intermediate_size),
                     ("model.audio.encoder_attention_heads", audio.encoder_attention_heads),
                     ("model.audio.encoder_ffn_dim", audio.encoder_ffn_dim),
                     ("model.adapter_hidden_size", model.adapter_hidden_size)):
    if tensor > 1 and size % tensor:
      problems.append(f"{what}={size} is not divisible by the tensor axis ({tensor})")


def _check_data(data, rows_per_shard_divisor: int, process_count: int, grad_accum: int,
                check_paths: bool, problems: list[str]) -> None:
  b = data.batch_size
  if b <= 0:
    problems.append(f"data.batch_size must be positive, got {b}")
    return
  if b % process_count:
    problems.append(f"data.batch_size ({b}) must be divisible by the process count "
                    f"({process_count}): each process feeds batch_size / process_count rows")
  if grad_accum < 1 or b % grad_accum:
    problems.append(f"data.batch_size ({b}) must be divisible by train.grad_accum ({grad_accum})")
  elif (b // grad_accum) % rows_per_shard_divisor:
    problems.append(f"the micro-batch of {b // grad_accum} rows (data.batch_size / "
                    f"train.grad_accum) must be divisible by the data*fsdp mesh size "
                    f"({rows_per_shard_divisor})")
  if data.max_tokens < 2:
    problems.append(f"data.max_tokens must be at least 2, got {data.max_tokens}")
  if data.max_audio_chunks < 1:
    problems.append(f"data.max_audio_chunks must be at least 1, got {data.max_audio_chunks}")
  if data.feature_mode not in batch_lib.FEATURE_MODES:
    problems.append(f"data.feature_mode={data.feature_mode!r}: choose one of "
                    f"{batch_lib.FEATURE_MODES}")
  if data.max_audio_seconds > data.max_audio_chunks * batch_lib.CHUNK_FRAMES / 100.0:
    # Not fatal: longer clips are skipped as does_not_fit instead of too_long.
    logging.warning("data.max_audio_seconds (%s) exceeds what data.max_audio_chunks (%d) x 4 s "
                    "chunks hold; longer clips will be skipped as does_not_fit",
                    data.max_audio_seconds, data.max_audio_chunks)
  manifests = [m for m in str(data.train_manifests).split(",") if m]
  if not manifests:
    problems.append("data.train_manifests is empty: pass --config.data.train_manifests=a.jsonl,b.jsonl")
  weights = [w for w in str(data.train_weights).split(",") if w]
  if weights:
    if len(weights) != len(manifests):
      problems.append(f"data.train_weights has {len(weights)} entries for {len(manifests)} manifests")
    try:
      if any(float(w) < 0 for w in weights) or sum(float(w) for w in weights) <= 0:
        problems.append("data.train_weights must be non-negative with a positive sum")
    except ValueError:
      problems.append(f"data.train_weights={data.train_weights!r} must be comma-separated numbers")
  if check_paths:
    for m in manifests:
      if not os.path.exists(m):
        problems.append(f"training manifest not found: {m}")
    if data.eval_manifest and not os.path.exists(data.eval_manifest):
      problems.append(f"eval manifest not found: {data.eval_manifest}")
    tok = data.tokenizer
    if not tok.path:
      problems.append("data.tokenizer.path is empty: point it at the tokenizer model/directory")
    elif not os.path.exists(tok.path):
      problems.append(f"tokenizer not found: {tok.path}")


def _check_optim_train(optim_cfg, train, problems: list[str]) -> None:
  if optim_cfg.lr <= 0:
    problems.append(f"optim.lr must be positive, got {optim_cfg.lr}")
  if optim_cfg.schedule not in optim.SCHEDULES:
    problems.append(f"optim.schedule={optim_cfg.schedule!r}: choose one of {optim.SCHEDULES}")
  if optim_cfg.warmup_steps < 0 or optim_cfg.warmup_steps > train.steps:
    problems.append(f"optim.warmup_steps ({optim_cfg.warmup_steps}) must be in 0..train.steps "
                    f"({train.steps})")
  if not 0 <= optim_cfg.min_lr_ratio <= 1:
    problems.append(f"optim.min_lr_ratio must be in [0, 1], got {optim_cfg.min_lr_ratio}")
  if not (0 <= optim_cfg.b1 < 1 and 0 <= optim_cfg.b2 < 1):
    problems.append(f"optim.b1/b2 must be in [0, 1), got {optim_cfg.b1}/{optim_cfg.b2}")
  if optim_cfg.weight_decay < 0 or optim_cfg.clip_norm < 0 or optim_cfg.z_loss < 0:
    problems.append("optim.weight_decay, optim.clip_norm and optim.z_loss must be >= 0")
  if train.steps <= 0:
    problems.append(f"train.steps must be positive, got {train.steps}")
  if train.stage not in optim.STAGES:
    problems.append(f"train.stage={train.stage!r}: choose one of {optim.STAGES} (adapter = "
                    "stage 1, full = stage 2)")
  for name in ("log_every", "eval_every", "checkpoint_every"):
    if train[name] < 0:
      problems.append(f"train.{name} must be >= 0, got {train[name]}")
  if train.log_every == 0:
    problems.append("train.log_every must be at least 1")
  if train.max_consecutive_skips < 1:
    problems.append("train.max_consecutive_skips must be at least 1")
  multipliers = optim_cfg.get("lr_multipliers") or {}
  for group, value in multipliers.items():
    if group not in {g for g, _ in optim.MODULE_GROUPS}:
      problems.append(f"optim.lr_multipliers.{group}: unknown group; groups are "
                      f"{', '.join(g for g, _ in optim.MODULE_GROUPS)}")
    elif value < 0:
      problems.append(f"optim.lr_multipliers.{group} must be >= 0, got {value}")
  frozen_dtype = train.get("frozen_dtype", "")
  if frozen_dtype not in ("", "float32", "bfloat16", "float16"):
    problems.append(f"train.frozen_dtype={frozen_dtype!r}: choose float32, bfloat16, float16 or "
                    "'' (= model.param_dtype)")
  if train.init_from and (train.init_llm_from or train.init_encoder_from):
    problems.append("train.init_from loads the whole model: do not combine it with "
                    "train.init_llm_from / train.init_encoder_from")
  for name in ("init_from", "init_llm_from", "init_encoder_from", "init_from_checkpoint"):
    path = train[name]
    # Run checkpoints may live in a bucket (gs://); epath answers for both kinds of path.
    if path and not paths.run_path(path).exists():
      problems.append(f"train.{name} not found: {path}")


def _check_lora(model, train, problems: list[str]) -> None:
  try:
    spec = lora.spec_from_config(model)
  except lora.LoraError as e:
    problems.append(f"model.lora: {e}")
    return
  if spec is not None:
    modules = sorted({"/".join(e.flax_path[:-1]) for e in mapping.entries(model)
                      if e.transform == mapping.LINEAR})
    for target in spec.targets:
      one = lora.LoraSpec(spec.rank, spec.alpha, targets=(target,))
      if not any(one.matches(m) for m in modules):
        problems.append(f"model.lora.targets: {target!r} matches no dense layer; module paths "
                        f"look like {modules[0]}, language_model/layers/self_attn/q_proj "
                        f"(aliases: {', '.join(lora.TARGET_ALIASES)})")
  if train.stage == "lora" and spec is None:
    problems.append("train.stage=lora trains only LoRA adapters, but model.lora.rank is 0: set "
                    "--config.model.lora.rank (or use configs/sft.py:lora)")


def validate(config, num_devices: int, process_count: int = 1, check_paths: bool = True) -> None:
  """Raises ConfigError listing every problem of `config` for this device/process count."""
  problems: list[str] = []
  for section in ("model", "data", "optim", "train", "mesh"):
    if section not in config:
      problems.append(f"config has no {section!r} section")
  if problems:
    raise ConfigError(problems)
  dims = _mesh_dims(config.mesh.shape, num_devices, problems)
  data_fsdp, tensor = (dims[0] * dims[1], dims[2]) if dims else (1, 1)
  _check_model(config.model, tensor, problems)
  if config.model.get("attention", "auto") == "splash":
    problem = attention.check_splash_lengths(config.data.max_tokens,
                                             config.model.get("attention_block_size", 512))
    if problem:
      problems.append(problem)
  _check_data(config.data, data_fsdp, process_count, config.train.grad_accum, check_paths,
              problems)
  _check_optim_train(config.optim, config.train, problems)
  _check_lora(config.model, config.train, problems)
  if config.model.text.vocab_size < 8:
    problems.append("model.text.vocab_size is implausibly small")
  if problems:
    raise ConfigError(problems)

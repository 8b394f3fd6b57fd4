"""Supervised fine-tuning: `python -m moss_jax.train --config configs/sft.py:PRESET --workdir DIR`.

Presets are SIZE_MODE (SIZE = demo, 4b or 8b; a bare MODE means demo):
  *_lora            LoRA adapters (model.lora) on the LLM's q/k/v/o/gate/up/down; the base is
                    frozen (stored once, bfloat16 for 4b/8b) and only the adapters train.
  *_encoder_frozen  everything but the audio encoder trains (the default for a bare size).
  *_full            every parameter trains, like the reference's full fine-tune (5e-5).
  demo              fine-tune a demo pretraining run on the sample corpus:
                    --config.train.init_from_checkpoint=/tmp/demo_run/checkpoints
  4b / 8b           MOSS-Audio-4B / 8B from a reference-format directory: --config.train.init_from=PATH

LoRA: the reference's script uses rank 64, alpha 2 (scale alpha/r = 1/32), which updates the model
32 times more slowly than alpha = r; these presets use rank 64 with rsLoRA and alpha 8 (scale
alpha/sqrt(r) = 1). Override any of it: --config.model.lora.rank=16 --config.model.lora.alpha=32
--config.model.lora.rslora=False --config.model.lora.targets=llm,adapter,encoder_qkv
--config.model.lora.dropout=0.05. Per-module rates: --config.optim.lr_multipliers.lora=2.

Data are usually chat manifests ({"messages": [...], "audios": [...]}, see docs/finetuning.md)
given with --config.data.train_manifests. Time markers stay on, exactly as inference lays them out
(the reference's finetune script has none: --config.data.time_markers=False to match it).
"""

from __future__ import annotations

import ml_collections

from configs import pretrain

SIZES = ("demo", "4b", "8b")
MODES = ("lora", "encoder_frozen", "full")


def parse_preset(preset: str) -> tuple[str, str]:
  """'4b_lora' -> ('4b', 'lora'); 'lora' -> ('demo', 'lora'); '8b' -> ('8b', 'encoder_frozen')."""
  preset = preset or "demo"
  if preset in MODES:
    return "demo", preset
  size, _, mode = preset.partition("_")
  mode = mode or "encoder_frozen"
  if size not in SIZES or mode not in MODES:
    raise ValueError(f"unknown preset {preset!r}; choose SIZE or SIZE_MODE with SIZE in "
                     f"{SIZES} and MODE in {MODES} (a bare MODE means demo)")
  return size, mode


def apply_mode(config: ml_collections.ConfigDict, mode: str) -> ml_collections.ConfigDict:
  """Sets the stage (and for LoRA the adapters, rate and frozen dtype) of a fine-tuning mode."""
  big = not config.preset.startswith("sft_demo")
  if mode == "lora":
    config.train.stage = "lora"
    config.model.lora.update(rank=64, alpha=8.0, rslora=True, dropout=0.0, targets="llm")
    config.optim.lr = 2e-4 if big else 3e-3
    if big:
      config.train.frozen_dtype = "bfloat16"
  else:
    config.train.stage = mode
  return config


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  size, mode = parse_preset(preset)
  config = pretrain.get_config(size)
  config.preset = f"sft_{size}_{mode}"
  config.optim.update(schedule="cosine", weight_decay=0.0, min_lr_ratio=0.0)
  if size == "demo":
    # A few CPU minutes: train on the chat set of `python -m data_pipelines.make_chat_sft` and
    # skip the pretraining eval set and its ASR scoring (another task).
    config.optim.update(lr=1e-3, warmup_steps=6)
    config.train.update(steps=60, checkpoint_every=30, log_every=10, eval_every=0,
                        asr_eval_samples=0, final_train_asr_samples=0)
    config.data.eval_manifest = ""
  else:
    config.optim.update(lr=5e-5, warmup_steps=100)
    config.train.update(steps=5_000, checkpoint_every=500, eval_every=500, log_every=20)
    config.data.update(batch_size=64, max_tokens=8192, max_audio_chunks=150)
  return apply_mode(config, mode)

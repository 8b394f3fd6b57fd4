"""Supervised fine-tuning: `python -m moss_jax.train --config configs/sft.py:PRESET --workdir DIR`.

Presets:
  demo  fine-tune a demo pretraining run on the sample corpus with the encoder frozen:
        --config.train.init_from_checkpoint=/tmp/demo/checkpoints
  4b    MOSS-Audio-4B from a reference-format directory: --config.train.init_from=PATH
  8b    the same for MOSS-Audio-8B.
Fine-tuning data are usually chat manifests ({"messages": [...], "audios": [...]}) given with
--config.data.train_manifests; stage `encoder_frozen` (default) or `full`, like the reference's
full fine-tune (5e-5, bf16). Time markers stay on, as in pretraining (the reference's finetune
script has none: set --config.data.time_markers=False to match it).
"""

from __future__ import annotations

import ml_collections

from configs import pretrain


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  preset = preset or "demo"
  if preset not in ("demo", "4b", "8b"):
    raise ValueError(f"unknown preset {preset!r}; choose demo, 4b or 8b")
  config = pretrain.get_config(preset)
  config.preset = f"sft_{preset}"
  config.train.stage = "encoder_frozen"
  config.optim.update(schedule="cosine", weight_decay=0.0, min_lr_ratio=0.0)
  if preset == "demo":
    config.optim.update(lr=1e-3, warmup_steps=10)
    config.train.update(steps=100, checkpoint_every=50, log_every=10)
  else:
    config.optim.update(lr=5e-5, warmup_steps=100)
    config.train.update(steps=5_000, checkpoint_every=500, eval_every=500, log_every=20)
    config.data.update(batch_size=64, max_tokens=8192, max_audio_chunks=150)
  return config

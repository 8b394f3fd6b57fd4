"""Pretraining recipes: `python -m moss_jax.train --config configs/pretrain.py:PRESET --workdir DIR`.

Presets:
  demo  tiny model on the shipped sample corpus; a 2-core CPU trains it in minutes.
  4b    reference MOSS-Audio-4B shapes (encoder 32x1280, Qwen3-4B LLM).
  8b    reference MOSS-Audio-8B shapes (same encoder, Qwen3-8B LLM).
  4b_stage1 / 8b_stage1  pretraining stage 1 (adapter + mergers only); *_stage2 = full (default).
Any field can be overridden: `--config.optim.lr=3e-4`, `--config.data.train_manifests=a.jsonl,b.jsonl`.
"""

from __future__ import annotations

import os

import ml_collections

from configs import base

SAMPLE_CORPUS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                             "data_pipelines", "sample_corpus")


def data_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.train_manifests = ""  # comma-separated JSONL paths
  c.train_weights = ""  # comma-separated mixture weights ("" = proportional to size)
  c.eval_manifest = ""
  c.feature_mode = "waveform"  # waveform: mel on the accelerator | mel: NumPy mel on the host
  # How waveforms travel to the devices: float32 (exact for any audio) | int16 (half the bytes;
  # exact for 16-bit PCM 16 kHz sources, others rounded to 16 bits; moss_jax/train_step.py)
  c.waveform_transfer = "float32"
  c.time_markers = True
  c.max_audio_seconds = 600.0
  c.seed = 0
  c.shuffle = True
  c.num_workers = 0  # Grain worker processes per host (0 = in-process)
  c.prefetch = 2
  # MiB per process of parsed records and decoded waveforms kept for later epochs
  # (data_pipelines/audio_cache.py); 0 = decode every time (corpora larger than memory).
  c.audio_cache_mb = 0.0
  c.tokenizer = ml_collections.ConfigDict()
  if preset == "demo":
    c.train_manifests = os.path.join(SAMPLE_CORPUS, "train.jsonl")
    c.eval_manifest = os.path.join(SAMPLE_CORPUS, "eval.jsonl")
    c.batch_size = 8
    c.max_tokens = 256
    c.max_audio_chunks = 4
    c.max_audio_seconds = 16.0
    c.audio_cache_mb = 256.0  # the 64-clip corpus is read ~30 times in 200 steps
    c.tokenizer.kind = "sentencepiece"
    c.tokenizer.path = os.path.join(SAMPLE_CORPUS, "tokenizer.model")
  else:
    c.batch_size = 256
    c.max_tokens = 4096
    c.max_audio_chunks = 64
    c.tokenizer.kind = "hf"
    c.tokenizer.path = ""  # a directory or tokenizer.json of Qwen3
    c.tokenizer.update(base.QWEN3_SPECIAL_IDS)
  return c


def optim_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.lr = 3e-3 if preset == "demo" else 1e-4
  c.schedule = "cosine"  # cosine | constant | linear
  c.warmup_steps = 20 if preset == "demo" else 2000
  c.min_lr_ratio = 0.1
  c.weight_decay = 0.01 if preset == "demo" else 0.1
  c.b1 = 0.9
  c.b2 = 0.95
  c.eps = 1e-8
  c.clip_norm = 1.0
  c.z_loss = 0.0
  # Per-module learning-rate multipliers (lr * multiplier): encoder, adapter (+ DeepStack mergers),
  # llm (+ lm_head), lora (every LoRA adapter). Weight decay never touches norms or biases;
  # no_decay lists more path regexes to exempt (e.g. "embedding").
  c.lr_multipliers = ml_collections.ConfigDict(dict(encoder=1.0, adapter=1.0, llm=1.0, lora=1.0))
  c.no_decay = ""
  return c


def train_config(preset: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.steps = 200 if preset == "demo" else 100_000
  c.stage = "full"  # adapter (stage 1: adapter + mergers) | full (stage 2) | encoder_frozen | lora
  c.frozen_dtype = ""  # dtype of the frozen (non-trained) weights, e.g. bfloat16; "" = param_dtype
  c.grad_accum = 1
  c.seed = 0
  c.log_every = 10 if preset == "demo" else 50
  c.eval_every = 100 if preset == "demo" else 2000
  c.checkpoint_every = 100 if preset == "demo" else 1000
  c.keep_checkpoints = 3
  c.init_from = ""  # reference-format directory for the whole model
  c.init_llm_from = ""  # Qwen3 causal-LM directory for the LLM only
  c.init_encoder_from = ""  # MOSS-Audio directory whose encoder is taken
  c.init_from_checkpoint = ""  # a run's checkpoints/ dir (e.g. stage 1 -> stage 2): params only
  c.max_consecutive_skips = 20  # non-finite updates in a row before the run stops
  c.async_checkpoint = True
  c.data_shards = 0  # data shard count (0 = process count); keep it fixed to resume elsewhere
  c.peak_flops_per_device = 0.0  # for MFU; 0 = vendor table (TPU/GPU) or a measured CPU matmul
  c.eval_batches = 0  # eval batches per evaluation (0 = the whole eval manifest)
  c.asr_eval_samples = 8 if preset == "demo" else 32  # greedy ASR CER/WER samples per eval
  c.final_train_asr_samples = 16 if preset == "demo" else 0  # greedy ASR on training clips at the end
  c.generate_max_tokens = 48 if preset == "demo" else 256
  c.export_at_end = False  # write the final step to WORKDIR/hf (reference format, bfloat16)
  # Operations (moss_jax/diagnostics.py, moss_jax/train_step.py):
  # XLA compilation cache: "" = $JAX_COMPILATION_CACHE_DIR if set, else WORKDIR/compilation_cache
  # for a bucket workdir (gs://), else the user's cache ~/.cache/moss_jax/xla; a path; or off
  c.compilation_cache_dir = ""
  c.profile_start = 10  # first step of the jax.profiler trace (after compilation)
  c.profile_steps = 0  # steps to trace into WORKDIR/tensorboard (TensorBoard's profile tab); 0 = off
  c.watchdog_factor = 10.0  # log every thread's stack when a step takes this x the median; 0 = off
  c.watchdog_min_seconds = 60.0  # ... and at least this long
  c.prefetch_to_device = 2  # batches placed on the devices ahead of the step; 0 = place in the loop
  return c


def apply_stage(config: ml_collections.ConfigDict, stage: str) -> ml_collections.ConfigDict:
  """The reference recipe's two pretraining stages (spec 8.1, from a summary of the paper).

  stage1: only the adapter and DeepStack mergers train (encoder and LLM frozen), on audio tasks
          without the text-only data; a short run at a higher rate (our choice: the paper's
          rates are not published).
  stage2: every parameter trains on the full mixture (ASR : caption : text = 30 : 40 : 30,
          mixed by --config.data.train_weights), starting from stage 1:
          --config.train.init_from_checkpoint=STAGE1_WORKDIR/checkpoints.
  """
  if stage == "stage1":
    config.train.stage = "adapter"
    config.train.steps = 20_000
    config.optim.update(lr=1e-3, warmup_steps=500, weight_decay=0.0)
  elif stage == "stage2":
    config.train.stage = "full"
  else:
    raise ValueError(f"unknown stage {stage!r}; choose stage1 or stage2")
  return config


def get_config(preset: str = "demo") -> ml_collections.ConfigDict:
  """`preset` is demo, 4b or 8b, optionally with a stage: 4b_stage1, 8b_stage2 (default stage2)."""
  preset = preset or "demo"
  size, _, stage = preset.partition("_")
  if size not in ("demo", "4b", "8b") or (stage and size == "demo"):
    raise ValueError(f"unknown preset {preset!r}; choose demo, 4b, 8b, 4b_stage1, 4b_stage2, "
                     "8b_stage1 or 8b_stage2")
  config = ml_collections.ConfigDict()
  config.preset = preset
  config.model = base.model_config(size)
  config.data = data_config(size)
  config.optim = optim_config(size)
  config.train = train_config(size)
  config.mesh = base.mesh_config()
  if stage:
    apply_stage(config, stage)
  return config

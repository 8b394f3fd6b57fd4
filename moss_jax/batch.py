"""The batch schema: the one contract shared by `data_pipelines` (producer) and `moss_jax` (consumer).

Bottom layer (docs/architecture.md): NumPy only, no JAX, so the data pipeline and the model both
build on it. It is also the one home of the audio constants and the chunk arithmetic.

Every array has a static shape derived from the config, so the train step compiles once:

  B = data.batch_size (global rows; each process feeds B / process_count rows)
  L = data.max_tokens (tokens per packed row)
  C = data.max_audio_chunks (4-second audio chunk slots per row)

| name                  | shape            | dtype   | meaning |
|-----------------------|------------------|---------|---------|
| input_ids             | [B, L]           | int32   | token ids; audio positions hold the placeholder id |
| labels                | [B, L]           | int32   | reference convention: aligned with input_ids, -100 = no loss; the loss compares logits[t-1] with labels[t] |
| segment_ids           | [B, L]           | int32   | packed sample number 1..n, 0 = padding; attention never crosses segments |
| positions             | [B, L]           | int32   | RoPE positions, restarting at 0 in every segment |
| task_ids              | [B, L]           | int32   | index into TASKS of the token's sample (for per-task loss) |
| audio_token_index     | [B, L]           | int32   | -1 for non-audio tokens, else the flat index c * 50 + t into the row's encoder output (chunk slot c, token t) |
| audio_chunk_frames    | [B, C]           | int32   | valid mel frames of each chunk slot (1..400), 0 = empty slot |
| audio_chunk_audio_id  | [B, C]           | int32   | which audio of the row the chunk belongs to (1-based, 0 = empty); the log-mel clamp is per audio |
| audio_waveform        | [B, C, 64240]    | float32 | feature_mode "waveform": 16 kHz samples covering the chunk's 400 frames plus STFT context (see below) |
| audio_mel             | [B, C, 128, 400] | float32 | feature_mode "mel": normalised log-mel computed on the host over the whole audio, cut into chunks |

Waveform chunk slots. Mel frame f of an audio is centred on sample 160 f of the reflect-padded
signal (Whisper front end, spec section 1), so frames [400 c, 400 c + 400) read samples
[64000 c - 200, 64000 c + 64040): 64240 samples. The host writes those samples (reflect padding
at the audio's two ends, zeros past the padding) so the on-device mel of every chunk equals the
whole-audio mel exactly, and the per-audio `max - 8` clamp is taken over the chunks sharing an
`audio_chunk_audio_id`. (The design note's "6400 samples" per chunk is a typo: 4 s at 16 kHz is
64000 samples.)
"""

from __future__ import annotations

import numpy as np

SAMPLE_RATE = 16000
HOP_LENGTH = 160
N_FFT = 400
NUM_MEL_BINS = 128
CHUNK_FRAMES = 400  # 2 * n_window of the reference encoder: 4 s of audio
DOWNSAMPLE = 8  # conv stem: three stride-2 convolutions
TOKENS_PER_CHUNK = CHUNK_FRAMES // DOWNSAMPLE  # 50 encoder tokens (12.5 Hz)
CHUNK_SAMPLES = CHUNK_FRAMES * HOP_LENGTH  # 64000
STFT_CONTEXT = N_FFT // 2  # 200 samples of reflect/real context before each frame centre
WAVEFORM_CHUNK_SAMPLES = (CHUNK_FRAMES - 1) * HOP_LENGTH + N_FFT  # 64240
IGNORE_INDEX = -100

FEATURE_MODES = ("waveform", "mel")  # mel on the accelerator | NumPy mel on the host
TASKS = ("asr", "asr_timestamps", "caption", "qa", "text")

TOKEN_FIELDS = ("input_ids", "labels", "segment_ids", "positions", "task_ids", "audio_token_index")
CHUNK_FIELDS = ("audio_chunk_frames", "audio_chunk_audio_id")


def num_mel_frames(num_samples: int) -> int:
  """Mel frames the reference front end yields for a 16 kHz clip (spec 1.5): floor(N / 160)."""
  return num_samples // HOP_LENGTH


def num_audio_tokens(num_frames):
  """Encoder tokens (= audio placeholders) of `num_frames` mel frames: ceil(T / 8).

  Three stride-2 convolutions (kernel 3, padding 1) map T frames to ceil(ceil(ceil(T/2)/2)/2)
  = ceil(T / 8). Works on ints, NumPy and JAX integer arrays alike (the encoder's padding mask
  uses it on device).
  """
  return -(-num_frames // DOWNSAMPLE)


def chunk_frame_counts(num_frames: int) -> list[int]:
  """Valid frames of each 400-frame chunk of a clip: [400, ..., 400, tail] (none for 0 frames)."""
  full, tail = divmod(int(num_frames), CHUNK_FRAMES)
  return [CHUNK_FRAMES] * full + ([tail] if tail else [])


def batch_shapes(batch_size: int, max_tokens: int, max_audio_chunks: int,
                 feature_mode: str = "waveform") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """Shapes and dtypes of every batch field for the given static sizes."""
  b, l, c = batch_size, max_tokens, max_audio_chunks
  shapes = {name: ((b, l), np.dtype(np.int32)) for name in TOKEN_FIELDS}
  shapes.update({name: ((b, c), np.dtype(np.int32)) for name in CHUNK_FIELDS})
  if feature_mode == "waveform":
    shapes["audio_waveform"] = ((b, c, WAVEFORM_CHUNK_SAMPLES), np.dtype(np.float32))
  elif feature_mode == "mel":
    shapes["audio_mel"] = ((b, c, NUM_MEL_BINS, CHUNK_FRAMES), np.dtype(np.float32))
  else:
    raise ValueError(f"feature_mode must be one of {FEATURE_MODES}, got {feature_mode!r}")
  return shapes


def batch_shapes_from_config(config, batch_size: int | None = None):
  """`batch_shapes` for a full config (config.data); `batch_size` overrides the global size."""
  data = config.data
  return batch_shapes(batch_size or data.batch_size, data.max_tokens, data.max_audio_chunks,
                      data.feature_mode)


def empty_batch(shapes: dict[str, tuple[tuple[int, ...], np.dtype]], pad_id: int = 0
                ) -> dict[str, np.ndarray]:
  """An all-padding batch of `shapes`: the padding convention of every field in one place.

  input_ids hold `pad_id`, labels IGNORE_INDEX, audio_token_index -1 (no audio), everything else
  0 (segment 0 = padding, chunk slots with 0 frames = empty). Such rows add nothing to the loss
  or the token counts, so they fill a partly used batch or a process that has run out of rows.
  """
  out = {name: np.zeros(shape, dtype) for name, (shape, dtype) in shapes.items()}
  out["input_ids"][:] = pad_id
  out["labels"][:] = IGNORE_INDEX
  out["audio_token_index"][:] = -1
  return out


def check_batch(batch: dict, shapes: dict) -> None:
  """Raises ValueError naming every field whose presence, shape or dtype breaks the schema."""
  problems = []
  for name, (shape, dtype) in shapes.items():
    if name not in batch:
      problems.append(f"{name}: missing")
      continue
    arr = batch[name]
    if tuple(arr.shape) != tuple(shape) or np.dtype(arr.dtype) != dtype:
      problems.append(f"{name}: got {tuple(arr.shape)} {arr.dtype}, want {tuple(shape)} {dtype}")
  extra = sorted(set(batch) - set(shapes))
  if extra:
    problems.append(f"unexpected fields {extra}")
  if problems:
    raise ValueError("batch does not match the schema: " + "; ".join(problems))

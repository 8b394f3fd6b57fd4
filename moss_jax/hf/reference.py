"""Run our model on inputs in the reference layout, with the reference's audio chunking.

The official model takes `input_ids` with `<|AUDIO|>` placeholders, one zero-padded mel per audio
and the true frame counts. It cuts every audio into 400-frame chunks, pads ALL chunks of the call
to the longest chunk (spec 2.4; this padding changes the conv stem's last tokens, so it is part of
the numerics), encodes the chunks independently and scatters the tokens into the placeholders in
row-major order. `plan_reference_inputs` turns that into our static-gather batch
(audio_mel [B, C, 128, Lmax], audio_chunk_frames, audio_token_index) and `reference_logits`
calls the model, so its logits are comparable with the PyTorch reference.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from moss_jax import batch as batch_lib
from moss_jax.hf import config_io

def audio_token_id_for(audio_token_id: int | None = None, pretrained_dir: str | None = None) -> int:
  """The placeholder id: explicit, else the directory's processor_config.json, else 151654."""
  if audio_token_id is not None:
    return int(audio_token_id)
  if pretrained_dir is not None:
    return config_io.read_token_ids(pretrained_dir)["audio_token_id"]
  return config_io.DEFAULT_TOKEN_IDS["audio_token_id"]


def plan_reference_inputs(input_ids, audio_mel, audio_mel_lengths, audio_token_id: int,
                          num_chunk_slots: int | None = None) -> dict[str, np.ndarray]:
  """Reference-layout inputs -> the model's batch fields (numpy).

  Audios are chunked in order; their tokens fill the placeholders row-major, exactly like the
  reference's masked_scatter. A row gets a chunk slot for every chunk any of its placeholders
  reads, so an audio may even straddle two rows (each row encodes its copy of the chunk; chunks
  are independent, so the values are the same). `num_chunk_slots` pads C with empty slots
  (frames 0, ignored by the model) so calls of different audio counts share one compiled shape.
  """
  ids = np.asarray(input_ids)
  if ids.ndim != 2:
    raise ValueError(f"input_ids must be [B, S], got {ids.shape}")
  b, s = ids.shape
  mel, lengths = _check_audio(audio_mel, audio_mel_lengths)
  # Chunks in (audio, chunk) order: (audio, start frame, frames).
  chunks = [(a, c * batch_lib.CHUNK_FRAMES, f) for a, n in enumerate(lengths)
            for c, f in enumerate(batch_lib.chunk_frame_counts(n))]
  tokens = np.array([batch_lib.num_audio_tokens(f) for _, _, f in chunks], dtype=np.int64)
  rows, cols = np.nonzero(ids == audio_token_id)  # row-major order, as masked_scatter
  if len(rows) != int(tokens.sum()):
    per_audio = [batch_lib.num_audio_tokens(int(n)) for n in lengths]
    raise ValueError(
        f"input_ids hold {len(rows)} audio placeholders (id {audio_token_id}; per row "
        f"{np.bincount(rows, minlength=b).tolist()}) but the audios give {int(tokens.sum())} "
        f"tokens (per audio {per_audio}, ceil(frames / 8))")
  lmax = max([f for _, _, f in chunks], default=batch_lib.DOWNSAMPLE)
  t_prime = batch_lib.num_audio_tokens(lmax)
  chunk_of = np.repeat(np.arange(len(chunks)), tokens)  # global token -> chunk
  pos_in_chunk = np.arange(len(chunk_of)) - np.repeat(np.cumsum(tokens) - tokens, tokens)
  slots: list[dict[int, int]] = [dict() for _ in range(b)]
  for r, j in zip(rows, chunk_of):
    slots[r].setdefault(int(j), len(slots[r]))
  c = max([len(x) for x in slots] + [1])
  if num_chunk_slots is not None:
    if num_chunk_slots < c:
      raise ValueError(f"a row needs {c} chunk slots, num_chunk_slots is {num_chunk_slots}")
    c = num_chunk_slots
  index = np.full((b, s), -1, np.int32)
  slot = np.array([slots[r][int(j)] for r, j in zip(rows, chunk_of)], dtype=np.int64)
  index[rows, cols] = slot * t_prime + pos_in_chunk
  frames = np.zeros((b, c), np.int32)
  out_mel = np.zeros((b, c, mel.shape[1], lmax), np.float32)
  for r in range(b):
    for j, k in slots[r].items():
      a, st, f = chunks[j]
      frames[r, k] = f
      out_mel[r, k, :, :f] = mel[a, :, st:st + f]
  positions = np.broadcast_to(np.arange(s, dtype=np.int32), (b, s)).copy()
  return dict(input_ids=ids.astype(np.int32), positions=positions,
              segment_ids=np.ones((b, s), np.int32), audio_mel=out_mel, audio_chunk_frames=frames,
              audio_token_index=index)


def _check_audio(audio_mel, audio_mel_lengths):
  if audio_mel is None:
    return np.zeros((0, batch_lib.NUM_MEL_BINS, 0), np.float32), np.zeros((0,), np.int64)
  mel = np.asarray(audio_mel, np.float32)
  lengths = np.asarray(audio_mel_lengths if audio_mel_lengths is not None
                       else [mel.shape[-1]] * mel.shape[0]).astype(np.int64)
  if mel.ndim != 3 or lengths.shape != (mel.shape[0],):
    raise ValueError(f"audio_mel must be [n_audio, mel, frames] with lengths [n_audio]; got "
                     f"{mel.shape} and {lengths.shape}")
  if (lengths > mel.shape[-1]).any() or (lengths < 0).any():
    raise ValueError(f"audio_mel_lengths {lengths.tolist()} outside 0..{mel.shape[-1]}")
  return mel, lengths


_JIT_CACHE: list[tuple[object, object]] = []  # (model, jitted apply); a few recent models


def _jitted_apply(model):
  """One jitted apply per model object, so repeated calls with the same shapes compile once."""
  for m, fn in _JIT_CACHE:
    if m is model:
      return fn
  fn = jax.jit(model.apply)
  _JIT_CACHE.append((model, fn))
  del _JIT_CACHE[:-4]
  return fn


def reference_logits(model, params, input_ids, audio_mel=None, audio_mel_lengths=None,
                     audio_token_id: int | None = None, pretrained_dir: str | None = None,
                     num_chunk_slots: int | None = None, jit: bool = True) -> jax.Array:
  """float32 logits [B, S, V] of our model for reference-layout inputs.

  Args:
    model, params: e.g. from `load_pretrained`.
    input_ids: [B, S] with `audio_token_id` at every audio position (time markers and the
      audio bos/eos are ordinary tokens).
    audio_mel: [n_audio, 128, frames] normalised log-mel, zero-padded on the right; passed to the
      model as given (the reference processor rounds it to bf16 first: round it yourself to
      mimic that).
    audio_mel_lengths: [n_audio] true frame counts (default: all `frames`).
    audio_token_id / pretrained_dir: the placeholder id, or the directory whose
      processor_config.json names it (default 151654).
    num_chunk_slots: pad the chunk-slot axis to this size (fewer recompiles across calls).
    positions are 0..S-1 in every row and every token is attended (no padding mask), as in the
    reference forward without an attention mask.
  """
  token_id = audio_token_id_for(audio_token_id, pretrained_dir)
  batch = plan_reference_inputs(input_ids, audio_mel, audio_mel_lengths, token_id,
                                num_chunk_slots)
  apply = _jitted_apply(model) if jit else model.apply
  params = params if set(params) == {"params"} else {"params": params}
  return apply(params, jnp.asarray(batch["input_ids"]), jnp.asarray(batch["positions"]),
               jnp.asarray(batch["segment_ids"]), jnp.asarray(batch["audio_mel"]),
               jnp.asarray(batch["audio_chunk_frames"]), jnp.asarray(batch["audio_token_index"]))

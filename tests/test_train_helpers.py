"""Shared pieces of the training tests (tiny configs, a built trainer) and checks of them."""

from __future__ import annotations

import numpy as np

from configs import pretrain
from moss_jax import batch as batch_lib
from moss_jax import train_step as ts


def tiny_config(batch_size: int = 8, max_tokens: int = 64, chunks: int = 1, stage: str = "full",
                grad_accum: int = 1, feature_mode: str = "mel", mesh=(1, -1, 1)):
  """The demo config shrunk to a model that compiles and steps in seconds on a CPU."""
  c = pretrain.get_config("demo")
  a, t = c.model.audio, c.model.text
  a.d_model, a.encoder_layers, a.encoder_attention_heads = 32, 2, 2
  a.encoder_ffn_dim, a.downsample_hidden_size = 64, 8
  a.deepstack_encoder_layer_indexes = (0, 1)
  t.vocab_size, t.hidden_size, t.intermediate_size = 64, 32, 64
  t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads, t.head_dim = 2, 2, 1, 16
  c.model.adapter_hidden_size = 64
  c.data.batch_size, c.data.max_tokens, c.data.max_audio_chunks = batch_size, max_tokens, chunks
  c.data.max_audio_seconds = 4.0 * chunks
  c.data.feature_mode = feature_mode
  c.train.stage, c.train.grad_accum = stage, grad_accum
  c.train.steps = 10
  c.optim.warmup_steps = 2
  c.optim.lr = 1e-2
  c.mesh.shape = tuple(mesh)
  return c


def test_synthetic_batch_matches_schema():
  c = tiny_config(chunks=2, max_tokens=160)
  batch = ts.synthetic_batch(c, seed=3)
  batch_lib.check_batch(batch, batch_lib.batch_shapes_from_config(c))
  idx = batch["audio_token_index"]
  frames = batch["audio_chunk_frames"]
  for r in range(c.data.batch_size):
    n_valid = sum(batch_lib.num_audio_tokens(int(f)) for f in frames[r])
    used = idx[r][idx[r] >= 0]
    assert used.max() < frames.shape[1] * batch_lib.TOKENS_PER_CHUNK
    assert len(used) <= n_valid
    # Supervised tokens exist and never sit on audio placeholders.
    assert (batch["labels"][r] != batch_lib.IGNORE_INDEX).any()
    assert not ((batch["labels"][r] != batch_lib.IGNORE_INDEX) & (idx[r] >= 0)).any()
  assert np.all(batch["positions"][batch["segment_ids"] == 0] == 0)

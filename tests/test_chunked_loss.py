"""The chunked cross-entropy (lm_head fused, logits made one token chunk at a time) gives the same
sums and gradients as `token_stats` on whole [B, L, V] logits, and the steps use it."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax import train_step as ts

pytestmark = pytest.mark.usefixtures("fast_compiles")

B, L, H, V = 3, 13, 16, 37


def _problem(seed=0):
  rng = np.random.default_rng(seed)
  hidden = jnp.asarray(rng.normal(size=(B, L, H)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(H, V)) * 0.5, jnp.float32)
  labels = rng.integers(0, V, (B, L)).astype(np.int32)
  labels[rng.random((B, L)) < 0.3] = -100
  labels[1, :] = -100  # a row without a single label
  tasks = rng.integers(0, 5, (B, L)).astype(np.int32)
  return hidden, w, jnp.asarray(labels), jnp.asarray(tasks)


def _reference(hidden, w, labels, tasks, z_loss):
  return ts.token_stats(hidden @ w, labels, tasks, z_loss)


def _chunked(hidden, w, labels, tasks, z_loss, chunk, vocab_block=8):
  return ts.chunked_token_stats(hidden, w, labels, tasks, z_loss, chunk, vocab_block)


@pytest.mark.parametrize("chunk,vocab_block", [(0, 8), (4, 8), (1, 37), (13, 64), (64, 19)])
@pytest.mark.parametrize("z_loss", [0.0, 1e-3])
def test_chunked_stats_equal_token_stats(chunk, vocab_block, z_loss):
  """V = 37 is prime: blocks of 8 pad the vocabulary to 40, 19 does too (2 blocks), 37 and 64
  are one block. Token chunks of 4 leave a padded tail (13 tokens); 1 is a chunk a token."""
  hidden, w, labels, tasks = _problem()
  want = jax.device_get(_reference(hidden, w, labels, tasks, z_loss))
  got = jax.device_get(jax.jit(_chunked, static_argnums=(4, 5, 6))(
      hidden, w, labels, tasks, z_loss, chunk, vocab_block))
  assert set(got) == set(want)
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)
  assert want["tokens"] > 0 and want["correct"] > 0  # the comparison is not of zeros


@pytest.mark.parametrize("chunk", [4, 0])
def test_chunked_loss_gradients_equal(chunk):
  """d(ce + z-loss + a per-task term)/d(hidden) and d/d(lm_head weight): the custom backward
  over vocabulary blocks (padded: 37 = 4 x 8 + 5), inside the rematerialised token-chunk scan."""
  hidden, w, labels, tasks = _problem(1)

  def objective(fn):
    def f(hidden, w):
      s = fn(hidden, w, labels, tasks, 1e-3)
      return s["ce_sum"] + s["z_loss_sum"] + 0.3 * s["task_ce_sum"][2]
    return f

  want = jax.grad(objective(_reference), argnums=(0, 1))(hidden, w)
  got = jax.jit(jax.grad(objective(lambda *a: _chunked(*a, chunk)), argnums=(0, 1)))(hidden, w)
  for g, r, name in zip(got, want, ("hidden", "lm_head")):
    np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=name)
  assert float(jnp.abs(want[1]).max()) > 0


@pytest.mark.slow
def test_program_steps_use_chunked_loss_equal_to_full_logits():
  """On the tiny model: the eval step's sums (lm_head fused, 3 token chunks x 4 vocabulary
  blocks) equal token_stats of the model's full logits, and the train step's loss and gradient
  norm equal those of one chunk and one block."""
  from moss_jax import sharding
  from test_train_helpers import tiny_config
  c = tiny_config(max_tokens=48)
  c.model.loss_chunk_size = 20  # 48 tokens = 2 full chunks + a padded one
  c.model.loss_vocab_block = 16  # 64 = 4 blocks
  c.optim.z_loss = 1e-3
  prog = ts.build_program(c, sharding.make_mesh(c.mesh))
  state = prog.init_state(jax.random.key(0))
  batch = prog.global_batch(ts.synthetic_batch(c, seed=5))
  params = ts.full_params(state)
  got = jax.device_get(prog.evaluate(params, batch))
  with sharding.use_mesh(prog.mesh):
    logits = prog.forward(params, batch)
  want = jax.device_get(ts.token_stats(logits, batch["labels"], batch["task_ids"], 1e-3))
  for key in want:
    np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-5, err_msg=key)

  whole = tiny_config(max_tokens=48)
  whole.model.loss_chunk_size = 0
  whole.model.loss_vocab_block = 64
  whole.optim.z_loss = 1e-3
  prog0 = ts.build_program(whole, sharding.make_mesh(whole.mesh))
  _, m_chunked = prog.step(prog.state_from_params(params), batch)
  _, m_whole = prog0.step(prog0.state_from_params(params), batch)
  np.testing.assert_allclose(float(m_chunked["loss"]), float(m_whole["loss"]), rtol=1e-6)
  np.testing.assert_allclose(float(m_chunked["grad_norm"]), float(m_whole["grad_norm"]), rtol=1e-5)

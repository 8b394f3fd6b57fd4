"""The attention implementations agree with the reference einsum path, and the LLM's train step
(attention=auto, chunked loss) holds no [L, L] and no [L, V] float32 buffer on CPU."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from moss_jax.model import attention, layers

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _inputs(seed=0, b=3, length=45, hq=6, hkv=2, d=8):
  """q/k/v and packed segment ids: several segments, one row of one segment, trailing padding."""
  rng = np.random.default_rng(seed)
  q = jnp.asarray(rng.normal(size=(b, length, hq, d)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(b, length, hkv, d)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(b, length, hkv, d)), jnp.float32)
  seg = np.zeros((b, length), np.int32)
  seg[0, :7], seg[0, 7:30], seg[0, 30:41] = 1, 2, 3  # 4 padding tokens at the end
  seg[1, :] = 1
  seg[2, :20], seg[2, 20:22] = 1, 2  # half the row is padding (segment 0)
  cot = jnp.asarray(rng.normal(size=(b, length, hq, d)), jnp.float32)
  return q, k, v, jnp.asarray(seg), cot


def _reference(q, k, v, seg, scale):
  return layers.attention(q, k, v, scale=scale, mask=attention.packed_causal_mask(seg))


@pytest.mark.parametrize("block_q,block_k", [(8, 16), (16, 8), (512, 512)])
def test_blockwise_matches_reference_forward_and_gradients(block_q, block_k):
  """Float32, packed segments + padding + GQA (3 query heads per K/V head); 45 tokens is not a
  multiple of any block, so the padded tail is exercised too."""
  q, k, v, seg, cot = _inputs()
  scale = 0.35

  def blockwise(q, k, v):
    return attention.blockwise_attention(q, k, v, seg, seg, scale=scale, causal=True,
                                         block_q=block_q, block_k=block_k)

  ref_out, ref_vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, seg, scale), q, k, v)
  out, vjp = jax.vjp(jax.jit(blockwise), q, k, v)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  for got, want, name in zip(vjp(cot), ref_vjp(cot), ("dq", "dk", "dv")):
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5, err_msg=name)


def test_blockwise_non_causal_cross_attention_and_empty_rows():
  """Queries and keys of different lengths (no causality): a query whose segment has no key
  returns zeros rather than NaN."""
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.normal(size=(2, 12, 6, 8)), jnp.float32)
  k = jnp.asarray(rng.normal(size=(2, 20, 2, 8)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(2, 20, 2, 8)), jnp.float32)
  q_seg = jnp.asarray(np.repeat([[1] * 6 + [2] * 4 + [5] * 2], 2, 0), jnp.int32)
  kv_seg = jnp.asarray(np.repeat([[1] * 9 + [2] * 11], 2, 0), jnp.int32)
  out = attention.blockwise_attention(q, k, v, q_seg, kv_seg, scale=0.5, causal=False,
                                      block_q=4, block_k=8)
  mask = (q_seg[:, :, None] == kv_seg[:, None, :])[:, None]
  want = layers.attention(q, k, v, scale=0.5, mask=mask)
  np.testing.assert_allclose(out[:, :10], want[:, :10], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(out[:, 10:], 0.0)


def test_segment_attention_dispatch():
  """`xla` and `blockwise` agree through the model-facing entry point; `auto` is blockwise on
  CPU and picks the platform kernels elsewhere; unknown names are refused."""
  q, k, v, seg, _ = _inputs()
  got = {impl: attention.segment_causal_attention(q, k, v, seg, scale=0.3, implementation=impl,
                                                  block_size=16)
         for impl in ("xla", "blockwise", "auto")}
  np.testing.assert_allclose(got["blockwise"], got["xla"], atol=1e-5, rtol=1e-5)
  np.testing.assert_array_equal(got["auto"], got["blockwise"])
  assert attention.resolve("auto", jnp.float32) == "blockwise"  # this test runs on CPU
  assert attention.resolve("auto", jnp.bfloat16, backend="tpu") == "splash"
  assert attention.resolve("auto", jnp.bfloat16, backend="gpu") == "cudnn"
  assert attention.resolve("auto", jnp.float32, backend="gpu") == "blockwise"
  with pytest.raises(ValueError, match="choose one of"):
    attention.resolve("flash", jnp.float32)


def test_bfloat16_blockwise_stays_close_to_reference():
  """bf16 inputs (the 4b/8b presets): float32 softmax statistics keep the result within bf16
  rounding of the reference path."""
  q, k, v, seg, _ = _inputs()
  q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
  out = attention.blockwise_attention(q, k, v, seg, seg, scale=0.35, causal=True, block_q=16,
                                      block_k=16)
  assert out.dtype == jnp.bfloat16
  want = _reference(q, k, v, seg, 0.35)
  np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(want, np.float32),
                             atol=3e-2, rtol=3e-2)


def test_config_validation_knows_the_implementations():
  from moss_jax.config_validation import ConfigError, validate
  from test_train_helpers import tiny_config
  c = tiny_config()
  c.model.attention = "flash"
  with pytest.raises(ConfigError, match="model.attention='flash'"):
    validate(c, num_devices=8, check_paths=False)
  c.model.attention = "splash"
  c.data.max_tokens = 200
  with pytest.raises(ConfigError, match="multiple of 128"):
    validate(c, num_devices=8, check_paths=False)


# ----------------------------------------------------------------------------- compiled buffers

L, V = 384, 200  # distinct from every other dimension of the model below


def _buffer_shapes(hlo_text: str) -> set[tuple[str, tuple[int, ...]]]:
  """Every (dtype, shape) in an HLO module's text."""
  return {(dt, tuple(int(x) for x in dims.split(",") if x))
          for dt, dims in re.findall(r"\b(pred|s32|u32|bf16|f16|f32)\[([0-9,]*)\]", hlo_text)}


def _offending(shapes) -> tuple[list, list]:
  square = sorted({s for s in shapes if s[1].count(L) >= 2})
  vocab = sorted({s for s in shapes if s[0] == "f32" and L in s[1] and V in s[1]})
  return square, vocab


def _compiled_step_text(**model_overrides) -> str:
  from moss_jax import sharding
  from moss_jax import train_step as ts
  from test_train_helpers import tiny_config
  c = tiny_config(max_tokens=L)
  c.model.text.vocab_size = V
  c.model.attention_block_size = 128
  c.model.loss_vocab_block = 64  # blocks of 50
  c.model.update(model_overrides)
  prog = ts.build_program(c, sharding.make_mesh(c.mesh))
  with sharding.use_mesh(prog.mesh):
    return prog.train_step.lower(prog.abstract_state, prog.abstract_batch).compile().as_text()


@pytest.mark.slow
def test_auto_train_step_holds_no_length_squared_or_vocab_buffer():
  """The whole compiled train step (forward and backward, L=384 tokens, vocab 200): with
  attention=auto on CPU and the chunked loss, no buffer has two length dims and no float32 buffer
  has a length and a vocabulary dim. The reference settings do have both (the check can fail)."""
  square, vocab = _offending(_buffer_shapes(_compiled_step_text()))
  assert not square, f"[L, L] buffers: {square[:5]}"
  assert not vocab, f"[L, V] float32 buffers: {vocab[:5]}"
  square, vocab = _offending(_buffer_shapes(_compiled_step_text(attention="xla",
                                                                 loss_vocab_block=V)))
  assert square and vocab


def test_splash_kernel_matches_reference_in_the_pallas_interpreter():
  """The TPU splash path (GQA as per-K/V-head MQA kernels, segment ids, causal mask), run by
  Pallas' interpreter on CPU: forward and gradients equal the reference. Not run on a TPU here."""
  q, k, v, seg, cot = _inputs(length=256, hq=4, hkv=2, d=128)
  seg = seg.at[1, 100:].set(2)

  def splash(q, k, v):
    return attention.segment_causal_attention(q, k, v, seg, scale=0.1, implementation="splash",
                                              block_size=128)

  ref_out, ref_vjp = jax.vjp(lambda q, k, v: _reference(q, k, v, seg, 0.1), q, k, v)
  out, vjp = jax.vjp(splash, q, k, v)
  np.testing.assert_allclose(out, ref_out, atol=1e-5, rtol=1e-5)
  for got, want, name in zip(vjp(cot), ref_vjp(cot), ("dq", "dk", "dv")):
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=name)

"""The analytic FLOP model against XLA's own count of the compiled train step."""

from __future__ import annotations

import jax
import pytest

from moss_jax import flops
from moss_jax import sharding
from moss_jax import train_step as ts
from test_train_helpers import tiny_config

B, L = 2, 128


def _config(stage: str):
  """Widths where matrix products dominate (XLA also counts element-wise work); unrolled layers
  because XLA's cost analysis counts a scanned loop body once, not once per layer."""
  c = tiny_config(batch_size=B, max_tokens=L, stage=stage)
  a, t = c.model.audio, c.model.text
  a.d_model, a.encoder_ffn_dim, a.encoder_attention_heads, a.downsample_hidden_size = 128, 512, 4, 16
  t.hidden_size, t.intermediate_size, t.vocab_size = 128, 512, 512
  t.num_attention_heads, t.num_key_value_heads, t.head_dim = 4, 2, 32
  c.model.adapter_hidden_size = 256
  c.model.scan_layers = False
  c.model.attention = "xla"  # the analytic count is of the reference path's full score matrix
  return c


def _xla_flops(config) -> float:
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:1])
  prog = ts.build_program(config, mesh)
  cost = prog.train_step.lower(prog.abstract_state, prog.abstract_batch).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float(cost["flops"])


@pytest.mark.parametrize("stage", ["full", "adapter", "encoder_frozen"])
def test_analytic_flops_match_xla_cost_analysis(stage):
  c = _config(stage)
  # The kernels compute the whole causal score matrix, so compare at causal_factor=1.
  analytic = flops.step_flops(c.model, B, L, c.data.max_audio_chunks, stage, causal_factor=1.0)
  ratio = _xla_flops(c) / analytic["total"]
  # XLA adds element-wise ops (norms, softmax, GELU, Adam): a few percent above the matmuls.
  assert 1.0 <= ratio <= 1.15, (stage, ratio)


def test_frozen_parts_cost_forward_only():
  c = _config("full")
  args = (c.model, B, L, c.data.max_audio_chunks)
  full = flops.step_flops(*args, stage="full")
  stage1 = flops.step_flops(*args, stage="adapter")
  fwd = flops.step_flops(*args, stage="full", train=False)
  assert fwd["backward"] == 0 and fwd["total"] == full["forward"] == stage1["forward"]
  enc = ("conv1", "conv2", "conv3", "stem_proj", "encoder_qkvo", "encoder_mlp", "encoder_attention")
  for name in enc:  # frozen encoder, nothing trainable upstream: forward only
    assert stage1["by_product"][name] == fwd["by_product"][name]
  # Frozen LLM weights still pass input gradients to the adapter: 2x, not 3x, forward.
  assert stage1["by_product"]["llm_mlp"] == 2 * fwd["by_product"]["llm_mlp"]
  assert full["by_product"]["llm_mlp"] == 3 * fwd["by_product"]["llm_mlp"]
  # conv1 reads the mel: no input gradient even when trained.
  assert full["by_product"]["conv1"] == 2 * fwd["by_product"]["conv1"]
  square = flops.step_flops(*args, stage="full", causal_factor=1.0)  # default 0.5: causal half
  assert full["by_product"]["llm_attention"] == square["by_product"]["llm_attention"] / 2


def test_mfu():
  assert flops.mfu(2e12, 2.0, 1e12) == pytest.approx(1.0)
  assert flops.mfu(1e12, 0.0, 1e12) == 0.0

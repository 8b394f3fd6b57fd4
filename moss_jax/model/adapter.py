"""Audio adapter and DeepStack mergers (spec section 3): bias-free SwiGLU MLPs to the LLM width."""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax

from moss_jax.model import layers

Array = jax.Array


class GatedMLP(nn.Module):
  """down_proj(SiLU(gate_proj(x)) * up_proj(x)); used for the adapter and for every merger."""
  hidden_size: int
  out_size: int
  dtype: Any
  param_dtype: Any
  in_axis: str = "audio_embed"
  out_axis: str = "embed"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    gate = layers.dense(self.hidden_size, (self.in_axis, "mlp"), name="gate_proj", **kw)(x)
    up = layers.dense(self.hidden_size, (self.in_axis, "mlp"), name="up_proj", **kw)(x)
    h = layers.constrain(nn.silu(gate) * up, ("batch", "length", "mlp"))
    return layers.dense(self.out_size, ("mlp", self.out_axis), name="down_proj", **kw)(h)

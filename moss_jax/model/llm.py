"""The Qwen3 dense decoder (spec section 4), with DeepStack injection after the first K layers.

Attention is causal AND restricted to the token's own packed segment (segment_ids; 0 = padding,
which attends to earlier padding, so it never sees an all-masked row). RoPE positions come from
the batch (they restart in every packed segment). The layers receive segment ids, not a mask:
the attention implementation (model/attention.py, `model.attention`) builds the mask per block.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moss_jax.model import adapter, layers
from moss_jax.model import attention as attention_lib
from moss_jax.model.attention import packed_causal_mask  # noqa: F401  (re-exported)

Array = jax.Array

ACT = ("batch", "length", "embed")


class Qwen3Attention(nn.Module):
  """GQA self-attention; q_norm/k_norm (per head) come BEFORE RoPE, as in Qwen3."""
  config: ml_collections.ConfigDict  # config.model.text
  dtype: Any
  param_dtype: Any
  attention: str = "auto"  # config.model.attention
  attention_block_size: int = attention_lib.DEFAULT_BLOCK

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array) -> Array:
    cfg = self.config
    hd, nq, nkv = cfg.head_dim, cfg.num_attention_heads, cfg.num_key_value_heads
    kw = dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
    norm_kw = dict(eps=cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                   axis_name="head_dim")
    b, l, _ = x.shape
    q = layers.dense(nq * hd, ("embed", "heads"), name="q_proj", **kw)(x).reshape(b, l, nq, hd)
    k = layers.dense(nkv * hd, ("embed", "kv_heads"), name="k_proj", **kw)(x).reshape(b, l, nkv, hd)
    v = layers.dense(nkv * hd, ("embed", "kv_heads"), name="v_proj", **kw)(x).reshape(b, l, nkv, hd)
    q = layers.RMSNorm(name="q_norm", **norm_kw)(q)
    k = layers.RMSNorm(name="k_norm", **norm_kw)(k)
    cos, sin = layers.rope_tables(positions, hd, cfg.rope_theta, self.dtype)
    q = layers.constrain(layers.apply_rope(q, cos, sin), ("batch", "length", "heads", None))
    k = layers.constrain(layers.apply_rope(k, cos, sin), ("batch", "length", "kv_heads", None))
    v = layers.constrain(v, ("batch", "length", "kv_heads", None))
    out = attention_lib.segment_causal_attention(
        q, k, v, segment_ids, scale=hd ** -0.5, implementation=self.attention,
        block_size=self.attention_block_size).reshape(b, l, nq * hd)
    return layers.dense(cfg.hidden_size, ("heads", "embed"), name="o_proj", **kw)(out)


class Qwen3DecoderLayer(nn.Module):
  """Pre-RMSNorm block, then the DeepStack add: inject[layer_index] when layer_index < K.

  `inject` is [K, B, L, H] (zeros off the audio positions) or None; it is a broadcast input of the
  layer scan and `layer_index` a scanned one, so one scan covers injected and plain layers alike.
  """
  config: ml_collections.ConfigDict
  dtype: Any
  param_dtype: Any
  attention: str = "auto"
  attention_block_size: int = attention_lib.DEFAULT_BLOCK

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array, inject: Array | None,
               layer_index: Array) -> tuple[Array, None]:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
    x = x + Qwen3Attention(cfg, name="self_attn", attention=self.attention,
                           attention_block_size=self.attention_block_size, **kw)(
                               h, positions, segment_ids)
    h = layers.RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
    x = x + adapter.GatedMLP(cfg.intermediate_size, cfg.hidden_size, in_axis="embed",
                             name="mlp", **kw)(h)
    if inject is not None:
      k = inject.shape[0]
      add = inject[jnp.minimum(layer_index, k - 1)]
      x = x + jnp.where(layer_index < k, add, jnp.zeros_like(add))
    return layers.constrain(x, ACT), None


class Qwen3Model(nn.Module):
  """Embedding table, decoder layers and final norm (the `language_model` subtree)."""
  config: ml_collections.ConfigDict  # config.model.text
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  attention: str = "auto"  # config.model.attention
  attention_block_size: int = attention_lib.DEFAULT_BLOCK
  scan_unroll: int = 1  # layers per scan iteration (config.model.scan_unroll)

  def setup(self):
    cfg = self.config
    self.embed_tokens = nn.Embed(
        cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(layers.DEFAULT_INIT, ("vocab", "embed")))
    layer_cls = layers.maybe_remat(Qwen3DecoderLayer, self.remat_policy, scanned=self.scan_layers)
    kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype, attention=self.attention,
              attention_block_size=self.attention_block_size)
    if self.scan_layers:
      scanned = nn.scan(layer_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0),
                        length=cfg.num_hidden_layers,
                        unroll=min(self.scan_unroll, cfg.num_hidden_layers),
                        metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = scanned(**kw)
    else:
      self.layers = [layer_cls(**kw) for _ in range(cfg.num_hidden_layers)]
    self.norm = layers.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

  def embed(self, input_ids: Array) -> Array:
    return layers.constrain(self.embed_tokens(input_ids), ACT)

  def __call__(self, x: Array, positions: Array, segment_ids: Array,
               inject: Array | None = None) -> Array:
    """x: input embeddings [B, L, H]; inject: [K, B, L, H] DeepStack adds or None. -> [B, L, H]."""
    x = layers.constrain(x.astype(self.dtype), ACT)
    if inject is not None:
      inject = inject.astype(self.dtype)
    n = self.config.num_hidden_layers
    if self.scan_layers:
      x, _ = self.layers(x, positions, segment_ids, inject, jnp.arange(n, dtype=jnp.int32))
    else:
      for i, layer in enumerate(self.layers):
        x, _ = layer(x, positions, segment_ids, inject, jnp.asarray(i, jnp.int32))
    return self.norm(x)

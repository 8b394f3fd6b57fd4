"""The Qwen3 dense decoder (spec section 4), with DeepStack injection after the first K layers.

Attention is causal AND restricted to the token's own packed segment (segment_ids; 0 = padding,
which attends to earlier padding, so it never sees an all-masked row). RoPE positions come from
the batch (they restart in every packed segment). The layers receive segment ids, not a mask:
the attention implementation (model/attention.py, `model.attention`) builds the mask per block.

Generation passes a preallocated `KVCache` (keys and values of every layer, [layers, B, S,
kv_heads, head_dim]). Prefill (no `decode_index`) attends like training and writes the prompt's
keys/values at cache columns 0..L-1; a decode step (`decode_index` [B], the cache column of each
row's new token) writes its key/value there and attends (`layers.attention`) over the columns up
to it, so rows of different prompt lengths (right-padded, one segment each) decode side by side.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moss_jax.model import adapter, layers
from moss_jax.model import attention as attention_lib
from moss_jax.model.attention import packed_causal_mask  # noqa: F401  (re-exported)

Array = jax.Array

ACT = ("batch", "length", "embed")
KV = ("batch", "length", "kv_heads", None)


class KVCache(NamedTuple):
  """Keys and values (after k_norm and RoPE) of every layer: [layers, B, S, kv_heads, head_dim]."""
  k: Array
  v: Array


def init_cache(text_config: ml_collections.ConfigDict, batch: int, length: int,
               dtype: Any) -> KVCache:
  """An all-zero cache of `length` columns (prompt + new tokens) for `batch` rows."""
  shape = (text_config.num_hidden_layers, batch, length, text_config.num_key_value_heads,
           text_config.head_dim)
  zeros = layers.constrain(jnp.zeros(shape, dtype), ("layers",) + KV)
  return KVCache(zeros, zeros)


def decode_mask(decode_index: Array, num_new: int, cache_length: int) -> Array:
  """[B, 1, num_new, S] bool: new token i of row b sees cache columns <= decode_index[b] + i."""
  last = decode_index[:, None] + jnp.arange(num_new)[None, :]
  return (jnp.arange(cache_length)[None, None, :] <= last[:, :, None])[:, None]


def _write(cache: Array, new: Array, start: Array | None) -> Array:
  """cache [B, S, ...] with new [B, l, ...] at columns start[b].. (0 for every row when None)."""
  new = new.astype(cache.dtype)
  if start is None:
    return jax.lax.dynamic_update_slice_in_dim(cache, new, 0, axis=1)
  return jax.vmap(lambda c, n, i: jax.lax.dynamic_update_slice_in_dim(c, n, i, axis=0))(
      cache, new, start)


class Qwen3Attention(nn.Module):
  """GQA self-attention; q_norm/k_norm (per head) come BEFORE RoPE, as in Qwen3."""
  config: ml_collections.ConfigDict  # config.model.text
  dtype: Any
  param_dtype: Any
  attention: str = "auto"  # config.model.attention
  attention_block_size: int = attention_lib.DEFAULT_BLOCK

  @nn.compact
  def __call__(self, x: Array, positions: Array, segment_ids: Array | None,
               cache: tuple[Array, Array] | None = None, decode_index: Array | None = None):
    """-> output [B, L, H]; with a layer's cache (k, v [B, S, kv_heads, head_dim]) also the
    updated cache (see the module docstring; segment_ids are not read in a decode step)."""
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
    o_proj = layers.dense(cfg.hidden_size, ("heads", "embed"), name="o_proj", **kw)
    if cache is not None and decode_index is not None:  # one decode step over the cache
      k_cache = layers.constrain(_write(cache[0], k, decode_index), KV)
      v_cache = layers.constrain(_write(cache[1], v, decode_index), KV)
      out = layers.attention(q, k_cache.astype(q.dtype), v_cache.astype(q.dtype),
                             scale=hd ** -0.5,
                             mask=decode_mask(decode_index, l, k_cache.shape[1]))
      return o_proj(out.reshape(b, l, nq * hd)), (k_cache, v_cache)
    out = attention_lib.segment_causal_attention(
        q, k, v, segment_ids, scale=hd ** -0.5, implementation=self.attention,
        block_size=self.attention_block_size).reshape(b, l, nq * hd)
    if cache is None:
      return o_proj(out)
    # Prefill: attention exactly as in training, the prompt's keys/values into the cache.
    k_cache = layers.constrain(_write(cache[0], k, None), KV)
    v_cache = layers.constrain(_write(cache[1], v, None), KV)
    return o_proj(out), (k_cache, v_cache)


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
  def __call__(self, x: Array, positions: Array, segment_ids: Array | None,
               inject: Array | None, layer_index: Array,
               cache: tuple[Array, Array] | None = None,
               decode_index: Array | None = None) -> tuple[Array, Any]:
    """-> (output, this layer's updated cache or None)."""
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = layers.saved_layer_input(x)
    h = layers.RMSNorm(cfg.rms_norm_eps, name="input_layernorm", **kw)(x)
    attn = Qwen3Attention(cfg, name="self_attn", attention=self.attention,
                          attention_block_size=self.attention_block_size, **kw)
    if cache is None:
      x = x + attn(h, positions, segment_ids)
    else:
      a, cache = attn(h, positions, segment_ids, cache, decode_index)
      x = x + a
    h = layers.RMSNorm(cfg.rms_norm_eps, name="post_attention_layernorm", **kw)(x)
    x = x + adapter.GatedMLP(cfg.intermediate_size, cfg.hidden_size, in_axis="embed",
                             name="mlp", **kw)(h)
    if inject is not None:
      k = inject.shape[0]
      add = inject[jnp.minimum(layer_index, k - 1)]
      x = x + jnp.where(layer_index < k, add, jnp.zeros_like(add))
    return layers.constrain(x, ACT), cache


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
      # Dropout keys split per layer too (LoRA dropout), so layers draw different masks.
      scanned = nn.scan(layer_cls, variable_axes={"params": 0},
                        split_rngs={"params": True, "dropout": True},
                        in_axes=(nn.broadcast, nn.broadcast, nn.broadcast, 0, 0, nn.broadcast),
                        length=cfg.num_hidden_layers,
                        unroll=min(self.scan_unroll, cfg.num_hidden_layers),
                        metadata_params={nn.PARTITION_NAME: "layers"})
      self.layers = scanned(**kw)
    else:
      self.layers = [layer_cls(**kw) for _ in range(cfg.num_hidden_layers)]
    self.norm = layers.RMSNorm(cfg.rms_norm_eps, dtype=self.dtype, param_dtype=self.param_dtype)

  def embed(self, input_ids: Array) -> Array:
    return layers.constrain(self.embed_tokens(input_ids), ACT)

  def __call__(self, x: Array, positions: Array, segment_ids: Array | None,
               inject: Array | None = None, cache: KVCache | None = None,
               decode_index: Array | None = None):
    """x: input embeddings [B, L, H]; inject: [K, B, L, H] DeepStack adds or None. -> [B, L, H].

    With `cache` (prefill, or a decode step when `decode_index` [B] is given; segment_ids are
    not read then) -> (hidden [B, L, H], updated KVCache).
    """
    x = layers.constrain(x.astype(self.dtype), ACT)
    if inject is not None:
      inject = inject.astype(self.dtype)
    n = self.config.num_hidden_layers
    kv = None if cache is None else (cache.k, cache.v)
    if self.scan_layers:
      x, kv = self.layers(x, positions, segment_ids, inject, jnp.arange(n, dtype=jnp.int32), kv,
                          decode_index)
    else:
      new = []
      for i, layer in enumerate(self.layers):
        x, layer_kv = layer(x, positions, segment_ids, inject, jnp.asarray(i, jnp.int32),
                            None if kv is None else (kv[0][i], kv[1][i]), decode_index)
        new.append(layer_kv)
      if kv is not None:
        kv = (jnp.stack([a for a, _ in new]), jnp.stack([b for _, b in new]))
    if cache is None:
      return self.norm(x)
    return self.norm(x), KVCache(*kv)

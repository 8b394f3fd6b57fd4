"""The MOSS-Audio encoder (spec section 2): conv stem + Whisper pre-LN layers, run per 4 s chunk.

Every chunk slot of the batch is an independent sequence: positions restart at 0, keys past
ceil(frames / 8) are masked, and attention never crosses chunks. Shapes stay static (no truncation
to the longest chunk): masked keys and discarded query rows leave the valid outputs unchanged.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from moss_jax import batch as batch_lib
from moss_jax.model import layers

Array = jax.Array

# 128 mel bins after three stride-2 convolutions; the reference hard-codes it.
CONV_FREQ_OUT = batch_lib.NUM_MEL_BINS // batch_lib.DOWNSAMPLE

STEM_IMPLS = ("auto", "conv", "conv_matmul_bwd")
# From this many stem channels on, the matmul backward pass beats XLA:CPU's convolution gradients
# (`python -m benchmarks.conv_stem` on a 2-core AVX2 EPYC, stem forward + backward: 64 ch
# 1.43-1.93x, 32 ch 1.08x, 24 ch 1.31x; 16 ch 0.97-1.10x alone but 0.93x in the demo's train step,
# `python -m benchmarks.step_variants --shape demo`).
MATMUL_BWD_MIN_CHANNELS_ON_CPU = 32


def stem_impl(config: ml_collections.ConfigDict) -> str:
  """The conv stem's implementation: config.audio.conv_stem_impl, with 'auto' resolved.

  'auto' is 'conv_matmul_bwd' on a CPU backend with >= MATMUL_BWD_MIN_CHANNELS_ON_CPU channels
  and 'conv' otherwise (TPU and GPU have native convolutions and convolution gradients).
  """
  impl = config.get("conv_stem_impl", "auto")
  if impl not in STEM_IMPLS:
    raise ValueError(f"audio.conv_stem_impl must be one of {STEM_IMPLS}, got {impl!r}")
  if impl == "auto":
    wide = config.downsample_hidden_size >= MATMUL_BWD_MIN_CHANNELS_ON_CPU
    impl = "conv_matmul_bwd" if jax.default_backend() == "cpu" and wide else "conv"
  return impl


def _conv3x3_stride2(x: Array, kernel: Array) -> Array:
  """x [N, H, W, C_in], kernel [3, 3, C_in, C_out] -> [N, ceil(H/2), ceil(W/2), C_out]
  (padding 1)."""
  return jax.lax.conv_general_dilated(x, kernel, (2, 2), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _stride2_taps(x: Array, ho: int, wo: int) -> Array:
  """The nine inputs each output position reads, [N, Ho, Wo, 9 * C_in], in the kernel's
  [3, 3, C_in] order (tap-major): what one matmul with the flattened kernel needs."""
  xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return jnp.concatenate([xp[:, a:a + 2 * ho - 1:2, b:b + 2 * wo - 1:2, :]
                          for a in range(3) for b in range(3)], axis=-1)


def _shift_up(t: Array, axis: int) -> Array:
  """t[m] <- t[m + 1] along `axis`, zero at the end: the next output's contribution."""
  pads = [(0, 0)] * t.ndim
  pads[axis] = (0, 1)
  return jnp.pad(jax.lax.slice_in_dim(t, 1, None, axis=axis), pads)


def _fold_taps(per_tap: Array) -> Array:
  """[N, Ho, Wo, 3, 3, C] (each output's gradient for each of its nine inputs) ->
  [N, 2Ho, 2Wo, C]: adds each tap's values where that tap read them.

  Output m reads input rows 2m - 1, 2m, 2m + 1 with taps 0, 1, 2, so even row 2m is read only
  by tap 1 of output m, odd row 2m + 1 by tap 2 of output m and tap 0 of output m + 1 (the
  padding row -1 is dropped); the same for columns. The four (row, column) parity planes are
  sums of taps, interleaved by one stack: one pass over per_tap in the layout the matmul wrote.
  """
  n, ho, wo, _, _, c = per_tap.shape
  tap = lambda a, b: per_tap[:, :, :, a, b]
  down, right = 1, 2
  even_even = tap(1, 1)
  even_odd = tap(1, 2) + _shift_up(tap(1, 0), right)
  odd_even = tap(2, 1) + _shift_up(tap(0, 1), down)
  odd_odd = (tap(2, 2) + _shift_up(tap(2, 0), right) + _shift_up(tap(0, 2), down)
             + _shift_up(_shift_up(tap(0, 0), down), right))
  planes = jnp.stack([jnp.stack([even_even, even_odd], 3), jnp.stack([odd_even, odd_odd], 3)],
                     2)  # [N, Ho, 2, Wo, 2, C]
  return planes.reshape(n, 2 * ho, 2 * wo, c)


@jax.custom_vjp
def conv3x3_stride2_matmul_bwd(x: Array, kernel: Array) -> Array:
  """`_conv3x3_stride2` whose backward pass is two matmuls and strided adds.

  XLA:CPU runs the autodiff backward of a strided convolution (a base-dilated convolution for
  the input, a layout-transposing reduction for the kernel) several times slower per FLOP than
  a matmul. Here the input gradient is dy @ kernel^T per tap, each tap's [N, Ho, Wo, C_in]
  folded back onto the stride-2 grid it read (`_fold_taps`: no multiplications by inserted
  zeros), and the kernel gradient one matmul of the taps with dy. Same sums as the autodiff
  gradient in a different order (float32 rounding only). `python -m benchmarks.conv_stem`
  times both backward passes of the stem side by side.
  """
  return _conv3x3_stride2(x, kernel)


def _conv_fwd(x, kernel):
  return _conv3x3_stride2(x, kernel), (x, kernel)


def _conv_bwd(residuals, dy):
  x, kernel = residuals
  n, h, w, c_in = x.shape
  _, ho, wo, c_out = dy.shape
  positions = dy.reshape(n * ho * wo, c_out)
  # dy is the left operand of both matmuls, so XLA:CPU multiplies the taps as they lie and
  # writes per_tap in the order _fold_taps reads. With the taps on the left it first writes a
  # transposed [9 C_in, positions] copy of them (118 MB at the mid shape's second convolution).
  taps = _stride2_taps(x, ho, wo).reshape(n * ho * wo, 9 * c_in)
  dkernel_t = jax.lax.dot_general(positions, taps, (((0,), (0,)), ((), ())))  # [C_out, 9 C_in]
  dkernel = dkernel_t.T.reshape(kernel.shape)
  per_tap = jax.lax.dot_general(positions, kernel.reshape(9 * c_in, c_out),
                                (((1,), (1,)), ((), ())))  # [positions, 9 C_in]
  dx = _fold_taps(per_tap.reshape(n, ho, wo, 3, 3, c_in))[:, :h, :w]
  return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


conv3x3_stride2_matmul_bwd.defvjp(_conv_fwd, _conv_bwd)


class StemConv(nn.Module):
  """3x3, stride 2, padding 1 convolution over NHWC, with nn.Conv's parameters and init.

  Both implementations run `lax.conv_general_dilated` forward (exactly what nn.Conv runs); impl
  'conv_matmul_bwd' replaces its backward pass (`conv3x3_stride2_matmul_bwd`).
  """
  features: int
  impl: str
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c_in = x.shape[-1]
    kernel = self.param("kernel", nn.with_logical_partitioning(
        nn.initializers.lecun_normal(), (None, None, "conv_in", "conv_out")),
                        (3, 3, c_in, self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(),
                                                           ("conv_out",)),
                      (self.features,), self.param_dtype)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    conv = conv3x3_stride2_matmul_bwd if self.impl == "conv_matmul_bwd" else _conv3x3_stride2
    return conv(x, kernel) + bias


class EncoderAttention(nn.Module):
  """Whisper self-attention: k_proj has no bias; q is scaled AFTER its bias is added."""
  config: ml_collections.ConfigDict
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array, bias: Array) -> Array:
    cfg = self.config
    d, heads = cfg.d_model, cfg.encoder_attention_heads
    head_dim = d // heads
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    q = layers.dense(d, ("audio_embed", "audio_heads"), use_bias=True, name="q_proj", **kw)(x)
    k = layers.dense(d, ("audio_embed", "audio_heads"), use_bias=False, name="k_proj", **kw)(x)
    v = layers.dense(d, ("audio_embed", "audio_heads"), use_bias=True, name="v_proj", **kw)(x)
    q = q * jnp.asarray(head_dim ** -0.5, q.dtype)
    split = lambda t: t.reshape(t.shape[:2] + (heads, head_dim))
    names = ("audio_chunks", "length", "audio_heads", None)
    q, k, v = (layers.constrain(split(t), names) for t in (q, k, v))
    out = layers.attention(q, k, v, scale=1.0, bias=bias)
    out = out.reshape(out.shape[:2] + (d,))
    return layers.dense(d, ("audio_heads", "audio_embed"), use_bias=True, name="out_proj",
                        **kw)(out)


class EncoderLayer(nn.Module):
  """Pre-LN Whisper block. Returns (carry, output) so the same class serves nn.scan."""
  config: ml_collections.ConfigDict
  dtype: Any
  param_dtype: Any

  @nn.compact
  def __call__(self, x: Array, bias: Array) -> tuple[Array, Array]:
    cfg = self.config
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    h = layers.layer_norm(cfg.layer_norm_eps, name="self_attn_layer_norm", **kw)(x)
    x = x + EncoderAttention(cfg, name="self_attn", **kw)(h, bias)
    h = layers.layer_norm(cfg.layer_norm_eps, name="final_layer_norm", **kw)(x)
    h = layers.dense(cfg.encoder_ffn_dim, ("audio_embed", "audio_mlp"), use_bias=True,
                     name="fc1", **kw)(h)
    h = layers.exact_gelu(h)
    h = layers.constrain(h, ("audio_chunks", "length", "audio_mlp"))
    h = layers.dense(cfg.d_model, ("audio_mlp", "audio_embed"), use_bias=True, name="fc2", **kw)(h)
    x = layers.constrain(x + h, ("audio_chunks", "length", "audio_embed"))
    return x, x


class AudioEncoder(nn.Module):
  """audio_mel [B, C, 128, F] + frames [B, C] -> final [B*C, T', D], taps [K, B*C, T', D].

  T' = ceil(F / 8). Taps are the raw residual stream after the listed layers (before the final
  LayerNorm), spec 2.5.
  """
  config: ml_collections.ConfigDict  # config.model.audio
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  scan_unroll: int = 1  # layers per scan iteration (config.model.scan_unroll)

  def stem(self, mel: Array) -> Array:
    """[N, 128, F] -> [N, T', D]: three stride-2 3x3 convs (NHWC, H = freq, W = time), stem_proj."""
    cfg = self.config
    ch = cfg.downsample_hidden_size
    impl = stem_impl(cfg)
    x = mel.astype(self.dtype)[..., None]  # [N, 128, F, 1]
    x = layers.constrain(x, ("audio_chunks", None, None, None))
    for i in (1, 2, 3):
      x = StemConv(ch, impl, dtype=self.dtype, param_dtype=self.param_dtype, name=f"conv{i}")(x)
      x = layers.exact_gelu(x)
      x = layers.constrain(x, ("audio_chunks", None, None, "conv_out"))
    n, f, t, c = x.shape
    if f != CONV_FREQ_OUT:
      raise ValueError(f"the conv stem needs 128 mel bins (got {mel.shape[1]})")
    # Reference flatten order is channel-major (index c * 16 + f): [N, F, T, C] -> [N, T, C, F].
    x = jnp.transpose(x, (0, 2, 3, 1)).reshape(n, t, c * f)
    x = layers.dense(cfg.d_model, ("conv_out", "audio_embed"), use_bias=True, name="stem_proj",
                     dtype=self.dtype, param_dtype=self.param_dtype)(x)
    return x

  @nn.compact
  def __call__(self, audio_mel: Array, audio_chunk_frames: Array) -> tuple[Array, Array | None]:
    cfg = self.config
    b, c, mels, f = audio_mel.shape
    # The stem's full-resolution conv activations (and GELU residuals) dwarf the encoder layers'
    # activations, so under any remat policy the stem is recomputed too.
    stem = layers.maybe_remat(AudioEncoder.stem, self.remat_policy)
    x = stem(self, audio_mel.reshape(b * c, mels, f))
    t = x.shape[1]
    pos = layers.sinusoid_positions(t, cfg.d_model).astype(self.dtype)
    x = layers.constrain(x + pos[None], ("audio_chunks", "length", "audio_embed"))

    valid = jnp.arange(t)[None, :] < batch_lib.num_audio_tokens(
        audio_chunk_frames.reshape(b * c, 1))
    bias = jnp.where(valid, 0, jnp.finfo(self.dtype).min).astype(self.dtype)[:, None, None, :]

    x, taps = self.run_layers(x, bias)
    x = layers.layer_norm(cfg.layer_norm_eps, name="layer_norm", dtype=self.dtype,
                          param_dtype=self.param_dtype)(x)
    return x, taps

  def run_layers(self, x: Array, bias: Array) -> tuple[Array, Array | None]:
    """All encoder layers -> (last output, taps [K, N, T', D] or None)."""
    cfg = self.config
    taps = tuple(cfg.deepstack_encoder_layer_indexes)
    layer_cls = layers.maybe_remat(EncoderLayer, self.remat_policy, scanned=self.scan_layers)
    kw = dict(config=cfg, dtype=self.dtype, param_dtype=self.param_dtype)
    if not self.scan_layers:
      outputs = []
      for i in range(cfg.encoder_layers):
        x, _ = layer_cls(name=f"layers_{i}", **kw)(x, bias)
        outputs.append(x)
      return x, (jnp.stack([outputs[i] for i in taps]) if taps else None)

    # Taps ride in the carry ([K, N, T', D], written at layer taps[k]) rather than as stacked
    # per-layer outputs: the scan would otherwise keep all encoder_layers outputs alive. The
    # write is linear in the buffer, so the backward pass saves no copy of it per layer.
    slot = [-1] * cfg.encoder_layers
    for k, i in enumerate(taps):
      slot[i] = k

    def body(layer, carry, bias, tap_slot):
      h, buf = carry
      h, _ = layer(h, bias)
      if buf is not None:
        k = jnp.maximum(tap_slot, 0)
        keep = jax.lax.dynamic_index_in_dim(buf, k, keepdims=False)
        buf = jax.lax.dynamic_update_index_in_dim(buf, jnp.where(tap_slot >= 0, h, keep), k, 0)
      return (h, buf), None

    # Dropout keys split per layer too (LoRA dropout), so layers draw different masks.
    scan = nn.scan(body, variable_axes={"params": 0},
                   split_rngs={"params": True, "dropout": True},
                   in_axes=(nn.broadcast, 0), length=cfg.encoder_layers,
                   unroll=min(self.scan_unroll, cfg.encoder_layers),
                   metadata_params={nn.PARTITION_NAME: "layers"})
    buf = jnp.zeros((len(taps),) + x.shape, x.dtype) if taps else None
    (x, buf), _ = scan(layer_cls(name="layers", **kw), (x, buf), bias,
                       jnp.asarray(slot, jnp.int32))
    return x, buf

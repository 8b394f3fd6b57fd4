"""Building blocks shared by the encoder, the adapters and the LLM.

Every parameter is created through `nn.with_logical_partitioning`, so the modules name only logical
axes; `moss_jax.sharding.LOGICAL_AXIS_RULES` maps them onto the mesh. Numerics follow the
reference (spec sections 2 and 4): norms reduce in float32 and return the compute dtype, attention
softmax runs in float32, RoPE tables are built in float32.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from moss_jax.model import lora

Array = jax.Array
LogicalNames = Sequence[str | None]

# Weight init for Dense and Embed: normal(0.02), the initializer_range of the Qwen3 config.
DEFAULT_INIT = nn.initializers.normal(stddev=0.02)


def as_dtype(name: Any) -> jnp.dtype:
  """Config dtypes are strings ('bfloat16'); modules want jnp dtypes."""
  return jnp.dtype(name)


def constrain(x: Array, names: LogicalNames) -> Array:
  """Logical sharding constraint on an activation (a no-op without an active mesh + rules)."""
  return nn.with_logical_constraint(x, tuple(names))


def dense(features: int, axes: tuple[str | None, str | None], *, use_bias: bool, dtype: Any,
          param_dtype: Any, name: str | None = None,
          kernel_init: Callable = DEFAULT_INIT) -> nn.Dense:
  """nn.Dense whose kernel [in, out] and bias [out] carry logical axis names.

  It is `lora.Dense`: plain nn.Dense unless the active LoRA spec (config.model.lora) targets its
  module path, in which case it also carries lora_a / lora_b adapters.
  """
  return lora.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name, axes=axes,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)))


def layer_norm(eps: float, *, dtype: Any, param_dtype: Any, name: str,
               axis_name: str = "norm") -> nn.LayerNorm:
  """Affine LayerNorm (Whisper); Flax reduces in float32 even for bf16 inputs, as torch does."""
  return nn.LayerNorm(
      epsilon=eps, dtype=dtype, param_dtype=param_dtype, name=name,
      scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), (axis_name,)),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axis_name,)))


class RMSNorm(nn.Module):
  """Qwen3 RMSNorm: normalise in float32, cast back to the compute dtype, then scale.

  The cast happens BEFORE the multiply by the weight, as in the reference; doing it after would
  change bf16 rounding.
  """
  eps: float
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  axis_name: str = "norm"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(),
                                                             (self.axis_name,)),
                       (x.shape[-1],), self.param_dtype)
    x32 = x.astype(jnp.float32)
    var = jnp.mean(jnp.square(x32), axis=-1, keepdims=True)
    normed = (x32 * jax.lax.rsqrt(var + self.eps)).astype(self.dtype)
    return normed * scale.astype(self.dtype)


_SQRT_HALF = math.sqrt(0.5)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@jax.custom_vjp
def exact_gelu(x: Array) -> Array:
  """Exact GELU x * Phi(x) = x/2 (1 + erf(x / sqrt 2)): torch's formula, computed in float32.

  The custom VJP saves only x and computes Phi(x) + x phi(x) in one pass: plain autodiff keeps
  4 residual arrays per activation (the conv stem's activations are the largest in the model),
  and rematerialising them (jax.checkpoint) costs separate passes over the array.
  """
  x32 = x.astype(jnp.float32)
  return (0.5 * x32 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))).astype(x.dtype)


def _exact_gelu_fwd(x: Array) -> tuple[Array, Array]:
  return exact_gelu(x), x


def _exact_gelu_bwd(x: Array, dy: Array) -> tuple[Array]:
  x32 = x.astype(jnp.float32)
  cdf = 0.5 * (1.0 + jax.lax.erf(x32 * _SQRT_HALF))
  slope = cdf + x32 * jnp.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
  return ((dy.astype(jnp.float32) * slope).astype(dy.dtype),)


exact_gelu.defvjp(_exact_gelu_fwd, _exact_gelu_bwd)


def sinusoid_positions(length: int, channels: int) -> Array:
  """Whisper sinusoid table [length, channels] in float32: sin block first, then cos (spec 2.2)."""
  half = channels // 2
  inv = jnp.exp(-jnp.arange(half, dtype=jnp.float32) * (math.log(10000.0) / (half - 1)))
  t = jnp.arange(length, dtype=jnp.float32)[:, None] * inv[None, :]
  return jnp.concatenate([jnp.sin(t), jnp.cos(t)], axis=-1)


def rope_tables(positions: Array, head_dim: int, theta: float, dtype: Any) -> tuple[Array, Array]:
  """cos/sin [B, L, head_dim] for half-rotation RoPE; built in float32, cast like the reference."""
  inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  freqs = positions.astype(jnp.float32)[..., None] * inv_freq
  emb = jnp.concatenate([freqs, freqs], axis=-1)
  return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: Array, cos: Array, sin: Array) -> Array:
  """x [B, L, heads, head_dim]: x * cos + rotate_half(x) * sin (non-interleaved halves)."""
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
  return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


def attention(q: Array, k: Array, v: Array, *, scale: float, mask: Array | None = None,
              bias: Array | None = None) -> Array:
  """Multi-head attention with grouped K/V heads.

  q [B, S, Hq, D], k/v [B, T, Hkv, D] with Hq a multiple of Hkv. `mask` (bool, True = attend) or
  `bias` (additive, in q.dtype) broadcast to [B, 1, S, T]. Scores are computed in the input dtype
  (like eager torch) and the softmax in float32, then cast back. Returns [B, S, Hq, D].
  """
  b, s, hq, d = q.shape
  hkv = k.shape[2]
  q = q.reshape(b, s, hkv, hq // hkv, d)
  scores = jnp.einsum("bskgd,btkd->bkgst", q, k)
  if scale != 1.0:
    scores = scores * jnp.asarray(scale, scores.dtype)
  if bias is not None:
    scores = scores + bias[:, :, None].astype(scores.dtype)
  scores = scores.astype(jnp.float32)
  if mask is not None:
    scores = jnp.where(mask[:, :, None], scores, jnp.finfo(jnp.float32).min)
  probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgst,btkd->bskgd", probs, v)
  return out.reshape(b, s, hq, d)


# The name under which a scanned layer saves its input (`saved_layer_input`); every policy saves it.
LAYER_INPUT = "layer_input"


@jax.custom_jvp
def _from_bits(bits: Array, like: Array) -> Array:
  """`like`'s value, read back from its bit pattern `bits`; see `saved_layer_input`."""
  return jax.lax.bitcast_convert_type(bits, like.dtype)


@_from_bits.defjvp
def _from_bits_jvp(primals, tangents):
  bits, like = primals
  # The primal is rebuilt from the bits alone (`like`'s value is never read, so a remat that
  # saves `bits` need not keep `like`); the tangent flows through `like` unchanged.
  return jax.lax.bitcast_convert_type(bits, like.dtype), tangents[1]


def saved_layer_input(x: Array) -> Array:
  """x itself, saved for the backward pass by every remat policy as the 16-bit integer bit
  pattern of a bfloat16 / float16 `x` (named LAYER_INPUT).

  A layer scan under remat keeps each layer's input for the backward pass, stacked over the
  layers ([layers, B, L, H]: 0.70 GiB per device for the 4b LLM at 4096 tokens). XLA:CPU has no
  bfloat16 dynamic-slice: it upcasts the stack to float32 to read one layer back in the
  backward loop and hoists that conversion out of the loop, a float32 copy of the whole stack
  (1.41 GiB more). Saving the bits (a free bitcast on every backend) keeps the stack in 16-bit
  integers, which every backend slices natively; the values are bit-for-bit the same. float32
  inputs are saved as they are.
  """
  if x.dtype not in (jnp.bfloat16, jnp.float16):
    return checkpoint_name(x, LAYER_INPUT)
  bits = checkpoint_name(jax.lax.bitcast_convert_type(x, jnp.uint16), LAYER_INPUT)
  return _from_bits(bits, x)


_SAVE_INPUT = jax.checkpoint_policies.save_only_these_names(LAYER_INPUT)
REMAT_POLICIES = {
    # recompute everything in the backward pass (from each layer's saved input)
    "full": _SAVE_INPUT,
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots, _SAVE_INPUT),
    "dots_no_batch": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims, _SAVE_INPUT),
}
REMAT_POLICY_NAMES = ("none", *REMAT_POLICIES)  # what config.model.remat_policy may be


def maybe_remat(target: Any, policy: str, *, scanned: bool = False) -> Any:
  """Wraps a layer class (or a module method) in nn.remat according to config.model.remat_policy.

  'none' keeps every activation (fastest, most memory); 'full' saves only the inputs;
  'dots'/'dots_no_batch' also save matmul outputs. prevent_cse is only needed outside scan.
  """
  if policy == "none":
    return target
  if policy not in REMAT_POLICIES:
    raise ValueError(f"remat_policy must be one of {', '.join(REMAT_POLICY_NAMES)}; "
                     f"got {policy!r}")
  return nn.remat(target, policy=REMAT_POLICIES[policy], prevent_cse=not scanned)

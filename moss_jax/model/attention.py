"""Causal self-attention within packed segments, in four implementations picked by `model.attention`.

  xla        the reference: `layers.attention` on a materialised [B, 1, L, L] mask. Float32 scores
             and probabilities for every head, [B, Hq, L, L] each: fine at toy scale, tens of GiB
             per device at 4096 tokens.
  blockwise  pure JAX, every backend: an online softmax over key blocks (flash-attention style)
             with a custom VJP that recomputes each [bq, bk] tile in the backward pass, so neither
             pass ever holds an [L, L] buffer; the masks are built per tile from segment ids and
             indices. Blocks above the diagonal are skipped (about half the work at long L).
  cudnn      `jax.nn.dot_product_attention(implementation="cudnn")` on NVIDIA GPUs (bf16/fp16
             only). The segment mask goes in as a [B, 1, L, L] bool mask (cuDNN turns it into
             one additive bias per row, shared by all heads: 32 MiB a row at 4096 tokens in bf16).
  splash     the Pallas TPU splash-attention kernel with segment ids (`SegmentIds`), GQA as one
             MQA kernel per K/V head, under shard_map over the batch and K/V-head mesh axes.
             Off TPU the same kernel runs in Pallas' interpreter (exact but slow: for tests);
             it has not been run on TPU hardware in this project.
  auto       splash on TPU, cudnn on GPU for bf16/fp16, blockwise otherwise.

Masking rule (all implementations): query i attends to key j when j <= i and both carry the same
segment id. Padding (segment 0) then attends to earlier padding, so no row is ever fully masked.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp

from moss_jax.model import layers

Array = jax.Array

IMPLEMENTATIONS = ("auto", "xla", "blockwise", "cudnn", "splash")
DEFAULT_BLOCK = 512
# A large finite negative for masked scores: with the explicit zeroing of masked probabilities
# below, it only has to lose every max; -inf would make exp(-inf - -inf) = NaN in empty tiles.
_NEG = float(jnp.finfo(jnp.float32).min)
_PAD_SEGMENT = -1  # segment id of rows added to reach a block multiple: never equals a real id


def resolve(implementation: str, dtype, backend: str | None = None) -> str:
  """The concrete implementation `auto` stands for on `backend` (default: JAX's default)."""
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"model.attention={implementation!r}: choose one of {IMPLEMENTATIONS}")
  if implementation != "auto":
    return implementation
  backend = backend or jax.default_backend()
  if backend == "tpu":
    return "splash"
  if backend in ("gpu", "cuda", "rocm") and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
    return "cudnn"
  return "blockwise"


def packed_causal_mask(segment_ids: Array) -> Array:
  """[B, 1, L, L] bool: key index <= query index and same segment id (the `xla` path's mask)."""
  length = segment_ids.shape[-1]
  idx = jnp.arange(length)
  causal = idx[None, :] <= idx[:, None]
  same = segment_ids[:, :, None] == segment_ids[:, None, :]
  return (causal[None] & same)[:, None]


def segment_causal_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, scale: float,
                             implementation: str = "auto",
                             block_size: int = DEFAULT_BLOCK) -> Array:
  """q [B, L, Hq, D], k/v [B, L, Hkv, D] (Hq a multiple of Hkv), segment_ids int [B, L].

  Returns [B, L, Hq, D] in q.dtype. Softmax statistics are float32 in every implementation.
  """
  impl = resolve(implementation, q.dtype)
  if impl == "xla":
    return layers.attention(q, k, v, scale=scale, mask=packed_causal_mask(segment_ids))
  if impl == "blockwise":
    return blockwise_attention(q, k, v, segment_ids, segment_ids, scale=scale, causal=True,
                               block_q=block_size, block_k=block_size)
  if impl == "cudnn":
    return _cudnn_attention(q, k, v, segment_ids, scale=scale)
  if check_splash_lengths(q.shape[1], block_size):
    # The kernel tiles by multiples of 128 tokens; other lengths (the 8-token trace that builds
    # the parameters, say) take the blockwise path, which computes the same function. Config
    # validation rejects training lengths splash cannot take.
    return blockwise_attention(q, k, v, segment_ids, segment_ids, scale=scale, causal=True,
                               block_q=block_size, block_k=block_size)
  return _splash_attention(q, k, v, segment_ids, scale=scale, block_size=block_size)


# ----------------------------------------------------------------------------- blockwise

def blockwise_attention(q: Array, k: Array, v: Array, q_segment_ids: Array,
                        kv_segment_ids: Array, *, scale: float, causal: bool,
                        block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> Array:
  """Memory-efficient attention: q [B, S, Hq, D], k/v [B, T, Hkv, D], segment ids [B, S] / [B, T].

  Query i may see key j when the segment ids match and (if `causal`, which needs S == T) j <= i.
  A query row that sees no key returns zeros. Sequences are padded to block multiples with a
  segment id no real token has, so any length works.
  """
  b, s, hq, d = q.shape
  t, hkv = k.shape[1], k.shape[2]
  if hq % hkv:
    raise ValueError(f"{hq} query heads are not a multiple of {hkv} key/value heads")
  if causal and s != t:
    raise ValueError(f"causal blockwise attention needs as many queries as keys ({s} vs {t})")
  bq, bk = min(block_q, s), min(block_k, t)
  sp, tp = -(-s // bq) * bq, -(-t // bk) * bk
  pad = lambda x, n, value=0: jnp.pad(x, [(0, 0), (0, n - x.shape[1])] + [(0, 0)] * (x.ndim - 2),
                                      constant_values=value)
  # [B, Hkv, G, S, D] and [B, Hkv, T, D]: one K/V head serves a group of G query heads.
  qh = jnp.transpose(pad(q, sp).reshape(b, sp, hkv, hq // hkv, d), (0, 2, 3, 1, 4))
  kh = jnp.transpose(pad(k, tp), (0, 2, 1, 3))
  vh = jnp.transpose(pad(v, tp), (0, 2, 1, 3))
  qs = pad(q_segment_ids.astype(jnp.int32), sp, _PAD_SEGMENT)
  ks = pad(kv_segment_ids.astype(jnp.int32), tp, _PAD_SEGMENT)
  out = _flash(qh, kh, vh, qs, ks, float(scale), bool(causal), bq, bk)
  out = jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, sp, hq, d)
  return out[:, :s]


def _tile_mask(qs: Array, ks: Array, q0: Array, k0: Array, causal: bool) -> Array:
  """[B, 1, 1, bq, bk] bool for the tile whose first query / key indices are q0 / k0."""
  mask = qs[:, None, None, :, None] == ks[:, None, None, None, :]
  if causal:
    qi = q0 + jnp.arange(qs.shape[1])
    ki = k0 + jnp.arange(ks.shape[1])
    mask = mask & (qi[:, None] >= ki[None, :])
  return mask


def _scores(qb: Array, kb: Array, scale: float) -> Array:
  """[B, K, G, bq, D] x [B, K, bk, D] -> float32 [B, K, G, bq, bk]."""
  s = jnp.einsum("bkgqd,bktd->bkgqt", qb, kb, preferred_element_type=jnp.float32)
  return s * scale


def _causal_blocks(i: Array, bq: int, bk: int, nk: int) -> Array:
  """Key blocks a causal query block i needs: those starting at or before its last row."""
  return jnp.minimum(nk, ((i + 1) * bq + bk - 1) // bk)


def _forward(q, k, v, qs, ks, scale, causal, bq, bk):
  """-> out [B, K, G, S, D] (q.dtype) and the float32 log-sum-exp [B, K, G, S] of every row."""
  b, kh, g, sp, d = q.shape
  nq, nk = sp // bq, k.shape[2] // bk

  def q_block(i):
    qb = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)
    qsb = jax.lax.dynamic_slice_in_dim(qs, i * bq, bq, axis=1)

    def body(j, carry):
      m, l, acc = carry
      kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
      vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
      ksb = jax.lax.dynamic_slice_in_dim(ks, j * bk, bk, axis=1)
      mask = _tile_mask(qsb, ksb, i * bq, j * bk, causal)
      s = jnp.where(mask, _scores(qb, kb, scale), _NEG)
      m_new = jnp.maximum(m, s.max(axis=-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + p.sum(axis=-1)
      pv = jnp.einsum("bkgqt,bktd->bkgqd", p.astype(v.dtype), vb,
                      preferred_element_type=jnp.float32)
      return m_new, l, acc * corr[..., None] + pv

    init = (jnp.full((b, kh, g, bq), _NEG, jnp.float32), jnp.zeros((b, kh, g, bq), jnp.float32),
            jnp.zeros((b, kh, g, bq, d), jnp.float32))
    upper = _causal_blocks(i, bq, bk, nk) if causal else nk
    m, l, acc = jax.lax.fori_loop(0, upper, body, init)
    safe = jnp.where(l > 0, l, 1.0)
    return (acc / safe[..., None]).astype(q.dtype), m + jnp.log(safe)

  out, lse = jax.lax.map(q_block, jnp.arange(nq))  # [nq, B, K, G, bq, ...]
  out = jnp.moveaxis(out, 0, 3).reshape(b, kh, g, sp, d)
  lse = jnp.moveaxis(lse, 0, 3).reshape(b, kh, g, sp)
  return out, lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7, 8))
def _flash(q, k, v, qs, ks, scale, causal, bq, bk):
  return _forward(q, k, v, qs, ks, scale, causal, bq, bk)[0]


def _flash_fwd(q, k, v, qs, ks, scale, causal, bq, bk):
  out, lse = _forward(q, k, v, qs, ks, scale, causal, bq, bk)
  return out, (q, k, v, qs, ks, out, lse)


def _flash_bwd(scale, causal, bq, bk, res, dout):
  """FlashAttention-2 backward: per key block, recompute each tile's probabilities from the saved
  log-sum-exp, accumulate dK/dV for the block and add the tile's dQ into a [B, K, G, S, D] buffer."""
  q, k, v, qs, ks, out, lse = res
  b, kh, g, sp, d = q.shape
  nq, nk = sp // bq, k.shape[2] // bk
  delta = jnp.sum(dout.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)  # [B, K, G, S]

  def k_block(dq, j):
    kb = jax.lax.dynamic_slice_in_dim(k, j * bk, bk, axis=2)
    vb = jax.lax.dynamic_slice_in_dim(v, j * bk, bk, axis=2)
    ksb = jax.lax.dynamic_slice_in_dim(ks, j * bk, bk, axis=1)

    def body(i, carry):
      dq, dk, dv = carry
      qb = jax.lax.dynamic_slice_in_dim(q, i * bq, bq, axis=3)
      dob = jax.lax.dynamic_slice_in_dim(dout, i * bq, bq, axis=3)
      lseb = jax.lax.dynamic_slice_in_dim(lse, i * bq, bq, axis=3)
      deltab = jax.lax.dynamic_slice_in_dim(delta, i * bq, bq, axis=3)
      qsb = jax.lax.dynamic_slice_in_dim(qs, i * bq, bq, axis=1)
      mask = _tile_mask(qsb, ksb, i * bq, j * bk, causal)
      p = jnp.where(mask, jnp.exp(_scores(qb, kb, scale) - lseb[..., None]), 0.0)
      dv = dv + jnp.einsum("bkgqt,bkgqd->bktd", p.astype(dout.dtype), dob,
                           preferred_element_type=jnp.float32)
      dp = jnp.einsum("bkgqd,bktd->bkgqt", dob, vb, preferred_element_type=jnp.float32)
      ds = p * (dp - deltab[..., None]) * scale
      dq_tile = jnp.einsum("bkgqt,bktd->bkgqd", ds.astype(k.dtype), kb,
                           preferred_element_type=jnp.float32)
      dq = jax.lax.dynamic_update_slice_in_dim(
          dq, jax.lax.dynamic_slice_in_dim(dq, i * bq, bq, axis=3) + dq_tile, i * bq, axis=3)
      dk = dk + jnp.einsum("bkgqt,bkgqd->bktd", ds.astype(q.dtype), qb,
                           preferred_element_type=jnp.float32)
      return dq, dk, dv

    zeros = jnp.zeros((b, kh, bk, d), jnp.float32)
    lower = (j * bk) // bq if causal else 0  # query blocks ending before this key block see none of it
    dq, dk, dv = jax.lax.fori_loop(lower, nq, body, (dq, zeros, zeros))
    return dq, (dk, dv)

  dq, (dk, dv) = jax.lax.scan(k_block, jnp.zeros(q.shape, jnp.float32), jnp.arange(nk))
  dk = jnp.moveaxis(dk, 0, 2).reshape(k.shape)
  dv = jnp.moveaxis(dv, 0, 2).reshape(v.shape)
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


# ----------------------------------------------------------------------------- cuDNN (GPU)

def _cudnn_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, scale: float) -> Array:
  """cuDNN fused attention; causality is cuDNN's own mask, segments a [B, 1, L, L] bool mask."""
  same = segment_ids[:, None, :, None] == segment_ids[:, None, None, :]
  return jax.nn.dot_product_attention(q, k, v, mask=same, scale=scale, is_causal=True,
                                      implementation="cudnn")


# ----------------------------------------------------------------------------- splash (TPU)

def _splash_attention(q: Array, k: Array, v: Array, segment_ids: Array, *, scale: float,
                      block_size: int) -> Array:
  """Pallas splash attention (compiled for TPU; interpreted elsewhere; not run on TPU hardware).

  The kernel works on one example at a time: q [heads, L, D] with k/v [L, D] for MQA. GQA maps
  onto it as one MQA call per K/V head (its G query heads share that K/V head), vmapped over the
  batch and the K/V heads. A Pallas kernel is not partitioned by GSPMD, so under a mesh the call
  runs inside shard_map over the mesh axes that the logical rules give the batch and K/V heads.
  """
  # Imported here, not at the top: Pallas' TPU ops are only needed (and only worth loading) when
  # splash attention is chosen.
  from jax.experimental.pallas.ops.tpu import splash_attention as splash

  b, length, hq, d = q.shape
  hkv = k.shape[2]
  g = hq // hkv
  block = min(block_size, length)
  if length % block or block % 128:
    raise ValueError(f"splash attention needs the sequence length ({length}) to be a multiple "
                     f"of a block that is itself a multiple of 128 (block {block}); change "
                     "data.max_tokens or model.attention_block_size")
  sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                            block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                            block_q_dq=block, block_kv_dq=block)
  mask = splash.MultiHeadMask([splash.CausalMask((length, length)) for _ in range(g)])
  kernel = splash.make_splash_mqa_single_device(mask=mask, block_sizes=sizes,
                                                interpret=jax.default_backend() != "tpu")

  def per_device(q, k, v, seg):
    # q [b, Hkv, G, L, D], k/v [b, Hkv, L, D], seg [b, L]
    def one(qe, ke, ve, se):
      return kernel(qe, ke, ve, segment_ids=splash.SegmentIds(q=se, kv=se))
    per_head = jax.vmap(one, in_axes=(0, 0, 0, None))
    return jax.vmap(per_head, in_axes=(0, 0, 0, 0))(q, k, v, seg)

  qh = jnp.transpose((q * jnp.asarray(scale, q.dtype)).reshape(b, length, hkv, g, d),
                     (0, 2, 3, 1, 4))
  kh, vh = jnp.transpose(k, (0, 2, 1, 3)), jnp.transpose(v, (0, 2, 1, 3))
  seg = segment_ids.astype(jnp.int32)
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    out = per_device(qh, kh, vh, seg)
  else:
    batch_axes, head_axes = nn.logical_to_mesh_axes(("batch", "kv_heads"))
    spec = lambda *rest: jax.sharding.PartitionSpec(batch_axes, *rest)
    out = jax.shard_map(per_device, mesh=mesh,
                        in_specs=(spec(head_axes), spec(head_axes), spec(head_axes), spec()),
                        out_specs=spec(head_axes), check_vma=False)(qh, kh, vh, seg)
  return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, length, hq, d)


def check_splash_lengths(max_tokens: int, block_size: int) -> str | None:
  """A config problem for splash attention, or None (used by config validation)."""
  block = min(block_size, max_tokens)
  if max_tokens % block or block % 128:
    return (f"model.attention=splash needs data.max_tokens ({max_tokens}) to be a multiple of "
            f"model.attention_block_size ({block_size}), itself a multiple of 128")
  return None



"""The training state, the loss, and the pure `train_step` / `eval_step`.

State is a plain dict pytree (Orbax saves it as is):
  step                 int32 scalar, batches consumed (skipped updates included)
  params               the trainable half of the parameter tree (differentiated, has opt state)
  frozen               the frozen half (a separate, non-differentiated argument of the loss)
  opt_state            optax state of `params` only: frozen parameters carry none
  skipped_total        int32, updates skipped because the loss or gradients were not finite
  consecutive_skipped  int32, skips since the last good update (the run stops past a threshold)

The loss follows the reference convention (spec 5.4): logits[t-1] predicts labels[t], -100 is
ignored. Steps return token *sums* per task, so means over micro-batches, devices and log
intervals are exact. Gradient accumulation differentiates each micro-batch's summed loss divided
by the whole step's label count (known from the batch up front), so k micro-batches give the
same update as one batch of k times the rows.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import queue
import threading
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec

from moss_jax import batch as batch_lib
from moss_jax import optim
from moss_jax import sharding as sharding_lib
from moss_jax import model as model_lib
from moss_jax.model import layers, lora
from moss_jax.model.mel import model_audio_mel

PyTree = Any
NUM_TASKS = len(batch_lib.TASKS)
SCALAR_KEYS = ("step", "skipped_total", "consecutive_skipped")


# ----------------------------------------------------------------------------- loss

def _stat_sums(logits: jax.Array, targets: jax.Array, tasks: jax.Array,
               z_loss: float) -> dict[str, jax.Array]:
  """The sums of `token_stats` for logits [..., V] already aligned with their targets [...]."""
  logits = logits.astype(jnp.float32)
  valid = targets != batch_lib.IGNORE_INDEX
  validf = valid.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, jnp.where(valid, targets, 0)[..., None], axis=-1)[..., 0]
  ce = (logz - target_logit) * validf
  correct = ((jnp.argmax(logits, axis=-1) == targets) & valid).astype(jnp.float32)
  onehot = jax.nn.one_hot(jnp.clip(tasks, 0, NUM_TASKS - 1), NUM_TASKS) * validf[..., None]
  stats = {
      "ce_sum": ce.sum(),
      "tokens": validf.sum(),
      "correct": correct.sum(),
      "task_ce_sum": jnp.einsum("...t,...->t", onehot, ce),
      "task_tokens": onehot.reshape(-1, NUM_TASKS).sum(axis=0),
      "task_correct": jnp.einsum("...t,...->t", onehot, correct),
  }
  stats["z_loss_sum"] = (z_loss * jnp.square(logz) * validf).sum() if z_loss else jnp.zeros(())
  return stats


def token_stats(logits: jax.Array, labels: jax.Array, task_ids: jax.Array,
                z_loss: float = 0.0) -> dict[str, jax.Array]:
  """Sums of cross-entropy, z-loss, label tokens and correct argmaxes, overall and per task.

  logits [B, L, V] (any float dtype; computed in float32), labels / task_ids int32 [B, L].
  The reference of `chunked_token_stats`, which the steps use.
  """
  return _stat_sums(logits[:, :-1], labels[:, 1:], task_ids[:, 1:], z_loss)


def _task_sums(per_token: dict[str, jax.Array], tasks: jax.Array, validf: jax.Array
               ) -> dict[str, jax.Array]:
  """token_stats' dict from per-token ce / correct / z terms (already zero where not valid)."""
  onehot = jax.nn.one_hot(jnp.clip(tasks, 0, NUM_TASKS - 1), NUM_TASKS) * validf[..., None]
  return {
      "ce_sum": per_token["ce"].sum(),
      "tokens": validf.sum(),
      "correct": per_token["correct"].sum(),
      "task_ce_sum": jnp.einsum("...t,...->t", onehot, per_token["ce"]),
      "task_tokens": onehot.reshape(-1, NUM_TASKS).sum(axis=0),
      "task_correct": jnp.einsum("...t,...->t", onehot, per_token["correct"]),
      "z_loss_sum": per_token["z"].sum(),
  }


def _vocab_blocks(vocab: int, target: int) -> tuple[int, int]:
  """(block, padded vocab): the largest divisor of `vocab` in [target/2, target] when there is
  one (no padding copy of the weight), else `target` with the vocabulary padded up to it."""
  target = max(1, min(target, vocab))
  for block in range(target, (target + 1) // 2 - 1, -1):
    if vocab % block == 0:
      return block, vocab
  return target, -(-vocab // target) * target


def _block_logits(h: jax.Array, w_block: jax.Array, j: jax.Array, vb: int, vocab: int
                  ) -> jax.Array:
  """float32 logits of vocabulary block j, [N, vb] for h [N, H] (tokens flattened: XLA:CPU gives
  the backward dots plain layouts then); padded vocabulary columns -> -inf-ish."""
  logits = jnp.einsum("nh,hv->nv", h, w_block, preferred_element_type=jnp.float32)
  logits = layers.constrain(logits, ("batch", "vocab"))
  if vocab % vb:
    ids = j * vb + jnp.arange(vb)
    logits = jnp.where(ids < vocab, logits, jnp.finfo(jnp.float32).min)
  return logits


def _split_vocab(w: jax.Array, vb: int, padded: int, dtype) -> jax.Array:
  """[H, V] weight -> [n, H, vb] blocks in the compute dtype (cast while still sharded, so any
  gather moves compute-dtype bytes)."""
  w = layers.constrain(w.astype(dtype), ("embed", "vocab"))
  if padded != w.shape[1]:
    w = jnp.pad(w, ((0, 0), (0, padded - w.shape[1])))
  blocks = jnp.moveaxis(w.reshape(w.shape[0], padded // vb, vb), 1, 0)
  return layers.constrain(blocks, (None, "embed", "vocab"))


def _flat_tokens(h, targets, tasks):
  """[B, L, H], [B, L], [B, L] -> [B*L, H], [B*L], [B*L]."""
  return h.reshape(-1, h.shape[-1]), targets.reshape(-1), tasks.reshape(-1)


def _fused_forward(h, w, targets, tasks, z_loss, vb, dtype):
  """Online log-sum-exp, target logit and first argmax over vocabulary blocks."""
  vocab = w.shape[1]
  _, padded = _vocab_blocks(vocab, vb)
  blocks = _split_vocab(w, vb, padded, dtype)
  h, targets, tasks = _flat_tokens(h, targets, tasks)
  shape = targets.shape
  neg = jnp.finfo(jnp.float32).min

  def body(carry, xs):
    m, s, tgt, best, best_id = carry
    w_block, j = xs
    logits = _block_logits(h, w_block, j, vb, vocab)
    block_max = logits.max(axis=-1)
    m_new = jnp.maximum(m, block_max)
    s = s * jnp.exp(m - m_new) + jnp.exp(logits - m_new[..., None]).sum(axis=-1)
    local = targets - j * vb
    inside = (local >= 0) & (local < vb)
    picked = jnp.take_along_axis(logits, jnp.clip(local, 0, vb - 1)[..., None], axis=-1)[..., 0]
    tgt = jnp.where(inside, picked, tgt)
    better = block_max > best  # strict: the first maximum wins, as jnp.argmax
    best_id = jnp.where(better, j * vb + jnp.argmax(logits, axis=-1), best_id)
    return (m_new, s, tgt, jnp.maximum(best, block_max), best_id), None

  init = (jnp.full(shape, neg), jnp.zeros(shape), jnp.zeros(shape), jnp.full(shape, neg),
          jnp.zeros(shape, jnp.int32))
  (m, s, tgt, _, best_id), _ = jax.lax.scan(body, init, (blocks, jnp.arange(padded // vb)))
  lse = m + jnp.log(s)
  valid = targets != batch_lib.IGNORE_INDEX
  validf = valid.astype(jnp.float32)
  per_token = {"ce": (lse - tgt) * validf,
               "correct": ((best_id == targets) & valid).astype(jnp.float32),
               "z": z_loss * jnp.square(lse) * validf}
  return _task_sums(per_token, tasks, validf), lse


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _fused_stats(h, w, targets, tasks, z_loss, vb, dtype):
  return _fused_forward(h, w, targets, tasks, z_loss, vb, dtype)[0]


def _fused_stats_fwd(h, w, targets, tasks, z_loss, vb, dtype):
  stats, lse = _fused_forward(h, w, targets, tasks, z_loss, vb, dtype)
  return stats, (h, w, targets, tasks, lse)


def _fused_stats_bwd(z_loss, vb, dtype, res, ct):
  """d/dlogits of ce is softmax - onehot(target), of z_loss * lse^2 it is 2 z_loss lse softmax;
  each vocabulary block's logits are recomputed, its weight gradient [H, vb] is made and
  constrained to the weight's sharding (reduce-scattered block by block), and dh accumulates."""
  h, w, targets, tasks, lse = res
  h_shape = h.shape
  h, targets, tasks = _flat_tokens(h, targets, tasks)
  vocab = w.shape[1]
  _, padded = _vocab_blocks(vocab, vb)
  blocks = _split_vocab(w, vb, padded, dtype)
  validf = (targets != batch_lib.IGNORE_INDEX).astype(jnp.float32)
  task_ct = ct["task_ce_sum"][jnp.clip(tasks, 0, NUM_TASKS - 1)]
  g_ce = (ct["ce_sum"] + task_ct) * validf
  g_soft = g_ce + ct["z_loss_sum"] * 2.0 * z_loss * lse * validf

  def body(dh, xs):
    w_block, j = xs
    p = jnp.exp(_block_logits(h, w_block, j, vb, vocab) - lse[..., None])
    local = targets - j * vb
    onehot = jax.nn.one_hot(local, vb, dtype=jnp.float32)  # all-zero rows outside the block
    dlogits = (p * g_soft[..., None] - onehot * g_ce[..., None]).astype(dtype)
    dh = dh + jnp.einsum("nv,hv->nh", dlogits, w_block, preferred_element_type=jnp.float32)
    dw = jnp.einsum("nh,nv->hv", h, dlogits, preferred_element_type=jnp.float32)
    return dh, layers.constrain(dw, ("embed", "vocab"))

  dh, dw = jax.lax.scan(body, jnp.zeros(h.shape, jnp.float32),
                        (blocks, jnp.arange(padded // vb)))
  dw = jnp.moveaxis(dw, 0, 1).reshape(w.shape[0], padded)[:, :vocab]
  dw = layers.constrain(dw, ("embed", "vocab")).astype(w.dtype)
  return dh.reshape(h_shape).astype(h.dtype), dw, None, None


_fused_stats.defvjp(_fused_stats_fwd, _fused_stats_bwd)


def chunked_token_stats(hidden: jax.Array, kernel: jax.Array, labels: jax.Array,
                        task_ids: jax.Array, z_loss: float = 0.0, chunk_size: int = 0,
                        vocab_block: int = 16384, dtype: Any = None) -> dict[str, jax.Array]:
  """`token_stats(hidden @ kernel, labels, task_ids, z_loss)` with lm_head fused into the loss,
  never holding [B, L, V] logits.

  hidden [B, L, H] final hidden states, kernel [H, V] the lm_head weight (any float dtype; the
  products run in `dtype`, default hidden.dtype, with float32 accumulation, as nn.Dense does).
  The vocabulary is walked in blocks of about `vocab_block` columns with an online log-sum-exp
  (a custom VJP recomputes each block's logits in the backward pass and reduces each block's
  weight gradient into the weight's sharding at once), so the float32 logits, softmax and
  gradient of the whole vocabulary (27 GiB per device for the 4b preset at 4096 tokens) never
  exist. `chunk_size` > 0 also cuts the rows into token chunks of that many positions (a
  rematerialised scan), for when [B, L, vocab_block] is itself too large.
  """
  dtype = jnp.dtype(dtype or hidden.dtype)
  b, length, _ = hidden.shape
  hidden = hidden.astype(dtype)
  # logits[t] predicts labels[t + 1]; the last position predicts nothing.
  targets = jnp.concatenate(
      [labels[:, 1:], jnp.full((b, 1), batch_lib.IGNORE_INDEX, labels.dtype)], axis=1)
  tasks = jnp.concatenate([task_ids[:, 1:], jnp.zeros((b, 1), task_ids.dtype)], axis=1)
  vb, _ = _vocab_blocks(kernel.shape[1], vocab_block)
  stats_of = lambda h, t, k: _fused_stats(h, kernel, t, k, float(z_loss), vb, dtype)
  if chunk_size <= 0 or chunk_size >= length:
    return stats_of(hidden, targets, tasks)
  n = -(-length // chunk_size)
  extra = n * chunk_size - length
  hidden = jnp.pad(hidden, ((0, 0), (0, extra), (0, 0)))
  targets = jnp.pad(targets, ((0, 0), (0, extra)), constant_values=batch_lib.IGNORE_INDEX)
  tasks = jnp.pad(tasks, ((0, 0), (0, extra)))
  split = lambda x: jnp.moveaxis(x.reshape((b, n, chunk_size) + x.shape[2:]), 1, 0)
  chunk_sums = jax.checkpoint(stats_of)

  def body(carry, xs):
    return jax.tree.map(jnp.add, carry, chunk_sums(*xs)), None

  zeros = jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype),
                       jax.eval_shape(stats_of, hidden[:, :chunk_size], targets[:, :chunk_size],
                                      tasks[:, :chunk_size]))
  stats, _ = jax.lax.scan(body, zeros, (split(hidden), split(targets), split(tasks)))
  return stats


def label_count(labels: jax.Array) -> jax.Array:
  """float32 number of supervised tokens (labels[t] for t >= 1 that are not ignored)."""
  return (labels[:, 1:] != batch_lib.IGNORE_INDEX).sum().astype(jnp.float32)


def batch_stats(batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
  """Throughput counters of a batch: packed (non-padding) tokens and seconds of audio."""
  return {
      "input_tokens": (batch["segment_ids"] > 0).sum().astype(jnp.float32),
      "audio_seconds": batch["audio_chunk_frames"].sum().astype(jnp.float32)
                       * (batch_lib.HOP_LENGTH / batch_lib.SAMPLE_RATE),
  }


def make_forward(model, model_config, hidden: bool = False) -> Callable[..., jax.Array]:
  """(params, batch, dropout_rng=None) -> float32 logits [B, L, V] (or, with `hidden`, the final
  hidden states [B, L, H] before lm_head); the mel is made on device when needed. Without a
  dropout key the forward is deterministic (evaluation, generation)."""

  def forward(params, batch, dropout_rng=None):
    mel = model_audio_mel(decode_transfer(batch), model_config)
    rngs = None if dropout_rng is None else {"dropout": dropout_rng}
    return model.apply({"params": params}, batch["input_ids"], batch["positions"],
                       batch["segment_ids"], mel, batch["audio_chunk_frames"],
                       batch["audio_token_index"], method="hidden_states" if hidden else None,
                       rngs=rngs)

  return forward


def make_stats_fn(model, model_config, z_loss: float = 0.0
                  ) -> Callable[[PyTree, Mapping[str, jax.Array]], dict[str, jax.Array]]:
  """(params, batch) -> token sums (`token_stats`), with lm_head fused into the loss
  (`chunked_token_stats`): the model returns final hidden states and the loss applies the
  lm_head kernel one vocabulary block at a time."""
  forward = make_forward(model, model_config, hidden=True)
  chunk = int(model_config.get("loss_chunk_size", 0))
  vocab_block = int(model_config.get("loss_vocab_block", 16384))
  dtype = jnp.dtype(model_config.dtype)

  def stats_fn(params, batch, dropout_rng=None):
    hidden = forward(params, batch, dropout_rng)
    # The fused loss reads lm_head's kernel itself: LoRA on lm_head enters merged (no dropout).
    kernel = lora.merged_kernel(params["lm_head"], lora.spec_from_config(model_config))
    with jax.named_scope("loss"):  # names the ops in profiles (benchmarks/step_profile.py)
      return chunked_token_stats(hidden, kernel, batch["labels"],
                                 batch["task_ids"], z_loss, chunk, vocab_block, dtype)

  return stats_fn


# ----------------------------------------------------------------------------- state

def create_state(params: Mapping, optimizer: optax.GradientTransformation, stage: str,
                 frozen_dtype: str | None = None) -> dict:
  """Fresh state: split by stage, optimizer state for the trainable half only.

  `frozen_dtype` (train.frozen_dtype, e.g. bfloat16) stores the frozen half in that dtype: a LoRA
  run keeps one low-precision copy of the base weights and full-precision adapters.
  """
  trainable, frozen = optim.split_for_stage(params, stage)
  if frozen_dtype:
    frozen = jax.tree.map(lambda x: x.astype(frozen_dtype), frozen)
  return {
      "step": jnp.zeros((), jnp.int32),
      "params": trainable,
      "frozen": frozen,
      "opt_state": optimizer.init(trainable),
      "skipped_total": jnp.zeros((), jnp.int32),
      "consecutive_skipped": jnp.zeros((), jnp.int32),
  }


def full_params(state: Mapping) -> dict:
  """The whole parameter tree of a state (trainable and frozen halves merged)."""
  return optim.merge(state["params"], state["frozen"])


def state_shardings(param_shardings: PyTree, abstract_params: PyTree,
                    optimizer: optax.GradientTransformation, stage: str, mesh) -> dict:
  """NamedSharding tree of the state: params as the model's logical rules say, moments alike."""
  mask = optim.trainable_mask(abstract_params, stage)
  train_sh, frozen_sh = optim.partition(param_shardings, mask)
  train_abs, _ = optim.partition(abstract_params, mask)
  replicated = NamedSharding(mesh, PartitionSpec())
  out = {k: replicated for k in SCALAR_KEYS}
  out.update(params=train_sh, frozen=frozen_sh,
             opt_state=optim.opt_state_shardings(optimizer, train_abs, train_sh, replicated))
  return out


def abstract_state(abstract_params: PyTree, optimizer: optax.GradientTransformation, stage: str,
                   shardings: PyTree | None = None, frozen_dtype: str | None = None) -> PyTree:
  """ShapeDtypeStruct tree of the state (with shardings when given): for AOT and restore."""
  tree = jax.eval_shape(functools.partial(create_state, optimizer=optimizer, stage=stage,
                                          frozen_dtype=frozen_dtype), abstract_params)
  if shardings is None:
    return tree
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


# ----------------------------------------------------------------------------- steps

def _split_micro(batch: Mapping[str, jax.Array], k: int) -> dict[str, jax.Array]:
  """[B, ...] -> [k, B/k, ...] with micro-batch i = rows i, i+k, i+2k, ...

  Interleaving (rather than contiguous blocks) keeps each device's rows spread evenly over the
  micro-batches, so no micro-batch has to move rows between devices.
  """
  def split(x):
    b = x.shape[0]
    return jnp.swapaxes(x.reshape((b // k, k) + x.shape[1:]), 0, 1)
  return {name: split(x) for name, x in batch.items()}


def global_norm(tree: PyTree) -> jax.Array:
  """L2 norm over every leaf, accumulated in float32."""
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(stats_fn: Callable, optimizer: optax.GradientTransformation,
                    schedule: Callable, grad_accum: int = 1, z_loss: float = 0.0,
                    micro_sharding: Any = None, clip_norm: float = 0.0,
                    dropout_seed: int | None = None) -> Callable:
  """Builds the pure `train_step(state, batch) -> (state, metrics)` (not yet jitted).

  `stats_fn(params, batch[, dropout_rng])` returns the token sums of `token_stats`
  (make_stats_fn). `clip_norm` > 0 clips the gradients' global norm here, for an optimizer made
  with `optim.make_optimizer(..., clip=False)`. With `dropout_seed` (LoRA dropout on),
  micro-batch i of step s draws its dropout masks from fold_in(fold_in(key(seed), s), i):
  reproducible, and a resumed run draws the same masks.
  """

  def micro_objective(trainable, frozen, micro, denom, rng=None):
    params = optim.merge(trainable, jax.lax.stop_gradient(frozen))
    stats = stats_fn(params, micro) if rng is None else stats_fn(params, micro, rng)
    return (stats["ce_sum"] + stats["z_loss_sum"]) / denom, stats

  grad_fn = jax.grad(micro_objective, has_aux=True)

  def micro_rng(step, i):
    if dropout_seed is None:
      return None
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(dropout_seed), step), i)

  def accumulate(trainable, frozen, batch, denom, step):
    if grad_accum == 1:
      return grad_fn(trainable, frozen, batch, denom, micro_rng(step, 0))
    micros = _split_micro(batch, grad_accum)

    def body(carry, xs):
      micro, i = xs
      if micro_sharding is not None:
        micro = jax.lax.with_sharding_constraint(micro, micro_sharding)
      grads, stats = grad_fn(trainable, frozen, micro, denom, micro_rng(step, i))
      return jax.tree.map(jnp.add, carry, (grads, stats)), None

    zero_stats = jax.eval_shape(lambda: token_stats(
        jnp.zeros((1, 2, 2)), jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2), jnp.int32), z_loss))
    zeros = (jax.tree.map(jnp.zeros_like, trainable),
             jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), zero_stats))
    (grads, stats), _ = jax.lax.scan(body, zeros, (micros, jnp.arange(grad_accum)))
    return grads, stats

  def train_step(state, batch):
    # The step's label count is known from the batch before any gradient exists: dividing the
    # objective by it seeds the backward pass with 1/denom instead of rescaling every gradient
    # afterwards (a parameter-sized temporary).
    denom = jnp.maximum(label_count(batch["labels"]), 1.0)
    grads, stats = accumulate(state["params"], state["frozen"], batch, denom, state["step"])
    with jax.named_scope("grad_norm"):
      grad_norm = global_norm(grads)
    loss = (stats["ce_sum"] + stats["z_loss_sum"]) / denom
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

    lr = schedule(state["step"])
    factor = jnp.ones((), jnp.float32)
    if clip_norm > 0:
      factor = jnp.where(grad_norm < clip_norm, 1.0, clip_norm / grad_norm)

    def update(params, opt_state):
      # Scaling inside the update lets XLA fuse it into the moment updates; a separate clipped
      # copy of the gradients would be one more gradient-sized buffer.
      with jax.named_scope("optimizer"):
        clipped = jax.tree.map(lambda g: g * factor.astype(g.dtype), grads)
        directions, new_opt = optimizer.update(clipped, opt_state, params)
        return optax.apply_updates(params, optim.apply_lr(directions, lr)), new_opt

    # A cond, not a select between new and old values: the select keeps the old parameters and
    # moments alive next to the new ones, so XLA copies a state-sized buffer to update in place.
    new_params, new_opt = jax.lax.cond(finite, update, lambda p, o: (p, o), state["params"],
                                       state["opt_state"])
    new_state = {
        "step": state["step"] + 1,
        "params": new_params,
        "frozen": state["frozen"],
        "opt_state": new_opt,
        "skipped_total": state["skipped_total"] + (~finite).astype(jnp.int32),
        "consecutive_skipped": jnp.where(finite, 0, state["consecutive_skipped"] + 1),
    }
    metrics = dict(stats)
    metrics.update(batch_stats(batch))
    metrics.update(loss=loss, grad_norm=grad_norm, lr=lr, finite=finite.astype(jnp.int32),
                   skipped_total=new_state["skipped_total"],
                   consecutive_skipped=new_state["consecutive_skipped"])
    return new_state, metrics

  return train_step


def make_eval_step(stats_fn: Callable) -> Callable:
  """`eval_step(params, batch) -> stats` (token sums, per task), forward only."""

  def eval_step(params, batch):
    stats = stats_fn(params, batch)
    stats.update(batch_stats(batch))
    return stats

  return eval_step


def jit_train_step(train_step: Callable, state_sh: PyTree, batch_sh: PyTree, mesh):
  """jit with explicit in/out shardings; the state buffers are donated (updated in place).

  The metrics, all small arrays, come out replicated: one sharding for their whole subtree (a
  prefix of the output tree), so building the program needs no trace of the step to learn the
  metric names (a separate full trace: ~3.7 s of the demo's start, before the compile began).
  """
  replicated = NamedSharding(mesh, PartitionSpec())
  return jax.jit(train_step, in_shardings=(state_sh, batch_sh),
                 out_shardings=(state_sh, replicated), donate_argnums=(0,))


def host_batch_to_global(batch: Mapping[str, np.ndarray], sharding) -> dict[str, jax.Array]:
  """Each process's numpy rows -> one global jax.Array per field, sharded over the batch axes."""
  return {name: jax.make_array_from_process_local_data(sharding, np.asarray(x))
          for name, x in batch.items()}


class DevicePrefetch:
  """Places the next `size` batches on the devices while the current step runs.

  A background thread pulls host batches from `loader` and calls `place` (Program.global_batch:
  the int16 encoding and the host -> device transfer), so neither sits between two steps. The
  loader runs ahead, so its checkpointable state is recorded with every batch: `get_state()` and
  `bad_record_counts()` describe the batches handed out so far, not the ones in flight, and a
  resumed run sees exactly the batches an uninterrupted one would. `set_state` must come before
  the first `next()` (the thread starts there). Errors of the loader surface from `next()`.
  `size=0` places each batch in the caller's thread instead (no overlap; the old behaviour).
  """

  _END = object()

  def __init__(self, loader, place: Callable[[Mapping[str, np.ndarray]], Any], size: int = 2):
    self.loader, self.place, self.size = loader, place, max(0, int(size))
    self._queue: queue.Queue = queue.Queue(maxsize=max(1, self.size))
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self._state = None
    self._counts = None

  def _fill(self) -> None:
    try:
      while not self._stop.is_set():
        host = next(self.loader)
        state = self.loader.get_state()
        counts = self.loader.bad_record_counts() if hasattr(self.loader, "bad_record_counts") else {}
        item = (self.place(host), state, counts)
        while not self._stop.is_set():
          try:
            self._queue.put(item, timeout=0.1)
            break
          except queue.Full:
            continue
    except BaseException as e:  # pylint: disable=broad-except  # re-raised in the consumer
      self._queue.put((self._END, e, None))

  def __iter__(self):
    return self

  def __next__(self):
    if self.size == 0:
      return self.place(next(self.loader))
    if self._thread is None:
      self._thread = threading.Thread(target=self._fill, name="moss_jax_device_prefetch",
                                      daemon=True)
      self._thread.start()
    batch, state, counts = self._queue.get()
    if batch is self._END:
      raise state
    self._state, self._counts = state, counts
    return batch

  def get_state(self):
    return self._state if self._state is not None else self.loader.get_state()

  def set_state(self, state) -> None:
    if self._thread is not None:
      raise RuntimeError("DevicePrefetch.set_state after iteration started")
    self.loader.set_state(state)

  def bad_record_counts(self) -> dict[str, int]:
    return dict(self._counts) if self._counts is not None else self.loader.bad_record_counts()

  def close(self) -> None:
    self._stop.set()
    if self._thread is not None:
      while self._thread.is_alive():
        try:
          self._queue.get(timeout=0.1)  # unblock a put
        except queue.Empty:
          pass
        self._thread.join(timeout=0.1)
    if hasattr(self.loader, "close"):
      self.loader.close()


# ----------------------------------------------------------------------------- transfer form

# data.waveform_transfer: how `audio_waveform` travels from host to device. "int16" ships 16-bit
# PCM (half the bytes of float32; the waveform is most of a batch's bytes). It is exact when the
# source audio is 16-bit PCM at 16 kHz (the decoder's float32 samples are then k / 32768, and the
# device's k * 2**-15 gives them back bit for bit); other sources are rounded to the nearest
# 1 / 32768 (<= 1.5e-5, i.e. a 16-bit requantisation), which `encode_for_transfer` reports.
WAVEFORM_TRANSFER = {"float32": np.dtype(np.float32), "int16": np.dtype(np.int16)}
_PCM_SCALE = 32768.0


def transfer_shapes(config) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """The batch schema as it travels to the devices (batch_shapes with the transfer dtypes)."""
  shapes = dict(batch_lib.batch_shapes_from_config(config))
  form = config.data.get("waveform_transfer", "float32")
  if form not in WAVEFORM_TRANSFER:
    raise ValueError(f"data.waveform_transfer must be one of {sorted(WAVEFORM_TRANSFER)}, got {form!r}")
  if "audio_waveform" in shapes:
    shapes["audio_waveform"] = (shapes["audio_waveform"][0], WAVEFORM_TRANSFER[form])
  return shapes


def encode_for_transfer(batch: Mapping[str, np.ndarray], form: str
                        ) -> tuple[dict[str, np.ndarray], float]:
  """(batch in the transfer form, largest rounding error of the waveform; 0.0 = exact)."""
  if form == "float32" or "audio_waveform" not in batch:
    return dict(batch), 0.0
  wave = np.asarray(batch["audio_waveform"], np.float32)
  scaled = wave * np.float32(_PCM_SCALE)
  pcm = np.clip(np.rint(scaled), -32768, 32767).astype(np.int16)
  error = float(np.max(np.abs(scaled - pcm), initial=0.0)) / _PCM_SCALE
  return dict(batch, audio_waveform=pcm), error


def decode_transfer(batch: Mapping[str, jax.Array]) -> Mapping[str, jax.Array]:
  """On device: int16 PCM waveforms back to float32 in [-1, 1) (exact: k * 2**-15)."""
  wave = batch.get("audio_waveform")
  if wave is None or wave.dtype != jnp.int16:
    return batch
  return dict(batch, audio_waveform=wave.astype(jnp.float32) * jnp.float32(1.0 / _PCM_SCALE))


def synthetic_batch(config, seed: int = 0, batch_size: int | None = None) -> dict[str, np.ndarray]:
  """A schema-exact random batch (benchmarks, tests, AOT checks): no corpus needed.

  Every row packs two samples; the first carries one audio clip (a full chunk, or two chunks when
  the row has room) whose encoder tokens sit after a one-token prompt, the answer is supervised.
  """
  data = config.data
  b = batch_size or data.batch_size
  length, chunks = data.max_tokens, data.max_audio_chunks
  vocab = config.model.text.vocab_size
  rng = np.random.default_rng(seed)
  out = batch_lib.empty_batch(batch_lib.batch_shapes(b, length, chunks, data.feature_mode))
  tpc = batch_lib.TOKENS_PER_CHUNK
  for r in range(b):
    n_chunks = max(1, min(chunks, (length // 2 - 2) // tpc))
    frames = [batch_lib.CHUNK_FRAMES] * (n_chunks - 1) + [int(rng.integers(8, 401))]
    n_audio = sum(batch_lib.num_audio_tokens(f) for f in frames)
    n_audio = min(n_audio, max(length // 2 - 2, 1))
    first = min(length, n_audio + 2 + int(rng.integers(2, max(3, length // 4))))
    seg_lengths = [first, int(rng.integers(0, length - first + 1))]
    start = 0
    for seg, seg_len in enumerate(seg_lengths, start=1):
      if seg_len == 0:
        continue
      sl = slice(start, start + seg_len)
      ids = rng.integers(1, vocab, seg_len)
      out["input_ids"][r, sl] = ids
      out["segment_ids"][r, sl] = seg
      out["positions"][r, sl] = np.arange(seg_len)
      out["task_ids"][r, sl] = rng.integers(0, NUM_TASKS)
      answer_from = n_audio + 2 if seg == 1 else seg_len // 2
      lab = ids.copy()
      lab[:answer_from] = batch_lib.IGNORE_INDEX
      out["labels"][r, sl] = lab
      if seg == 1:
        out["audio_token_index"][r, 1:1 + n_audio] = np.arange(n_audio)
      start += seg_len
    out["audio_chunk_frames"][r, :n_chunks] = frames
    out["audio_chunk_audio_id"][r, :n_chunks] = 1
  if "audio_mel" in out:
    out["audio_mel"][:] = rng.normal(-0.2, 0.4, out["audio_mel"].shape).astype(np.float32)
  else:
    out["audio_waveform"][:] = rng.normal(0, 0.05, out["audio_waveform"].shape).astype(np.float32)
  return out


# ----------------------------------------------------------------------------- assembled program

# Host cores from which the train step's compile overlaps the init's (or a restore).
OVERLAP_COMPILE_MIN_CORES = 8


def compile_overlaps_init(cores: int | None = None) -> bool:
  """Whether a run compiles its train step while the parameters are initialised or restored.

  XLA:CPU compiles a program on ~1.75 cores, and the init compiles too. On a 2-core host the
  two only contend, and finish later than one after the other: the README's demo with a cold
  compilation cache reached its first step in 37.3 s overlapped vs 33.4 s in turn (medians of
  7 alternating runs each on a 2-core AMD EPYC; in turn was faster in 5 of the 7 pairs). A
  TPU/GPU host has tens of cores and a restore that mostly waits on storage: there the overlap
  is the win. `cores`: those this process may use (default: its CPU affinity).
  """
  if cores is None:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return (cores or 1) >= OVERLAP_COMPILE_MIN_CORES


@dataclasses.dataclass
class Program:
  """Everything compiled for one config on one mesh: the model, shardings and jitted steps."""
  config: Any
  mesh: Any
  model: Any
  optimizer: optax.GradientTransformation
  schedule: Callable
  abstract_params: PyTree  # ShapeDtypeStruct with shardings
  state_shardings: PyTree
  abstract_state: PyTree  # ShapeDtypeStruct with shardings
  batch_sharding: Any
  abstract_batch: PyTree
  train_step: Callable  # jitted (state, batch) -> (state, metrics); donates the state
  eval_step: Callable  # jitted (params, batch) -> stats
  waveform_transfer: str = "float32"  # data.waveform_transfer: the host -> device waveform form
  inexact_batches: int = 0  # batches whose waveform int16 rounded (not 16-bit sources)
  # (thread, train-step-ready event, result dict) of compile_step_in_background, and the
  # train step's executable once step() took it.
  _compiling: Any = dataclasses.field(default=None, init=False, repr=False)
  _compiled_step: Any = dataclasses.field(default=None, init=False, repr=False)
  _create_state: Any = dataclasses.field(default=None, init=False, repr=False)

  def compile_step_in_background(self) -> None:
    """Starts compiling the train step for (abstract_state, abstract_batch) in a thread (unless
    a compile is under way or its executable already in use).

    Started before the parameters are initialised or restored (`compile_overlaps_init`), the
    two overlap. step() waits for it and then runs that executable; if the compile fails, or
    the executable refuses the real arguments, step() falls back to the jitted function (which
    compiles then). The thread then compiles the programs the run needs next, the fresh state's
    and the eval step, whose first calls reuse them: the eval step's (~5 s for the demo)
    overlaps the first steps; on a TPU/GPU host, whose cores are idle while the devices train,
    that is time off the first evaluation.
    """
    if self._compiling is not None or self._compiled_step is not None:
      return
    result: dict[str, Any] = {}
    step_ready = threading.Event()  # step() waits for this, not for the programs after it

    def compile_step():
      try:
        with sharding_lib.use_mesh(self.mesh):
          result["compiled"] = self.train_step.lower(self.abstract_state,
                                                     self.abstract_batch).compile()
      except Exception as e:  # pylint: disable=broad-except
        result["error"] = e
      step_ready.set()
      self._compile_next_programs()

    # Not a daemon: an interpreter exiting (Ctrl-C during the start) must wait for the compile,
    # as it did when the main thread compiled; a compile killed mid-way aborts the process.
    thread = threading.Thread(target=compile_step, name="compile-train-step")
    thread.start()
    self._compiling = (thread, step_ready, result)

  def _compile_next_programs(self) -> None:
    """Compiles create_state and the eval step for the abstract arguments. The executables are
    not kept here: JAX's in-memory caches (and the persistent cache) give them to the first real
    calls, which lower to the same programs."""
    for name, lower in (("create_state", lambda: self._create_state_jit().lower(
                            self.abstract_params)),
                        ("eval_step", lambda: self.eval_step.lower(self.abstract_params,
                                                                   self.abstract_batch))):
      try:
        with sharding_lib.use_mesh(self.mesh):
          lower().compile()
      except Exception as e:  # pylint: disable=broad-except
        logging.info("compiling %s ahead failed (%s); its first call compiles it", name, e)

  def _take_background_compile(self) -> None:
    _, step_ready, result = self._compiling
    self._compiling = None
    while not step_ready.wait(0.5):  # a bounded wait, so a signal (StopSignal) can interrupt it
      pass
    if "error" in result:
      logging.warning("compiling the train step ahead failed (%s); the first step compiles it",
                      result["error"])
    self._compiled_step = result.get("compiled")

  def _create_state_jit(self) -> Callable:
    if self._create_state is None:  # one jitted function: its compiled program is reused
      self._create_state = jax.jit(functools.partial(
          create_state, optimizer=self.optimizer, stage=self.config.train.stage,
          frozen_dtype=frozen_dtype(self.config)), out_shardings=self.state_shardings)
    return self._create_state

  def state_from_params(self, params: PyTree) -> dict:
    """A fresh state (step 0, zero moments) around full `params`, in the state's shardings."""
    with sharding_lib.use_mesh(self.mesh):
      return self._create_state_jit()(params)

  def init_state(self, rng: jax.Array) -> dict:
    with sharding_lib.use_mesh(self.mesh):
      params = model_lib.init_params(self.config.model, rng, self.mesh)
    return self.state_from_params(params)

  def global_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's numpy batch -> global device arrays, in the transfer form."""
    batch, error = encode_for_transfer(local_batch, self.waveform_transfer)
    if error > 0:
      self.inexact_batches += 1
      if self.inexact_batches == 1:
        logging.warning("data.waveform_transfer=int16: this batch's audio is not 16-bit PCM at "
                        "16 kHz, so it was rounded to 16 bits (max error %.2g); float32 keeps "
                        "such audio exact", error)
    return host_batch_to_global(batch, self.batch_sharding)

  def step(self, state, batch):
    if self._compiling is not None:
      self._take_background_compile()
    with sharding_lib.use_mesh(self.mesh):
      if self._compiled_step is not None:
        try:
          return self._compiled_step(state, batch)
        except (TypeError, ValueError) as e:  # arguments unlike the abstract ones: checked first
          logging.warning("the ahead-compiled train step refused the arguments (%s); using the "
                          "jitted step", e)
          self._compiled_step = None
      return self.train_step(state, batch)

  def evaluate(self, params, batch):
    with sharding_lib.use_mesh(self.mesh):
      return self.eval_step(params, batch)


def abstract_params_with_shardings(model_config, mesh) -> PyTree:
  """ShapeDtypeStruct of every parameter, carrying its NamedSharding on `mesh` (no allocation)."""
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      model_lib.abstract_params(model_config),
                      model_lib.param_shardings(model_config, mesh))


def frozen_dtype(config) -> str | None:
  """train.frozen_dtype, or None to keep the frozen half in model.param_dtype."""
  return config.train.get("frozen_dtype", "") or None


def dropout_seed(config) -> int | None:
  """A seed for dropout keys when the model has dropout (LoRA dropout), else None."""
  spec = lora.spec_from_config(config.model)
  return int(config.train.seed) + 1 if spec is not None and spec.dropout > 0 else None


def build_program(config, mesh) -> Program:
  """Model, optimizer and the jitted steps with explicit in/out shardings on `mesh`."""
  model = model_lib.MossAudioModel(config=config.model)
  # The step clips with the gradient norm it computes anyway (see make_optimizer).
  optimizer = optim.make_optimizer(config.optim, clip=False)
  schedule = optim.make_schedule(config.optim, config.train.steps)
  stage = config.train.stage

  p_sh = model_lib.param_shardings(config.model, mesh)
  abs_params = abstract_params_with_shardings(config.model, mesh)
  st_sh = state_shardings(p_sh, abs_params, optimizer, stage, mesh)
  abs_state = abstract_state(abs_params, optimizer, stage, st_sh, frozen_dtype(config))

  row_sh = sharding_lib.batch_sharding(mesh)
  shapes = transfer_shapes(config)
  abs_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=row_sh) for k, (s, d) in shapes.items()}
  batch_sh = {k: row_sh for k in shapes}
  k = config.train.grad_accum
  micro_sh = None
  if k > 1:
    micro_sh = {name: row_sh for name in shapes}
  z_loss = float(config.optim.z_loss)
  stats_fn = make_stats_fn(model, config.model, z_loss)
  step_fn = make_train_step(stats_fn, optimizer, schedule, grad_accum=k, z_loss=z_loss,
                            micro_sharding=micro_sh, clip_norm=float(config.optim.clip_norm),
                            dropout_seed=dropout_seed(config))
  with sharding_lib.use_mesh(mesh):
    train_jit = jit_train_step(step_fn, st_sh, batch_sh, mesh)
    eval_jit = jax.jit(make_eval_step(stats_fn), in_shardings=(p_sh, batch_sh),
                       out_shardings=NamedSharding(mesh, PartitionSpec()))
  return Program(config, mesh, model, optimizer, schedule, abs_params, st_sh, abs_state, row_sh,
                 abs_batch, train_jit, eval_jit,
                 waveform_transfer=config.data.get("waveform_transfer", "float32"))

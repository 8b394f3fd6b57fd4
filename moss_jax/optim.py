"""Learning-rate schedules, the AdamW update and the trainable/frozen split of training stages.

The parameter tree is split into two disjoint nested dicts: `trainable` (differentiated, with
optimizer state) and `frozen` (passed to the loss as a plain argument, never differentiated and
carrying no optimizer state). Which leaves are trainable is decided by the training stage:

  adapter         stage 1 of the reference recipe: only `audio_adapter` and the DeepStack mergers
  full            stage 2: every parameter
  encoder_frozen  fine-tuning with the audio encoder frozen

The learning rate is a pure function of the train step (not of an optimizer-internal counter),
so a skipped non-finite update does not shift the schedule and a resumed run sees the same rates.
"""

from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import optax

PyTree = Any

# Regexes over '/'-joined parameter paths; a leaf is trainable when one of its stage's rules
# matches from the start of the path.
STAGE_TRAINABLE = {
    "adapter": (r"audio_adapter/", r"deepstack_audio_merger_list_\d+/"),
    "full": (r".*",),
    "encoder_frozen": (r"(?!audio_encoder/).*",),
}
STAGES = tuple(STAGE_TRAINABLE)
SCHEDULES = ("cosine", "constant", "linear")

# Weight decay only touches matrices (kernels and embeddings), never biases or norm scales. A
# name test rather than ndim, because scanned layer stacks give biases two axes too.
_DECAYED_LEAF_NAMES = ("kernel", "embedding")


def path_str(path) -> str:
  """'/'-joined names of a `jax.tree_util` key path."""
  parts = []
  for k in path:
    if isinstance(k, jax.tree_util.DictKey):
      parts.append(str(k.key))
    elif isinstance(k, jax.tree_util.GetAttrKey):
      parts.append(k.name)
    elif isinstance(k, jax.tree_util.SequenceKey):
      parts.append(str(k.idx))
    else:
      parts.append(str(k))
  return "/".join(parts)


def trainable_mask(params: PyTree, stage: str) -> PyTree:
  """Tree of bools (same structure as `params`): True where the stage trains the leaf."""
  if stage not in STAGE_TRAINABLE:
    raise ValueError(f"unknown training stage {stage!r}; choose one of {STAGES}")
  rules = [re.compile(r) for r in STAGE_TRAINABLE[stage]]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: any(r.match(path_str(p)) for r in rules), params)


def partition(params: Mapping, mask: Mapping) -> tuple[dict, dict]:
  """Splits a nested dict into (selected, rest) by a bool tree; empty sub-dicts are dropped."""
  selected, rest = {}, {}
  for key, value in params.items():
    m = mask[key]
    if isinstance(value, Mapping):
      a, b = partition(value, m)
      if a:
        selected[key] = a
      if b:
        rest[key] = b
    elif m:
      selected[key] = value
    else:
      rest[key] = value
  return selected, rest


def merge(a: Mapping, b: Mapping) -> dict:
  """Inverse of `partition`: the union of two disjoint nested dicts."""
  out = dict(a)
  for key, value in b.items():
    if key in out:
      if not (isinstance(out[key], Mapping) and isinstance(value, Mapping)):
        raise ValueError(f"parameter {key!r} is in both halves of a partition")
      out[key] = merge(out[key], value)
    else:
      out[key] = value
  return out


def split_for_stage(params: Mapping, stage: str) -> tuple[dict, dict]:
  """(trainable, frozen) halves of `params` for a training stage."""
  trainable, frozen = partition(params, trainable_mask(params, stage))
  if not trainable:
    raise ValueError(f"stage {stage!r} leaves no trainable parameter")
  return trainable, frozen


def make_schedule(optim_config, total_steps: int) -> Callable[[jax.Array], jax.Array]:
  """Linear warmup from 0 to optim.lr, then cosine / linear decay to lr * min_lr_ratio, or constant."""
  peak = float(optim_config.lr)
  warmup = int(optim_config.warmup_steps)
  floor = peak * float(optim_config.min_lr_ratio)
  decay_steps = max(int(total_steps) - warmup, 1)
  kind = optim_config.schedule
  if kind not in SCHEDULES:
    raise ValueError(f"unknown schedule {kind!r}; choose one of {SCHEDULES}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    # Step s (0-based) is the (s+1)-th update, so the first update already has a non-zero rate.
    warm = peak * jnp.minimum((step + 1.0) / max(warmup, 1), 1.0)
    frac = jnp.clip((step - warmup) / decay_steps, 0.0, 1.0)
    if kind == "cosine":
      decayed = floor + (peak - floor) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac))
    elif kind == "linear":
      decayed = peak + (floor - peak) * frac
    else:
      decayed = jnp.asarray(peak, jnp.float32)
    return jnp.where(step < warmup, warm, decayed)

  return schedule


def decay_mask(params: PyTree) -> PyTree:
  """True for leaves that receive weight decay."""
  return jax.tree_util.tree_map_with_path(
      lambda p, _: path_str(p).rsplit("/", 1)[-1] in _DECAYED_LEAF_NAMES, params)


def make_optimizer(optim_config, clip: bool = True) -> optax.GradientTransformation:
  """AdamW without the learning rate: clip -> Adam moments -> decoupled weight decay.

  The caller multiplies the result by -lr(step) (see `apply_lr`); together this is optax's AdamW
  (`scale_by_adam`, `add_decayed_weights`, `scale_by_learning_rate`) with the clip in front.
  `clip=False` leaves the clip to the caller (the train step clips with the norm it computes
  anyway, which saves XLA a gradient-sized buffer); the state has the same structure either way.
  """
  parts = []
  if optim_config.clip_norm and optim_config.clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(optim_config.clip_norm)) if clip
                 else optax.identity())
  parts.append(optax.scale_by_adam(b1=float(optim_config.b1), b2=float(optim_config.b2),
                                   eps=float(optim_config.eps)))
  if optim_config.weight_decay:
    parts.append(optax.add_decayed_weights(float(optim_config.weight_decay), mask=decay_mask))
  return optax.chain(*parts)


def apply_lr(updates: PyTree, lr: jax.Array) -> PyTree:
  """Scales direction `updates` by -lr, keeping each leaf's dtype."""
  return jax.tree.map(lambda u: (-lr * u).astype(u.dtype), updates)


def opt_state_shardings(optimizer: optax.GradientTransformation, abstract_trainable: PyTree,
                        trainable_shardings: PyTree, replicated) -> PyTree:
  """Shardings of the optimizer state: moments follow their parameter, scalars are replicated."""
  abstract_state = jax.eval_shape(optimizer.init, abstract_trainable)
  return optax.tree_map_params(
      optimizer, lambda _, sharding: sharding, abstract_state, trainable_shardings,
      transform_non_params=lambda _: replicated,
      is_leaf=lambda x: isinstance(x, jax.ShapeDtypeStruct))

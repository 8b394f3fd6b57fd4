"""Parameter helpers: init (optionally sharded), abstract shapes, logical axes, stacking, counts.

Params are plain nested dicts of arrays (no Flax boxes): the logical axis names live in
`param_logical_axes`, which is computed from the same init function without allocating anything.
"""

from __future__ import annotations

import json
import re
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax.core import meta

from moss_jax import sharding
from moss_jax.model.moss_audio import MossAudioModel

PyTree = Any
_LAYER_KEY = re.compile(r"layers_(\d+)")


def dummy_inputs(model_config: ml_collections.ConfigDict) -> tuple[jax.Array, ...]:
  """The smallest inputs that touch every parameter (shapes of params never depend on them)."""
  del model_config
  ids = jnp.zeros((1, 8), jnp.int32)
  index = jnp.full((1, 8), -1, jnp.int32).at[0, 1].set(0)
  mel = jnp.zeros((1, 1, 128, 8), jnp.float32)
  frames = jnp.full((1, 1), 8, jnp.int32)
  return ids, ids, jnp.ones((1, 8), jnp.int32), mel, frames, index


def _boxed_init(model_config: ml_collections.ConfigDict, rng: jax.Array) -> PyTree:
  return MossAudioModel(model_config).init(rng, *dummy_inputs(model_config))["params"]


_ABSTRACT_CACHE: dict[str, PyTree] = {}
_ABSTRACT_CACHE_KEEP = 8


def _abstract_boxed(model_config: ml_collections.ConfigDict) -> PyTree:
  """The boxed (logical-axis carrying) init as ShapeDtypeStructs, traced once per config.

  Tracing the model's init costs ~0.5 s (demo) to seconds (4b), and a run asks for the shapes
  and the axes several times (program, shardings, init): the result is kept by config content.
  """
  key = json.dumps(model_config.to_dict(), sort_keys=True, default=repr)
  tree = _ABSTRACT_CACHE.pop(key, None)
  if tree is None:
    tree = jax.eval_shape(lambda r: _boxed_init(model_config, r), jax.random.key(0))
  _ABSTRACT_CACHE[key] = tree  # most recently used last
  while len(_ABSTRACT_CACHE) > _ABSTRACT_CACHE_KEEP:
    del _ABSTRACT_CACHE[next(iter(_ABSTRACT_CACHE))]
  return tree


def abstract_params(model_config: ml_collections.ConfigDict) -> PyTree:
  """Pytree of jax.ShapeDtypeStruct (via jax.eval_shape: nothing is allocated)."""
  return meta.unbox(_abstract_boxed(model_config))


def param_logical_axes(model_config: ml_collections.ConfigDict) -> PyTree:
  """Pytree of PartitionSpec holding the logical axis names of every parameter."""
  return nn.get_partition_spec(_abstract_boxed(model_config))


# XLA:CPU compiles the init (one rolled Threefry loop per parameter tensor, ~900 small kernels)
# in ~10 s at its default LLVM optimisation, as long as the demo's train step; at level 0 in
# ~6 s. The init runs once, on a few MB. Its values may differ from an optimised build's in the
# last bit (FMA contraction), deterministically: the same seed gives the same parameters.
_CPU_INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}


def init_params(model_config: ml_collections.ConfigDict, rng: jax.Array,
                mesh: jax.sharding.Mesh | None = None) -> PyTree:
  """Fresh params (param_dtype), created directly in their sharded layout when a mesh is given."""
  fn = lambda r: meta.unbox(_boxed_init(model_config, r))
  if mesh is None:
    jitted, platform = jax.jit(fn), jax.default_backend()
  else:
    jitted = jax.jit(fn, out_shardings=param_shardings(model_config, mesh))
    platform = mesh.devices.flat[0].platform
  if platform != "cpu":
    return jitted(rng)
  return jitted.lower(rng).compile(_CPU_INIT_COMPILER_OPTIONS)(rng)


def param_shardings(model_config: ml_collections.ConfigDict, mesh: jax.sharding.Mesh) -> PyTree:
  """NamedSharding for every parameter: its logical axes through sharding.LOGICAL_AXIS_RULES."""
  return sharding.logical_to_mesh_sharding(param_logical_axes(model_config), mesh)


def stack_layers(tree: PyTree) -> PyTree:
  """Unrolled tree (layers_0 .. layers_{n-1}) -> scanned tree (`layers`, layer index on axis 0)."""
  if not isinstance(tree, dict):
    return tree
  indices = sorted(int(m.group(1)) for k in tree if (m := _LAYER_KEY.fullmatch(k)))
  out = {k: stack_layers(v) for k, v in tree.items() if not _LAYER_KEY.fullmatch(k)}
  if indices:
    if indices != list(range(len(indices))):
      raise ValueError(f"layer keys are not layers_0..layers_{len(indices) - 1}: {indices}")
    if "layers" in out:
      raise ValueError("tree has both `layers` and `layers_<i>` entries")
    per_layer = [tree[f"layers_{i}"] for i in indices]
    out["layers"] = jax.tree.map(lambda *xs: jnp.stack(xs), *per_layer)
  return out


def unstack_layers(tree: PyTree) -> PyTree:
  """Scanned tree (`layers` with the layer index on axis 0) -> unrolled tree (layers_<i>)."""
  if not isinstance(tree, dict):
    return tree
  out = {}
  for key, value in tree.items():
    if key == "layers" and isinstance(value, dict):
      n = jax.tree.leaves(value)[0].shape[0]
      for i in range(n):
        out[f"layers_{i}"] = jax.tree.map(lambda x, i=i: _layer_slice(x, i), value)
    else:
      out[key] = unstack_layers(value)
  return out


def _layer_slice(x: Any, i: int) -> Any:
  if isinstance(x, jax.ShapeDtypeStruct):  # abstract trees (export planning) unstack too
    return jax.ShapeDtypeStruct(x.shape[1:], x.dtype)
  return x[i]


def count_params(tree: PyTree) -> int:
  """Total number of scalars (works on arrays and on jax.ShapeDtypeStruct)."""
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))

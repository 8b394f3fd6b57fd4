"""Mesh construction and the one table mapping logical axis names onto mesh axes.

Modules name only logical axes (nn.with_logical_partitioning / nn.with_logical_constraint); this
table decides where they land on the (data, fsdp, tensor) mesh. A name whose mesh axis is already
used by another dimension of the same array falls back to replicated (Flax resolves the rules in
order), so activations [batch, length, embed] keep fsdp on the batch while weights
[embed, heads] put it on embed.
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Iterator, Sequence

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor")

LOGICAL_AXIS_RULES: tuple[tuple[str, Any], ...] = (
    # activations
    ("batch", ("data", "fsdp")),        # token rows
    ("audio_chunks", ("data", "fsdp")),  # encoder rows: B * C chunk slots, row-major like batch
    ("length", None),
    # LLM weights (and matching activation dims)
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("mlp", "tensor"),                   # LLM SwiGLU, adapter and merger hidden
    # encoder weights
    ("audio_embed", "fsdp"),
    ("audio_heads", "tensor"),
    ("audio_mlp", "tensor"),
    # small or awkward dims stay replicated
    ("conv_in", None),
    ("conv_out", None),
    ("head_dim", None),
    ("norm", None),
    ("layers", None),                    # the nn.scan layer axis
)


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, ...]:
  """config.mesh.shape resolved for `num_devices`: the single -1 entry takes the devices left over.

  Raises ValueError saying what is wrong (config validation reports the same message).
  """
  shape = tuple(int(s) for s in shape)
  if len(shape) != len(MESH_AXES):
    raise ValueError(f"mesh shape must have {len(MESH_AXES)} entries {MESH_AXES}, got {shape}")
  if shape.count(-1) > 1:
    raise ValueError(f"mesh shape {shape} has more than one -1")
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"mesh shape {shape}: entries must be positive (or one -1)")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num_devices % known:
      raise ValueError(f"mesh shape {shape}: {known} does not divide the {num_devices} devices")
    shape = tuple(num_devices // known if s == -1 else s for s in shape)
  if math.prod(shape) != num_devices:
    raise ValueError(f"mesh shape {shape} needs {math.prod(shape)} devices but {num_devices} are "
                     "available (use -1 for the axis that takes the rest)")
  return shape


def make_mesh(mesh_config: ml_collections.ConfigDict,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
  """Mesh over (data, fsdp, tensor) from config.mesh.shape (-1 = the remaining devices)."""
  devices = list(jax.devices() if devices is None else devices)
  names = MESH_AXES  # the logical rules above name these axes
  shape = mesh_shape(mesh_config.shape, len(devices))
  auto = (jax.sharding.AxisType.Auto,) * len(shape)
  try:
    return jax.make_mesh(shape, names, axis_types=auto, devices=devices)
  except (ValueError, NotImplementedError):
    # Device subsets that the topology-aware helper rejects: plain row-major order.
    return Mesh(np.asarray(devices).reshape(shape), names, axis_types=auto)


@contextlib.contextmanager
def use_mesh(mesh: Mesh) -> Iterator[Mesh]:
  """Activates the mesh and the logical rules, so activation constraints take effect."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    yield mesh


def logical_to_mesh_sharding(logical_spec_tree: Any, mesh: Mesh) -> Any:
  """PartitionSpec tree of logical names -> NamedSharding tree on `mesh`."""
  return nn.logical_to_mesh_sharding(logical_spec_tree, mesh, LOGICAL_AXIS_RULES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Rows over (data, fsdp), everything else replicated; a prefix for every batch field."""
  return NamedSharding(mesh, PartitionSpec(("data", "fsdp")))

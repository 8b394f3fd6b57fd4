"""The config sections every recipe shares (pretrain.py and sft.py build on these).

The model's schema, defaults and reference sizes are the library's (moss_jax/model_config.py);
a recipe only picks a size and adjusts what it needs.
"""

from __future__ import annotations

import ml_collections

from moss_jax import model_config as model_config_lib

QWEN3_SPECIAL_IDS = model_config_lib.QWEN3_SPECIAL_IDS


def model_config(size: str) -> ml_collections.ConfigDict:
  """config.model: the reference '4b' / '8b' shapes, 'tiny', or 'demo' (tiny, made quicker)."""
  if size == "demo":
    c = model_config_lib.sized("tiny")
    c.audio.downsample_hidden_size = 16  # the conv stem dominates a CPU step; the demo must be quick
    # All 4 layers unrolled: the scans' stacked residual buffers (zero-fill + copy) cost 9% of a
    # CPU step; compile time unchanged (measured on the 2-core CPU).
    c.scan_unroll = 4
    return c
  return model_config_lib.sized(size)


def mesh_config() -> ml_collections.ConfigDict:
  """Mesh shape over (data, fsdp, tensor) (moss_jax/sharding.py MESH_AXES); -1 takes the devices
  left over."""
  c = ml_collections.ConfigDict()
  c.shape = (1, -1, 1)
  return c

"""MOSS-Audio in Flax Linen: audio encoder, adapter + DeepStack mergers, Qwen3 LLM.

See docs/model.md.
"""

from moss_jax.model.moss_audio import MossAudioModel, gather_audio, num_mergers
from moss_jax.model.params import (abstract_params, count_params, init_params, param_logical_axes,
                                   param_shardings, stack_layers, unstack_layers)

__all__ = [
    "MossAudioModel", "abstract_params", "count_params", "gather_audio", "init_params",
    "num_mergers", "param_logical_axes", "param_shardings", "stack_layers", "unstack_layers",
]

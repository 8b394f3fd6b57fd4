"""Hugging Face (reference PyTorch) checkpoint I/O: load/save the official MOSS-Audio format.

`load_pretrained` / `save_pretrained` convert between our Flax tree and the released
safetensors layout (spec section 6), `load_qwen3_llm` initialises the LLM from a plain Qwen3
checkpoint, and `reference_logits` runs our model on reference-layout inputs for parity checks.
The whole name mapping lives in `mapping.RULES`.
"""

from moss_jax.hf.io import (CheckpointMismatchError, CheckpointReader, config_from_pretrained,
                            load_pretrained, load_qwen3_llm, save_pretrained)
from moss_jax.hf.mapping import entries, hf_manifest, iter_export
from moss_jax.hf.reference import plan_reference_inputs, reference_generate, reference_logits

__all__ = [
    "CheckpointMismatchError", "CheckpointReader", "config_from_pretrained", "entries",
    "hf_manifest", "iter_export", "load_pretrained", "load_qwen3_llm", "plan_reference_inputs",
    "reference_generate", "reference_logits", "save_pretrained",
]

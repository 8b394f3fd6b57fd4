"""moss_jax: train MOSS-Audio-style audio-language models with JAX/Flax on TPU and GPU pods."""

__version__ = "0.1.0"

"""Data pipelines: manifests, audio decoding, features, tokenizers, prompt templates, packing, Grain."""

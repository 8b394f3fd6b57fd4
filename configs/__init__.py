"""ml_collections config files: `--config configs/pretrain.py:PRESET`."""

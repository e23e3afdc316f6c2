"""The names of the files in a vlm-adapters checkpoint directory."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT = "vlm-adapters"
"""``format`` in ``config.json``: what marks a directory as a vlm-adapters checkpoint."""

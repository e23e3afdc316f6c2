"""The names of the files in a vlm-adapters checkpoint directory."""

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT = "vlm-adapters"
"""``format`` in ``config.json``: what marks a directory as a vlm-adapters checkpoint."""
FORMAT_VERSION = 1
"""``format_version`` in ``config.json`` and ``trainer_state.json``. A change of the checkpoint
format bumps it and keeps a reader for the old one (proved on the fixtures in tests/fixtures/);
a file without it was written by an earlier release and is version 1."""

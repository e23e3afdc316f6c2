"""The embedded demo: synthetic shapes data, an offline word tokenizer, and the demo run."""

from vlm_adapters.demo.run import DEMO_SEEDS, demo_config_path, run_demo
from vlm_adapters.demo.shapes import (
    ShapesPaths,
    chance_accuracy,
    generate_shapes,
    shapes_vocabulary,
)
from vlm_adapters.demo.tokenizer import TEMPLATE_SPECIAL_TOKENS, build_word_tokenizer

__all__ = [
    "DEMO_SEEDS",
    "TEMPLATE_SPECIAL_TOKENS",
    "ShapesPaths",
    "build_word_tokenizer",
    "chance_accuracy",
    "demo_config_path",
    "generate_shapes",
    "run_demo",
    "shapes_vocabulary",
]

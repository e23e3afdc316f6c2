"""LLaVA-format datasets, collation, length-grouped sampling and the synthetic shapes data."""

from vlm_adapters.data.llava import (
    DataCollator,
    LengthGroupedSampler,
    LlavaDataset,
    SkipCounter,
    Skipped,
    load_records,
)
from vlm_adapters.data.shapes import (
    ShapesPaths,
    chance_accuracy,
    generate_shapes,
    shapes_vocabulary,
)
from vlm_adapters.data.tokenizer import TEMPLATE_SPECIAL_TOKENS, build_word_tokenizer
from vlm_adapters.templates import DataError

__all__ = [
    "TEMPLATE_SPECIAL_TOKENS",
    "DataCollator",
    "DataError",
    "LengthGroupedSampler",
    "LlavaDataset",
    "ShapesPaths",
    "SkipCounter",
    "Skipped",
    "build_word_tokenizer",
    "chance_accuracy",
    "generate_shapes",
    "load_records",
    "shapes_vocabulary",
]

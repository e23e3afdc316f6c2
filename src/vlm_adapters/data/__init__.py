"""LLaVA-format records and datasets, the processor, collation, length-grouped sampling and
safe image opening."""

from vlm_adapters.data.llava import (
    DataCollator,
    LengthGroupedSampler,
    LlavaDataset,
    SkipCounter,
    Skipped,
    load_records,
)
from vlm_adapters.errors import DataError

__all__ = [
    "DataCollator",
    "DataError",
    "LengthGroupedSampler",
    "LlavaDataset",
    "SkipCounter",
    "Skipped",
    "load_records",
]

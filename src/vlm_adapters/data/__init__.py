"""LLaVA-format records and datasets, the processor, collation, length-grouped sampling and
safe image opening.

"LLaVA" here names the data format (conversations with ``<image>`` markers); the model format
transformers reads is `vlm_adapters.export`'s "hf-llava".
"""

import warnings
from typing import Any

from vlm_adapters.data.collate import DataCollator
from vlm_adapters.data.dataset import ConversationDataset
from vlm_adapters.data.records import Skipped, load_records
from vlm_adapters.data.samplers import LengthGroupedSampler
from vlm_adapters.errors import DataError

__all__ = [
    "DataCollator",
    "DataError",
    "ConversationDataset",
    "LengthGroupedSampler",
    "Skipped",
    "load_records",
]


def __getattr__(name: str) -> Any:
    """``LlavaDataset``, the old name of `ConversationDataset`, with a DeprecationWarning."""
    if name == "LlavaDataset":
        warnings.warn(
            "vlm_adapters.data.LlavaDataset is now ConversationDataset", DeprecationWarning, 2
        )
        return ConversationDataset
    raise AttributeError(f"module 'vlm_adapters.data' has no attribute {name!r}")

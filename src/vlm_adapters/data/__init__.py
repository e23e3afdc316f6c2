"""LLaVA-format records and datasets, the processor, collation, length-grouped sampling and
safe image opening."""

from vlm_adapters.data.collate import DataCollator
from vlm_adapters.data.dataset import LlavaDataset
from vlm_adapters.data.records import Skipped, load_records
from vlm_adapters.data.samplers import LengthGroupedSampler
from vlm_adapters.errors import DataError

__all__ = [
    "DataCollator",
    "DataError",
    "LengthGroupedSampler",
    "LlavaDataset",
    "Skipped",
    "load_records",
]

"""Training: stage recipes (align, finetune; full or LoRA), the accelerate loop, checkpoints.

The names are imported on first use: `TrainerCallback` imports no training machinery."""

from typing import TYPE_CHECKING

from vlm_adapters._lazy import lazy_exports

if TYPE_CHECKING:
    from vlm_adapters.training.callbacks import TrainerCallback, TrainerControl, TrainerState
    from vlm_adapters.training.config import (
        TrainConfig,
        load_train_config,
        train_config_from_dict,
    )
    from vlm_adapters.training.loop import Trainer
    from vlm_adapters.training.run import TrainResult, train

_SOURCES = {
    "TrainConfig": "vlm_adapters.training.config",
    "TrainResult": "vlm_adapters.training.run",
    "Trainer": "vlm_adapters.training.loop",
    "TrainerCallback": "vlm_adapters.training.callbacks",
    "TrainerControl": "vlm_adapters.training.callbacks",
    "TrainerState": "vlm_adapters.training.callbacks",
    "load_train_config": "vlm_adapters.training.config",
    "train": "vlm_adapters.training.run",
    "train_config_from_dict": "vlm_adapters.training.config",
}

__all__ = [
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "TrainerCallback",
    "TrainerControl",
    "TrainerState",
    "load_train_config",
    "train",
    "train_config_from_dict",
]

__getattr__, __dir__ = lazy_exports(__name__, _SOURCES)

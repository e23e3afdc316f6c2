"""Training: stage recipes (align, finetune; full or LoRA), the accelerate loop, checkpoints."""

from vlm_adapters.training.callbacks import TrainerCallback, TrainerControl, TrainerState
from vlm_adapters.training.config import TrainConfig, load_train_config, train_config_from_dict
from vlm_adapters.training.loop import Trainer
from vlm_adapters.training.run import TrainResult, train

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

"""Training: stage recipes (align, finetune; full or LoRA), the accelerate loop, checkpoints."""

from vlm_adapters.training.config import TrainConfig, load_train_config, train_config_from_dict
from vlm_adapters.training.trainer import Trainer, train

__all__ = ["TrainConfig", "Trainer", "load_train_config", "train", "train_config_from_dict"]

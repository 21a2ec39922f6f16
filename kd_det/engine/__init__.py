"""Training: the trainer registry."""

from .trainer import TRAINER_REGISTRY, KDTrainer, get_trainer_class

__all__ = ["TRAINER_REGISTRY", "KDTrainer", "get_trainer_class"]

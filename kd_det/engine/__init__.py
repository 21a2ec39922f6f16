"""Training: the trainer registry and kd_det's hooks."""

from .hooks import TeacherEvalHook, evaluate_teacher
from .trainer import TRAINER_REGISTRY, KDTrainer, get_trainer_class

__all__ = ["TRAINER_REGISTRY", "KDTrainer", "TeacherEvalHook", "evaluate_teacher", "get_trainer_class"]

"""Training: the trainer registry, gradient accumulation and kd_det's hooks."""

from .accumulation import GradientAccumulationTrainer, micro_batch_cfg
from .hooks import TeacherEvalHook, evaluate_teacher, teacher_eval_hook
from .trainer import TRAINER_REGISTRY, KDTrainer, get_trainer_class, non_finite_loss_error

__all__ = ["TRAINER_REGISTRY", "KDTrainer", "GradientAccumulationTrainer", "TeacherEvalHook", "evaluate_teacher",
           "teacher_eval_hook", "get_trainer_class", "micro_batch_cfg", "non_finite_loss_error"]

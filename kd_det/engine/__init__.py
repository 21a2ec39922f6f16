"""Training: the trainer registry, gradient accumulation, hooks, the curriculum's trainer side."""

from .accumulation import GradientAccumulationTrainer, micro_batch_cfg
from .curriculum import restart_curriculum, score_images
from .hooks import TeacherEvalHook, evaluate_teacher, teacher_eval_hook
from .trainer import TRAINER_REGISTRY, KDTrainer, get_trainer_class, non_finite_loss_error

__all__ = [
    "TRAINER_REGISTRY",
    "KDTrainer",
    "GradientAccumulationTrainer",
    "TeacherEvalHook",
    "evaluate_teacher",
    "teacher_eval_hook",
    "get_trainer_class",
    "micro_batch_cfg",
    "non_finite_loss_error",
    "restart_curriculum",
    "score_images",
]

"""
Training: the trainer registry, gradient accumulation, hooks (teacher evaluation, distillation
health, automatic weights), the curriculum's trainer side, the dry run (:mod:`.dry_run`).
"""

from .accumulation import GradientAccumulationTrainer, micro_batch_cfg
from .auto_weight import AutoWeightHook, build_auto_weight_hook
from .curriculum import restart_curriculum, score_images
from .grad_ratio import GradRatios, measure_grad_ratios, student_parameters
from .health import DistillHealthMonitor, build_health_monitor, health_problems
from .hooks import TeacherEvalHook, evaluate_teacher, teacher_eval_hook
from .trainer import TRAINER_REGISTRY, KDTrainer, get_trainer_class, non_finite_loss_error

__all__ = [
    "AutoWeightHook",
    "DistillHealthMonitor",
    "GradRatios",
    "build_auto_weight_hook",
    "build_health_monitor",
    "health_problems",
    "measure_grad_ratios",
    "student_parameters",
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

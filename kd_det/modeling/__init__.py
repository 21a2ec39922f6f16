"""Distillation meta-architectures (registered in Detectron2's META_ARCH_REGISTRY on import)."""

from .distill_rcnn import DistillGeneralizedRCNN
from .distill_retinanet import DistillRetinaNet
from .self_distill import SelfDistillGeneralizedRCNN, SelfDistillRetinaNet
from .self_teacher import BiFPNSelfTeacher
from .channel_stats import ChannelStatsDistiller
from .feature_distiller import FeatureDistiller, match_levels
from .multi_teacher import MultiTeacherDistiller, TeacherImportanceGate
from .inherit import inherit_teacher_weights
from .teacher import FrozenTeacher, build_teacher, build_teachers

__all__ = [k for k in globals().keys() if not k.startswith("_")]

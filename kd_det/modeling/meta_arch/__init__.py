"""The distillation meta-architectures (registered in Detectron2's META_ARCH_REGISTRY on import)."""

from .base import DistillForwardMixin, DistillMixin, KDStudentMixin
from .rcnn import DistillGeneralizedRCNN
from .retinanet import DistillRetinaNet
from .self_distill import SelfDistillGeneralizedRCNN, SelfDistillRetinaNet
from .self_teacher import BiFPNSelfTeacher

__all__ = [k for k in globals().keys() if not k.startswith("_")]

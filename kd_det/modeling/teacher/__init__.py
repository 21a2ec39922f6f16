"""
The frozen teacher: which config file it is (:mod:`.resolve`), its weights
(:mod:`.weights`), the run-time wrapper a student calls (:mod:`.frozen`), and building
one or several from explicit arguments or a student's config (:mod:`.build`), by kind
(:mod:`.kinds`: Detectron2 configs; ``torchvision://`` detectors, :mod:`.torchvision_teacher`,
trained on the synthetic data on first use by :mod:`.synthetic_teacher`).  Reading a
Detectron2 teacher's config, of either kind, is :mod:`kd_det.config.detector`'s job; the
class check is :mod:`kd_det.data.classes`'.
"""

from .build import build_teacher, build_teachers, check_num_classes
from .frozen import FrozenTeacher
from .kinds import TEACHER_KIND_REGISTRY, register_teacher_kind, teacher_kind
from .resolve import resolve_teacher_config
from .synthetic_teacher import ensure_synthetic_teacher, train_torchvision_teacher
from .torchvision_teacher import TorchvisionTeacher, build_torchvision_teacher
from .weights import load_teacher_weights

__all__ = [
    "FrozenTeacher",
    "TorchvisionTeacher",
    "TEACHER_KIND_REGISTRY",
    "register_teacher_kind",
    "teacher_kind",
    "build_torchvision_teacher",
    "ensure_synthetic_teacher",
    "train_torchvision_teacher",
    "build_teacher",
    "build_teachers",
    "check_num_classes",
    "resolve_teacher_config",
    "load_teacher_weights",
]

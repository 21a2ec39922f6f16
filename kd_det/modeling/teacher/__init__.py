"""
The frozen teacher: which config file it is (:mod:`.resolve`), its weights
(:mod:`.weights`), the run-time wrapper a student calls (:mod:`.frozen`), and building
one or several from explicit arguments or a student's config (:mod:`.build`).  Reading
the teacher's config, of either kind, is :mod:`kd_det.config.detector`'s job; the class
check is :mod:`kd_det.data.classes`'.
"""

from .build import build_teacher, build_teachers, check_num_classes
from .frozen import FrozenTeacher
from .resolve import resolve_teacher_config
from .weights import load_teacher_weights

__all__ = [
    "FrozenTeacher",
    "build_teacher",
    "build_teachers",
    "check_num_classes",
    "resolve_teacher_config",
    "load_teacher_weights",
]

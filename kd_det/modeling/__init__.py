"""Distillation meta-architectures (registered in Detectron2's META_ARCH_REGISTRY on import)."""

from .distillers import (
    ChannelStatsDistiller,
    Connector,
    CrossKDDistiller,
    DenseBoxDistiller,
    DensePredictionDistiller,
    FeatureDistiller,
    LocalAttentionDistiller,
    MaskedGenerator,
    MultiTeacherDistiller,
    RoIBoxDistiller,
    RoISoftLabelDistiller,
    TeacherImportanceGate,
    match_levels,
)
from .inherit import inherit_teacher_weights
from .meta_arch import (
    BiFPNSelfTeacher,
    DistillGeneralizedRCNN,
    DistillRetinaNet,
    SelfDistillGeneralizedRCNN,
    SelfDistillRetinaNet,
)
from .recorders import AnchorMatchRecorder, ModuleOutputRecorder, Source
from .teacher import FrozenTeacher, build_teacher, build_teachers

__all__ = [k for k in globals().keys() if not k.startswith("_")]

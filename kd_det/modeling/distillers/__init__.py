"""
Distillers: the student-side components that turn what student and teacher computed into
loss terms, each with its losses from :data:`kd_det.losses.DISTILL_LOSS_REGISTRY`:
feature imitation, prediction distillation (RM, soft labels), CrossKD, box distillation,
channel statistics, several teachers, and the connectors (1x1 adapters) they share.
"""

from .box import DenseBoxDistiller, RoIBoxDistiller
from .channel_stats import ChannelStatsDistiller
from .connectors import CONNECTOR_MODES, Connector, MaskedGenerator
from .crosskd import CrossKDDistiller, align_scale, tower_channels, tower_split
from .feature import FeatureDistiller, level_pairs, match_levels
from .local_attention import LocalAttentionDistiller
from .multi_teacher import MultiTeacherDistiller, TeacherImportanceGate
from .prediction import DensePredictionDistiller, RoISoftLabelDistiller

__all__ = [k for k in globals().keys() if not k.startswith("_")]

"""What every distillation meta-architecture shares: the teacher and feature imitation."""

from typing import Dict, List, Optional

import torch
from detectron2.structures import ImageList

from .channel_stats import ChannelStatsDistiller
from .feature_distiller import FeatureDistiller
from .teacher import FrozenTeacher, build_teacher

__all__ = ["KDStudentMixin", "DistillMixin"]


class KDStudentMixin:
    """
    What export needs of every kd_det meta-architecture: the vanilla one it becomes,
    and the rule that every ``state_dict`` key that is not the vanilla detector's
    (adapters, self-teachers, gates) starts with ``kd_``.
    """

    #: Detectron2 meta-architecture of the exported student (set by each subclass)
    student_meta_architecture: str = ""

    #: prefix of every state_dict key that belongs to distillation, not to the student
    kd_key_prefix = "kd_"


class DistillMixin(KDStudentMixin):
    """
    Mixed into a Detectron2 meta-architecture (before it in the bases).

    Adds ``self.teacher`` (a :class:`FrozenTeacher`, not a submodule),
    ``self.kd_feature`` (a :class:`FeatureDistiller` or None) and ``self.kd_stats``
    (a :class:`ChannelStatsDistiller` or None).
    """

    def _init_distillation(self, teacher: FrozenTeacher, feature_distiller: Optional[FeatureDistiller],
                           channel_stats: Optional[ChannelStatsDistiller] = None):
        self.teacher = teacher
        self.kd_feature = feature_distiller
        self.kd_stats = channel_stats

    @staticmethod
    def _distill_from_config(cfg, ret: Dict) -> Dict:
        """Add ``teacher``, ``feature_distiller`` and ``channel_stats`` to a vanilla ``from_config`` result."""
        teacher = build_teacher(cfg)
        feature = stats = None
        student_shapes = ret["backbone"].output_shape()
        if cfg.KD.FEATURE.LOSS:
            feature = FeatureDistiller(cfg, student_shapes, teacher.output_shape())
        if cfg.KD.CHANNEL_STATS.ENABLED:
            stats = ChannelStatsDistiller(cfg, student_shapes, teacher.output_shape(), teacher.dense_head_levels)
        return dict(ret, teacher=teacher, feature_distiller=feature, channel_stats=stats)

    def teacher_images(self, batched_inputs: List[Dict], images: ImageList) -> ImageList:
        """The teacher's view of the student's batch (shared when both normalise alike)."""
        if self.teacher.takes_input_like(self.input_format, self.pixel_mean, self.pixel_std):
            return images
        return self.teacher.preprocess_image(batched_inputs, images, self.input_format)

    def feature_losses(
        self,
        student_features: Dict[str, torch.Tensor],
        teacher_features: Dict[str, torch.Tensor],
        position_weights: Optional[List[torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """Feature imitation and channel-statistics losses (each only if configured)."""
        losses = {}
        if self.kd_feature is not None:
            losses.update(self.kd_feature(student_features, teacher_features, position_weights))
        if self.kd_stats is not None:
            losses.update(self.kd_stats(student_features, teacher_features, self.teacher))
        return losses

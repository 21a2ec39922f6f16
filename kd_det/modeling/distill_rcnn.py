"""Distillation into a two-stage (GeneralizedRCNN) student."""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from .distill_base import DistillMixin

__all__ = ["DistillGeneralizedRCNN"]


@META_ARCH_REGISTRY.register()
class DistillGeneralizedRCNN(DistillMixin, GeneralizedRCNN):
    """
    A GeneralizedRCNN student trained beside a frozen teacher
    (``cfg.KD.TEACHER``): the teacher's backbone/FPN features are imitated with
    ``cfg.KD.FEATURE.LOSS``.  Inference is the student alone.
    """

    #: the vanilla meta-architecture the student is, once exported
    student_meta_architecture = "GeneralizedRCNN"

    @configurable
    def __init__(self, *, teacher, feature_distiller, channel_stats=None, extra_teachers=(), multi_teacher=None,
                 inherit_prefixes=(), **kwargs):
        super().__init__(**kwargs)
        self._init_distillation(teacher, feature_distiller, channel_stats, extra_teachers, multi_teacher,
                                inherit_prefixes)

    @classmethod
    def from_config(cls, cfg):
        return cls._distill_from_config(cfg, super().from_config(cfg))

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training:
            return self.inference(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        proposals, proposal_losses = self.proposal_generator(images, features, gt_instances)
        _, detector_losses = self.roi_heads(images, features, proposals, gt_instances)

        teacher_features = self.teacher_features(batched_inputs, images)
        losses = dict(detector_losses)
        losses.update(proposal_losses)
        losses.update(self.feature_losses(features, teacher_features))
        return losses

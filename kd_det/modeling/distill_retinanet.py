"""Distillation into a one-stage (RetinaNet) student."""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from .distill_base import DistillMixin

__all__ = ["DistillRetinaNet"]


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(DistillMixin, RetinaNet):
    """
    A RetinaNet student trained beside a frozen teacher (``cfg.KD.TEACHER``):
    the teacher's FPN features are imitated with ``cfg.KD.FEATURE.LOSS``.
    Inference is the student alone.
    """

    @configurable
    def __init__(self, *, teacher, feature_distiller, **kwargs):
        super().__init__(**kwargs)
        self._init_distillation(teacher, feature_distiller)

    @classmethod
    def from_config(cls, cfg):
        return cls._distill_from_config(cfg, super().from_config(cfg))

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training:
            return super().forward(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        head_features = [features[f] for f in self.head_in_features]
        predictions = self.head(head_features)
        losses = self.forward_training(images, head_features, predictions, gt_instances)

        teacher_features = self.teacher.backbone_features(self.teacher_images(batched_inputs, images))
        losses.update(self.feature_losses(features, teacher_features))
        return losses

"""Distillation into a two-stage (GeneralizedRCNN) student."""

from typing import Dict, List, Optional, Tuple

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN
from detectron2.structures import Boxes

from ..losses.prediction import softmax_kd_loss
from .distill_base import DistillMixin

__all__ = ["DistillGeneralizedRCNN", "RoIHeadRecorder"]


class RoIHeadRecorder:
    """
    Keeps what a StandardROIHeads' box head saw and said in its last training pass:
    the boxes given to its box pooler (per image, the sampled RoIs) and the class
    logits of its box predictor, (R, K + 1).  Forward hooks, so Detectron2's RoI
    heads run unchanged (mask/keypoint heads, ``train_on_pred_boxes``) and the box
    head runs once.
    """

    def __init__(self, roi_heads: torch.nn.Module):
        if not hasattr(getattr(roi_heads, "box_predictor", None), "cls_score") or not hasattr(roi_heads, "box_pooler"):
            raise ValueError("soft-label KD of a two-stage student (KD.SOFT_LABEL) needs RoI heads with one box "
                             "pooler and box predictor (StandardROIHeads), not {}".format(type(roi_heads).__name__))
        self._boxes: Optional[List[Boxes]] = None
        self._logits: Optional[torch.Tensor] = None
        roi_heads.box_pooler.register_forward_hook(self._keep_boxes)
        roi_heads.box_predictor.register_forward_hook(self._keep_logits)

    def _keep_boxes(self, module, inputs, output):
        if module.training:
            self._boxes = list(inputs[1])

    def _keep_logits(self, module, inputs, output):
        if module.training:
            self._logits = output[0]

    def pop(self) -> Tuple[List[Boxes], torch.Tensor]:
        """The boxes and class logits of the last training pass; cleared, so that no graph outlives its step."""
        if self._boxes is None or self._logits is None:
            raise RuntimeError("the RoI box head has not run in training mode since the last pop()")
        boxes, logits = self._boxes, self._logits
        self._boxes = self._logits = None
        return boxes, logits


@META_ARCH_REGISTRY.register()
class DistillGeneralizedRCNN(DistillMixin, GeneralizedRCNN):
    """
    A GeneralizedRCNN student trained beside a frozen teacher (``cfg.KD.TEACHER``).

    Losses added to Detectron2's, each switched in the config:

    * ``loss_kd_<feature loss>``: FPN feature imitation (``cfg.KD.FEATURE``);
    * ``loss_kd_soft``: soft-label classification KD on the RoI head
      (``cfg.KD.SOFT_LABEL``): the teacher's box head classifies the student's
      sampled RoIs on the teacher's features, and the student's softmax over the
      K + 1 classes is pulled to the teacher's (:func:`softmax_kd_loss`).

    Inference is the student alone.
    """

    #: the vanilla meta-architecture the student is, once exported
    student_meta_architecture = "GeneralizedRCNN"

    @configurable
    def __init__(self, *, teacher, feature_distiller, channel_stats=None, extra_teachers=(), multi_teacher=None,
                 inherit_prefixes=(), soft_label_weight: float = 0.0, soft_label_temperature: float = 1.0,
                 soft_label_mode: str = "kl", **kwargs):
        """
        Args:
            teacher, feature_distiller, channel_stats, extra_teachers, multi_teacher,
                inherit_prefixes: see :class:`DistillMixin`.
            soft_label_weight, soft_label_temperature, soft_label_mode: RoI soft-label
                KD (weight 0 disables it); see :func:`softmax_kd_loss`.
            kwargs: GeneralizedRCNN's arguments.
        """
        super().__init__(**kwargs)
        self._init_distillation(teacher, feature_distiller, channel_stats, extra_teachers, multi_teacher,
                                inherit_prefixes)
        self._init_soft_label(soft_label_weight, soft_label_temperature, soft_label_mode)
        self._roi_recorder = None
        if soft_label_weight > 0:
            teacher.require_roi_head()
            self._roi_recorder = RoIHeadRecorder(self.roi_heads)

    @classmethod
    def from_config(cls, cfg):
        return cls.distill_kwargs(cfg, super().from_config(cfg))

    @classmethod
    def distill_kwargs(cls, cfg, student_kwargs: Dict) -> Dict:
        """``student_kwargs`` (GeneralizedRCNN's arguments) with the distillation ones, from ``cfg.KD``."""
        kd = cfg.KD
        one_stage = [name for name, on in (("KD.RM", kd.RM.ENABLED), ("KD.PFI", kd.PFI.ENABLED)) if on]
        if one_stage:
            raise ValueError("{} distil per-anchor predictions of one-stage detectors, but the student is a "
                             "DistillGeneralizedRCNN; use a RetinaNet student (DistillRetinaNet) or disable "
                             "them".format(" and ".join(one_stage)))
        ret = cls._distill_from_config(cfg, student_kwargs)
        return dict(ret, **cls._soft_label_from_config(cfg))

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
        if self._roi_recorder is not None:
            losses["loss_kd_soft"] = self.soft_label_weight * self.roi_soft_label_loss(teacher_features[0])
        return losses

    def roi_soft_label_loss(self, teacher_features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """Soft-label KD on the RoIs the student's box head just classified (teacher's view of the same boxes)."""
        boxes, student_logits = self._roi_recorder.pop()
        teacher_logits = self.teacher.roi_class_logits(teacher_features, boxes)
        return softmax_kd_loss(student_logits, teacher_logits, self.soft_label_temperature, self.soft_label_mode)

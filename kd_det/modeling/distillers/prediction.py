"""Prediction distillation: Rank Mimicking and soft labels on a dense head, soft labels on RoIs."""

from typing import Dict, List, Optional, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.meta_arch.retinanet import permute_to_N_HWA_K
from detectron2.structures import Boxes
from torch import nn

from ...losses import RankMimickingLoss, SoftLabelKDLoss, SoftmaxKDLoss, build_distill_loss

__all__ = ["DensePredictionDistiller", "RoISoftLabelDistiller"]


class DensePredictionDistiller(nn.Module):
    """
    Distillation of a dense (RetinaNet-style) head's per-anchor class predictions:

    * ``loss_kd_rm``: Rank Mimicking (:class:`RankMimickingLoss`) over each object's
      positive anchors, as the student's own anchor matching assigned them;
    * ``loss_kd_soft``: soft labels (:class:`SoftLabelKDLoss`) on every anchor the
      matching does not ignore.

    A weight of 0 (or no loss) switches a term off.  No parameters.
    """

    @configurable
    def __init__(
        self,
        *,
        num_classes: int,
        rm_loss: Optional[RankMimickingLoss] = None,
        rm_weight: float = 0.0,
        soft_label_loss: Optional[SoftLabelKDLoss] = None,
        soft_label_weight: float = 0.0
    ):
        """
        Args:
            num_classes: K, the classes of the head's sigmoid classifier.
            rm_loss, rm_weight: Rank Mimicking and its weight.
            soft_label_loss, soft_label_weight: soft-label KD and its weight.
        """
        super().__init__()
        self.num_classes = num_classes
        self.rm_loss = rm_loss
        self.rm_weight = rm_weight if rm_loss is not None else 0.0
        self.soft_label_loss = soft_label_loss
        self.soft_label_weight = soft_label_weight if soft_label_loss is not None else 0.0

    @classmethod
    def from_config(cls, cfg, num_classes: int):
        """RM from ``KD.RM``, soft labels from ``KD.SOFT_LABEL``."""
        kd = cfg.KD
        return {
            "num_classes": num_classes,
            "rm_loss": build_distill_loss("RankMimickingLoss", cfg),
            "rm_weight": kd.RM.WEIGHT if kd.RM.ENABLED else 0.0,
            "soft_label_loss": build_distill_loss("SoftLabelKDLoss", cfg),
            "soft_label_weight": kd.SOFT_LABEL.WEIGHT if kd.SOFT_LABEL.ENABLED else 0.0,
        }

    @property
    def enabled(self) -> bool:
        return self.rm_weight > 0 or self.soft_label_weight > 0

    def forward(
        self,
        student_logits: Sequence[torch.Tensor],
        teacher_logits: Sequence[torch.Tensor],
        matched_idxs: torch.Tensor,
        labels: torch.Tensor,
        gt_classes: Sequence[torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_logits, teacher_logits: per level (N, A*K, H, W); the teacher's are
                constants (they may be the student's own self-teacher head's).
            matched_idxs, labels: (N, R) the anchor matching of the student's training pass
                (:class:`~kd_det.modeling.recorders.AnchorMatchRecorder`): each anchor's object
                and the matcher's label (1 positive, 0 negative, -1 ignored).
            gt_classes: per image (G_i,) the objects' classes.
        Returns:
            ``loss_kd_rm`` and ``loss_kd_soft``, each if on.
        """
        k = self.num_classes
        s = cat([permute_to_N_HWA_K(x, k) for x in student_logits], dim=1)  # (N, R, K)
        t = cat([permute_to_N_HWA_K(x, k) for x in teacher_logits], dim=1).detach()
        losses = {}
        if self.rm_weight > 0:
            matched = torch.where(labels == 1, matched_idxs, torch.full_like(matched_idxs, -1))
            rm = self.rm_loss(s, t, matched_gt=matched, gt_classes=gt_classes)
            losses["loss_kd_" + self.rm_loss.short_name] = self.rm_weight * rm
        if self.soft_label_weight > 0:
            soft = self.soft_label_loss(s, t, valid_mask=labels >= 0)
            losses["loss_kd_" + self.soft_label_loss.short_name] = self.soft_label_weight * soft
        return losses


def require_standard_roi_heads(roi_heads: nn.Module, predictor_attr: str, method: str, key: str):
    """Raise a clear error unless ``roi_heads`` has one box pooler and a box predictor with
    ``predictor_attr`` (what ``method``, switched on by ``key``, reads of a two-stage student)."""
    predictor = getattr(roi_heads, "box_predictor", None)
    if not hasattr(predictor, predictor_attr) or not hasattr(roi_heads, "box_pooler"):
        raise ValueError(
            "{} of a two-stage student ({}) needs RoI heads with one box pooler and box "
            "predictor (StandardROIHeads), not {}".format(method, key, type(roi_heads).__name__)
        )


class RoISoftLabelDistiller(nn.Module):
    """
    ``loss_kd_soft`` of a two-stage student: the teacher's box head classifies the RoIs the
    student's box head was just trained on (on the teacher's features), and the student's
    softmax over the K + 1 classes is pulled to the teacher's (:class:`SoftmaxKDLoss`).
    No parameters.
    """

    @configurable
    def __init__(self, *, loss: SoftmaxKDLoss, weight: float):
        super().__init__()
        self.loss = loss
        self.weight = weight

    @classmethod
    def from_config(cls, cfg):
        """From ``KD.SOFT_LABEL``."""
        return {
            "loss": build_distill_loss("SoftmaxKDLoss", cfg),
            "weight": cfg.KD.SOFT_LABEL.WEIGHT,
        }

    @staticmethod
    def check_student(roi_heads: nn.Module) -> None:
        """Raise a clear error unless the student's RoI heads have one box pooler and predictor."""
        require_standard_roi_heads(roi_heads, "cls_score", "soft-label KD", "KD.SOFT_LABEL")

    def forward(
        self,
        student_logits: torch.Tensor,
        boxes: List[Boxes],
        teacher,
        teacher_features: Dict[str, torch.Tensor],
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_logits: (R, K + 1) the student's box predictor's class logits.
            boxes: per image, the R sampled RoIs they classify (input coordinates).
            teacher: a :class:`FrozenTeacher` with a RoI box head.
            teacher_features: its backbone features of the batch.
        Returns:
            {"loss_kd_soft": weighted scalar}
        """
        teacher_logits = teacher.roi_class_logits(teacher_features, list(boxes))
        loss = self.loss(student_logits, teacher_logits)
        return {"loss_kd_" + self.loss.short_name: self.weight * loss}

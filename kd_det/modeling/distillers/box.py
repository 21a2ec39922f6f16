"""
Box distillation: the teacher's decoded boxes as soft regression targets on the student's
positive anchors (RetinaNet) or foreground RoIs (Faster R-CNN), each weighted by the
teacher's probability of the ground-truth class there.
"""

from typing import Dict, List, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.meta_arch.retinanet import permute_to_N_HWA_K
from detectron2.structures import Boxes
from torch import nn

from ...losses import BoxDistillLoss, build_distill_loss
from ...losses.precision import at_least_fp32
from .prediction import require_standard_roi_heads

__all__ = ["DenseBoxDistiller", "RoIBoxDistiller"]


class _BoxDistiller(nn.Module):
    """The loss and weight of ``KD.BOX``, and the step both detector kinds share.  No
    parameters."""

    @configurable
    def __init__(self, *, loss: BoxDistillLoss, weight: float):
        """
        Args:
            loss: a :class:`BoxDistillLoss` ("l1" on deltas or "giou" on boxes).
            weight: its weight in the loss dict (``loss_kd_box``).
        """
        super().__init__()
        self.loss = loss
        self.weight = weight

    @classmethod
    def from_config(cls, cfg):
        """From ``KD.BOX``."""
        return {"loss": build_distill_loss("BoxDistillLoss", cfg), "weight": cfg.KD.BOX.WEIGHT}

    @staticmethod
    def encode(transform, boxes: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
        """
        ``transform.get_deltas(references, boxes)`` with the size deltas clamped as
        ``apply_deltas`` clamps them (|dw| / ww, |dh| / wh at most ``scale_clamp``), so that a
        teacher box of (nearly) zero width, whose log size is -inf, still gives a finite target.
        """
        deltas = transform.get_deltas(references, boxes)
        limit = deltas.new_tensor(transform.weights[2:]) * transform.scale_clamp
        return torch.cat([deltas[:, :2], torch.max(torch.min(deltas[:, 2:], limit), -limit)], 1)

    def _loss(
        self,
        student_deltas: torch.Tensor,
        teacher_boxes: torch.Tensor,
        references: torch.Tensor,
        transform,
        weights: torch.Tensor,
        normalizer: float,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_deltas: (P, 4) the student's deltas for P anchors/RoIs.
            teacher_boxes: (P, 4) the teacher's decoded boxes for them.
            references: (P, 4) the anchors/RoIs the deltas are relative to.
            transform: the student's ``Box2BoxTransform``.
            weights: (P,) the teacher's confidence.
        """
        if self.loss.takes_boxes:
            student, teacher = transform.apply_deltas(student_deltas, references), teacher_boxes
        else:
            student, teacher = student_deltas, self.encode(transform, teacher_boxes, references)
        loss = self.loss(student, teacher, weights=weights, normalizer=normalizer)
        return {"loss_kd_" + self.loss.short_name: self.weight * loss}


class DenseBoxDistiller(_BoxDistiller):
    """
    ``loss_kd_box`` of a RetinaNet student: on each anchor the student's own matching made
    positive, the teacher's box (its head's deltas on that anchor, decoded against the
    teacher's anchors with its ``box2box_transform``) is the target of the student's
    regression, weighted by the teacher's sigmoid probability of the anchor's ground-truth
    class; the sum is divided by the batch's positive anchors, as RetinaNet's box loss.
    """

    def forward(
        self,
        student_deltas: Sequence[torch.Tensor],
        teacher_logits: Sequence[torch.Tensor],
        teacher_deltas: Sequence[torch.Tensor],
        student_anchors: List[Boxes],
        teacher_anchors: List[Boxes],
        matched_idxs: torch.Tensor,
        labels: torch.Tensor,
        gt_classes: Sequence[torch.Tensor],
        student_transform,
        teacher_transform,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_deltas, teacher_deltas: per level (N, A*4, H, W).
            teacher_logits: per level (N, A*K, H, W).
            student_anchors, teacher_anchors: per level, the anchors of one image (Boxes,
                H*W*A each), as the detectors' anchor generators make them.
            matched_idxs, labels: (N, R) the student's anchor matching of this step
                (:class:`~kd_det.modeling.recorders.AnchorMatchRecorder`).
            gt_classes: per image (G_i,) the objects' classes.
            student_transform, teacher_transform: the two ``Box2BoxTransform``.
        Returns:
            {"loss_kd_box": weighted scalar}
        """
        k = teacher_logits[0].shape[1] // (teacher_deltas[0].shape[1] // 4)
        pos = labels == 1
        n = len(labels)
        s = cat([permute_to_N_HWA_K(x, 4) for x in student_deltas], dim=1)[pos]  # (P, 4)
        td = cat([permute_to_N_HWA_K(x, 4) for x in teacher_deltas], dim=1)[pos].detach()
        tl = cat([permute_to_N_HWA_K(x, k) for x in teacher_logits], dim=1)[pos].detach()
        classes = torch.stack(
            [
                c.to(matched_idxs.device)[m] if len(c) else torch.zeros_like(m)
                for c, m in zip(gt_classes, matched_idxs.clamp(min=0))
            ]
        )[pos]
        weights = at_least_fp32(tl).gather(1, classes[:, None]).squeeze(1).sigmoid()
        s_anchors = Boxes.cat(student_anchors).tensor.expand(n, -1, -1)[pos]
        t_anchors = Boxes.cat(teacher_anchors).tensor.expand(n, -1, -1)[pos]
        teacher_boxes = teacher_transform.apply_deltas(td, t_anchors)
        normalizer = max(int(pos.sum()), 1)
        return self._loss(s, teacher_boxes, s_anchors, student_transform, weights, normalizer)


class RoIBoxDistiller(_BoxDistiller):
    """
    ``loss_kd_box`` of a Faster R-CNN student: the teacher's box head runs on the RoIs the
    student's box head was just trained on (on the teacher's features); on the foreground
    RoIs, the teacher's box for the RoI's ground-truth class (its deltas decoded with its
    ``box2box_transform``) is the target of the student's regression for that class,
    weighted by the teacher's softmax probability of the class; background RoIs take no box
    loss.  The sum is divided by the sampled RoIs, as Detectron2's box loss.
    """

    @staticmethod
    def check_student(roi_heads: nn.Module) -> None:
        """Raise a clear error unless the student's RoI heads have one box pooler and
        predictor."""
        require_standard_roi_heads(roi_heads, "bbox_pred", "box distillation", "KD.BOX")

    def forward(
        self,
        student_deltas: torch.Tensor,
        boxes: List[Boxes],
        gt_classes: torch.Tensor,
        teacher,
        teacher_features: Dict[str, torch.Tensor],
        student_transform,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_deltas: (R, 4 K) the student's box predictor's deltas (or (R, 4):
                class-agnostic).
            boxes: per image, the sampled RoIs they refine (input coordinates; R in all).
            gt_classes: (R,) each RoI's class from the student's sampling, K for background.
            teacher: a :class:`FrozenTeacher` with a RoI box head.
            teacher_features: its backbone features of the batch.
            student_transform: the student's ``Box2BoxTransform``.
        Returns:
            {"loss_kd_box": weighted scalar}
        """
        teacher_logits, teacher_deltas = teacher.roi_predictions(teacher_features, list(boxes))
        num_classes = teacher_logits.shape[1] - 1
        rois = Boxes.cat(list(boxes)).tensor
        fg = (gt_classes >= 0) & (gt_classes < num_classes)
        cls = gt_classes[fg]
        rois_fg = rois[fg]
        probs = at_least_fp32(teacher_logits[fg]).softmax(dim=1)
        weights = probs.gather(1, cls[:, None]).squeeze(1)

        def for_class(deltas):
            """(P, 4): each foreground RoI's deltas for its class (or the agnostic ones)."""
            deltas = deltas[fg]
            if deltas.shape[1] == 4:
                return deltas
            return deltas.view(len(deltas), -1, 4)[torch.arange(len(deltas)), cls]

        transform = teacher.roi_box_transform
        teacher_boxes = transform.apply_deltas(for_class(teacher_deltas).detach(), rois_fg)
        normalizer = max(len(gt_classes), 1)
        return self._loss(
            for_class(student_deltas),
            teacher_boxes,
            rois_fg,
            student_transform,
            weights,
            normalizer,
        )

"""Distillation losses on box regression, and CrossKD's class-score loss.

Both compare per-box (or per-anchor) rows that the distillers have already selected:
the student's positive anchors or foreground RoIs (box distillation), or the anchors its
matcher does not ignore (CrossKD).  The sums are divided by a ``normalizer`` that the
distiller gives, the one its detector divides its own box loss by (the number of positive
anchors of the batch for RetinaNet, of sampled RoIs for Faster R-CNN), so a distillation
weight of 1 puts the term on the scale of the detector's own box loss.

The functions are the maths; :class:`BoxDistillLoss` and :class:`CrossKDClassLoss` are their
entries in :data:`~kd_det.losses.DISTILL_LOSS_REGISTRY`.
"""

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from .precision import at_least_fp32
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss

__all__ = [
    "BOX_LOSS_TYPES",
    "CROSSKD_CLASS_MODES",
    "box_distill_loss",
    "giou_distance",
    "crosskd_class_loss",
    "BoxDistillLoss",
    "CrossKDClassLoss",
]

#: the box distances of :func:`box_distill_loss`
BOX_LOSS_TYPES = ("l1", "giou")
#: the class-score distances of :func:`crosskd_class_loss`
CROSSKD_CLASS_MODES = ("qfl", "kl")


def _check(value: str, allowed, key: str) -> None:
    if value not in allowed:
        raise ValueError("{} must be one of {}, got {!r}".format(key, list(allowed), value))


def giou_distance(boxes1: torch.Tensor, boxes2: torch.Tensor, eps: float = 1e-7) -> torch.Tensor:
    """
    1 - GIoU (Rezatofighi et al., CVPR 2019) of paired boxes (x0, y0, x1, y1), (P, 4) each:
    (P,).  Unlike fvcore's ``giou_loss`` (which adds ``eps`` to the areas), ``eps`` only floors
    the union and enclosing areas, so identical boxes of positive area give exactly 0.
    """
    x0, y0, x1, y1 = boxes1.unbind(dim=1)
    u0, v0, u1, v1 = boxes2.unbind(dim=1)
    inter = (torch.min(x1, u1) - torch.max(x0, u0)).clamp(min=0) * (
        torch.min(y1, v1) - torch.max(y0, v0)
    ).clamp(min=0)
    union = ((x1 - x0) * (y1 - y0) + (u1 - u0) * (v1 - v0) - inter).clamp(min=eps)
    enclosing = (
        (torch.max(x1, u1) - torch.min(x0, u0)) * (torch.max(y1, v1) - torch.min(y0, v0))
    ).clamp(min=eps)
    return 1 - (inter / union - (enclosing - union) / enclosing)


def box_distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    weights: torch.Tensor,
    normalizer: float,
    loss_type: str = "l1",
) -> torch.Tensor:
    """
    Box regression towards the teacher's boxes, weighted per box:
    ``sum_p weights[p] * d(student[p], teacher[p]) / normalizer``.

    Args:
        student, teacher: (P, 4).  For ``"l1"``, box deltas in the student's encoding (the
            teacher's boxes encoded against the same anchors or RoIs): d is the L1 distance
            summed over the 4 coordinates, as Detectron2's L1 box losses.  For ``"giou"``,
            decoded boxes (x0, y0, x1, y1): d = 1 - GIoU.
        weights: (P,) non-negative, constants (e.g. the teacher's confidence).
        normalizer: > 0, what the sum is divided by.
        loss_type: "l1" or "giou".
    Returns:
        scalar; 0 (with a graph to ``student``) when P = 0.  The teacher's side is detached.
    """
    _check(loss_type, BOX_LOSS_TYPES, "KD.BOX.LOSS / KD.CROSSKD.BOX_LOSS")
    if student.shape != teacher.shape or student.dim() != 2 or student.shape[1] != 4:
        raise ValueError(
            "box distillation compares (P, 4) boxes or deltas, got student {} and teacher "
            "{}".format(tuple(student.shape), tuple(teacher.shape))
        )
    if student.shape[0] == 0:
        return student.sum() * 0.0
    s = at_least_fp32(student)
    t = at_least_fp32(teacher).detach()
    if loss_type == "l1":
        per_box = (s - t).abs().sum(dim=1)
    else:
        per_box = giou_distance(s, t)
    return (per_box * weights.detach().to(per_box.dtype)).sum() / normalizer


def crosskd_class_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    normalizer: float,
    mode: str = "qfl",
    beta: float = 1.0,
) -> torch.Tensor:
    """
    CrossKD's classification term (Wang et al., CVPR 2024) on sigmoid class scores, summed
    over anchors and classes and divided by ``normalizer``.  With p_s = sigmoid(s),
    p_t = sigmoid(t), per anchor and class:

    * ``"qfl"`` (the paper's quality-focal KD loss): BCE(p_s, p_t) * |p_s - p_t| ** beta;
    * ``"kl"``: the binary KL(p_t || p_s).

    Both are 0, with a zero gradient, where the student's logit equals the teacher's.

    Args:
        student_logits, teacher_logits: (P, K), the cross-head's and the teacher's.
        normalizer: > 0 (the number of positive anchors).
        mode: "qfl" or "kl".
        beta: the focal exponent of "qfl".
    Returns:
        scalar; 0 (with a graph) when P = 0.  The teacher's side is detached.
    """
    _check(mode, CROSSKD_CLASS_MODES, "KD.CROSSKD.CLASS_LOSS")
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student logits {} and teacher logits {} differ in shape".format(
                tuple(student_logits.shape), tuple(teacher_logits.shape)
            )
        )
    if student_logits.numel() == 0:
        return student_logits.sum() * 0.0
    s = at_least_fp32(student_logits)
    t = at_least_fp32(teacher_logits).detach()
    p_t = t.sigmoid()
    loss = F.binary_cross_entropy_with_logits(s, p_t, reduction="none")
    if mode == "qfl":
        loss = loss * (s.sigmoid() - p_t).abs().pow(beta)
    else:
        loss = loss - F.binary_cross_entropy_with_logits(t, p_t, reduction="none")
    return loss.sum() / normalizer


class BoxLoss(DistillLoss):
    """Base class of the losses on box regression (boxes or deltas of the same anchors/RoIs)."""

    kind = "box"


@DISTILL_LOSS_REGISTRY.register()
class BoxDistillLoss(BoxLoss):
    """
    :func:`box_distill_loss` as a registered loss:
    ``loss(student, teacher, weights=..., normalizer=...)`` with (P, 4) boxes (``"giou"``) or
    deltas (``"l1"``) and (P,) weights.  From ``KD.BOX.LOSS``.
    """

    short_name = "box"

    @configurable
    def __init__(self, *, loss_type: str = "l1"):
        _check(loss_type, BOX_LOSS_TYPES, "KD.BOX.LOSS")
        self.loss_type = loss_type

    @classmethod
    def from_config(cls, cfg):
        return {"loss_type": cfg.KD.BOX.LOSS}

    @property
    def takes_boxes(self) -> bool:
        """Whether it compares decoded boxes (``"giou"``) rather than deltas (``"l1"``)."""
        return self.loss_type == "giou"

    def __call__(self, student, teacher, *, weights, normalizer):
        return box_distill_loss(student, teacher, weights, normalizer, self.loss_type)


@DISTILL_LOSS_REGISTRY.register()
class CrossKDClassLoss(DistillLoss):
    """
    :func:`crosskd_class_loss` as a registered loss: ``loss(student_logits, teacher_logits,
    normalizer=...)`` with (P, K) logits.  From ``KD.CROSSKD.CLASS_LOSS`` and ``.BETA``.
    """

    short_name = "crosskd_cls"
    kind = "prediction"

    @configurable
    def __init__(self, *, mode: str = "qfl", beta: float = 1.0):
        _check(mode, CROSSKD_CLASS_MODES, "KD.CROSSKD.CLASS_LOSS")
        self.mode = mode
        self.beta = beta

    @classmethod
    def from_config(cls, cfg):
        return {"mode": cfg.KD.CROSSKD.CLASS_LOSS, "beta": cfg.KD.CROSSKD.BETA}

    def __call__(self, student, teacher, *, normalizer):
        return crosskd_class_loss(student, teacher, normalizer, self.mode, self.beta)

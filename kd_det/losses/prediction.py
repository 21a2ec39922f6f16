"""Distillation losses on class predictions.

Dense (one-stage, RetinaNet-style) shapes follow Detectron2's RetinaNet: logits per
anchor are (N, R, K) with R the anchors of all levels concatenated
(``permute_to_N_HWA_K`` then ``cat``), or per level (N, A*K, H, W) as the head
outputs them.  A two-stage RoI head's class logits are (R, K + 1), background last.

The functions are the maths; :class:`RankMimickingLoss`, :class:`SoftLabelKDLoss` and
:class:`SoftmaxKDLoss` are their entries in :data:`~kd_det.losses.DISTILL_LOSS_REGISTRY`.
"""

from typing import List, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from .precision import at_least_fp32
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss

__all__ = [
    "rank_mimicking_loss",
    "soft_label_kd_loss",
    "softmax_kd_loss",
    "prediction_difference_weights",
    "PredictionLoss",
    "RankMimickingLoss",
    "SoftLabelKDLoss",
    "SoftmaxKDLoss",
]

# the soft-label modes of soft_label_kd_loss and softmax_kd_loss
_SOFT_LABEL_MODES = ("kl", "bce")


def _check_mode(mode: str) -> None:
    if mode not in _SOFT_LABEL_MODES:
        raise ValueError("KD.SOFT_LABEL.MODE must be 'kl' or 'bce', got {!r}".format(mode))


def _segment_log_softmax(
    values: torch.Tensor, segments: torch.Tensor, num_segments: int
) -> torch.Tensor:
    """log-softmax of ``values`` (P,) within the groups given by ``segments`` (P,)
    in [0, num_segments)."""
    seg_max = values.new_full((num_segments,), float("-inf"))
    seg_max = seg_max.scatter_reduce(0, segments, values.detach(), reduce="amax", include_self=True)
    shifted = values - seg_max[segments]
    seg_sum = values.new_zeros(num_segments).index_add(0, segments, shifted.exp())
    return shifted - seg_sum[segments].log()


def rank_mimicking_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    matched_gt: torch.Tensor,
    gt_classes: Sequence[torch.Tensor],
    temperature: float = 1.0,
) -> torch.Tensor:
    """
    Rank Mimicking (Li et al., AAAI 2022).  For every ground-truth object, its
    positive anchors' sigmoid scores at the object's class, softmaxed with
    ``temperature``, form a distribution over those anchors; the student's is pulled
    to the teacher's by KL(teacher || student), averaged over the objects that have
    at least one positive anchor.

    Args:
        student_logits, teacher_logits: (N, R, K) class logits per anchor.
        matched_gt: (N, R) long, the index of the ground-truth object in its image
            that each anchor is a positive for, and -1 for negative and ignored anchors.
        gt_classes: N tensors (G_i,) of class ids of each image's objects.
        temperature: softmax temperature over the scores.
    Returns:
        scalar; 0 (still attached to ``student_logits``) when no object has a positive anchor.
        An object with a single positive anchor contributes 0 (both distributions are one-hot).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student and teacher class logits differ in shape: {} vs {}; rank mimicking needs "
            "the same anchors per position and classes".format(
                tuple(student_logits.shape), tuple(teacher_logits.shape)
            )
        )
    s_scores, t_scores, segments = [], [], []
    offset = 0
    for i, classes in enumerate(gt_classes):
        pos = matched_gt[i] >= 0
        gt_idx = matched_gt[i][pos]
        cls = classes.to(gt_idx.device)[gt_idx]
        s_scores.append(student_logits[i][pos, cls])
        t_scores.append(teacher_logits[i][pos, cls])
        segments.append(gt_idx + offset)
        offset += len(classes)
    segments = torch.cat(segments)
    if segments.numel() == 0:
        return student_logits.sum() * 0.0
    s = at_least_fp32(torch.cat(s_scores)).sigmoid() / temperature
    t = at_least_fp32(torch.cat(t_scores)).detach().sigmoid() / temperature
    log_ps = _segment_log_softmax(s, segments, offset)
    log_pt = _segment_log_softmax(t, segments, offset)
    kl_terms = log_pt.exp() * (log_pt - log_ps)
    per_object = s.new_zeros(offset).index_add(0, segments, kl_terms)
    has_anchor = torch.zeros(offset, dtype=torch.bool, device=s.device)
    has_anchor[segments] = True
    return per_object[has_anchor].mean()


def soft_label_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    valid_mask: torch.Tensor,
    temperature: float = 1.0,
    mode: str = "kl",
) -> torch.Tensor:
    """
    Soft-label classification distillation for sigmoid classifiers: every class of
    every anchor is a binary distribution; the student's sigmoid(s / T) is pulled to
    the teacher's sigmoid(t / T).

    Args:
        student_logits, teacher_logits: (N, R, K).
        valid_mask: (N, R) bool, anchors to use (e.g. not ignored by the matcher).
        temperature: T; the loss is multiplied by T^2 as in Hinton et al.
        mode: "kl" (binary KL, zero when equal) or "bce" (cross-entropy with soft
            targets: KL plus the teacher's entropy, same gradients).
    Returns:
        scalar: sum over classes, mean over valid anchors.
    """
    _check_mode(mode)
    s = at_least_fp32(student_logits[valid_mask]) / temperature
    t = at_least_fp32(teacher_logits[valid_mask]).detach() / temperature
    if s.numel() == 0:
        return student_logits.sum() * 0.0
    p_t = t.sigmoid()
    loss = F.binary_cross_entropy_with_logits(s, p_t, reduction="none")
    if mode == "kl":
        loss = loss - F.binary_cross_entropy_with_logits(t, p_t, reduction="none")
    return loss.sum(dim=1).mean() * temperature**2


def softmax_kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    temperature: float = 1.0,
    mode: str = "kl",
) -> torch.Tensor:
    """
    Soft-label classification distillation for softmax classifiers (Hinton et al.;
    on Faster R-CNN's RoI head as in Chen et al., NeurIPS 2017): the student's
    softmax(s / T) over the K + 1 classes of each RoI is pulled to the teacher's.

    Args:
        student_logits, teacher_logits: (R, C) for the same R boxes.
        temperature: T; the loss is multiplied by T^2 so that its gradient keeps its scale.
        mode: "kl" (KL(teacher || student), zero when equal) or "bce" (cross-entropy
            with the teacher's soft targets: KL plus the teacher's entropy, same gradients).
    Returns:
        scalar: sum over classes, mean over the R boxes (0 with a graph when R = 0).
    """
    _check_mode(mode)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            "student logits {} and teacher logits {} differ in shape".format(
                tuple(student_logits.shape), tuple(teacher_logits.shape)
            )
        )
    if student_logits.shape[0] == 0:
        return student_logits.sum() * 0.0
    log_p_s = F.log_softmax(at_least_fp32(student_logits) / temperature, dim=1)
    log_p_t = F.log_softmax(at_least_fp32(teacher_logits).detach() / temperature, dim=1)
    p_t = log_p_t.exp()
    loss = -(p_t * log_p_s).sum(dim=1)
    if mode == "kl":
        loss = loss + (p_t * log_p_t).sum(dim=1)
    return loss.mean() * temperature**2


def prediction_difference_weights(
    student_logits: Sequence[torch.Tensor],
    teacher_logits: Sequence[torch.Tensor],
    eps: float = 1e-12,
) -> List[torch.Tensor]:
    """
    Prediction-guided Feature Imitation weights (Li et al., AAAI 2022): per level
    and position, the mean over channels (anchors x classes) of the squared
    difference between teacher and student class logits.  Each image's map is
    divided by its mean, so weights average 1 over a level's positions: imitation
    moves to where the predictions differ without changing the loss scale as the
    student converges (the raw differences shrink over training).

    Args:
        student_logits, teacher_logits: per level (N, A*K, H, W).
    Returns:
        per level (N, H, W) non-negative weights, detached.
    """
    weights = []
    for s, t in zip(student_logits, teacher_logits):
        if s.shape != t.shape:
            raise ValueError(
                "student and teacher class logits differ in shape: {} vs {}; PFI needs the same "
                "anchors per position, classes and strides".format(tuple(s.shape), tuple(t.shape))
            )
        diff = (at_least_fp32(t.detach()) - at_least_fp32(s.detach())).pow(2).mean(dim=1)
        weights.append(diff / diff.mean(dim=(1, 2), keepdim=True).clamp_min(eps))
    return weights


class PredictionLoss(DistillLoss):
    """Base class of the losses on class predictions (logits of the same boxes or anchors)."""

    kind = "prediction"


@DISTILL_LOSS_REGISTRY.register()
class RankMimickingLoss(PredictionLoss):
    """
    :func:`rank_mimicking_loss` as a registered loss:
    ``loss(student_logits, teacher_logits, matched_gt=..., gt_classes=...)`` with (N, R, K)
    logits, ``matched_gt`` (N, R) and ``gt_classes`` as that function takes them.
    """

    short_name = "rm"

    @configurable
    def __init__(self, *, temperature: float = 1.0):
        self.temperature = temperature

    @classmethod
    def from_config(cls, cfg):
        return {"temperature": cfg.KD.RM.TEMPERATURE}

    def __call__(self, student, teacher, *, matched_gt, gt_classes):
        return rank_mimicking_loss(student, teacher, matched_gt, gt_classes, self.temperature)


class _SoftLabelLoss(PredictionLoss):
    """Temperature and mode of the soft-label losses (``KD.SOFT_LABEL``)."""

    short_name = "soft"

    @configurable
    def __init__(self, *, temperature: float = 1.0, mode: str = "kl"):
        _check_mode(mode)
        self.temperature = temperature
        self.mode = mode

    @classmethod
    def from_config(cls, cfg):
        return {"temperature": cfg.KD.SOFT_LABEL.TEMPERATURE, "mode": cfg.KD.SOFT_LABEL.MODE}


@DISTILL_LOSS_REGISTRY.register()
class SoftLabelKDLoss(_SoftLabelLoss):
    """
    :func:`soft_label_kd_loss` (sigmoid classifiers, per anchor) as a registered loss:
    ``loss(student_logits, teacher_logits, valid_mask=...)`` with (N, R, K) logits and an
    (N, R) bool mask.
    """

    def __call__(self, student, teacher, *, valid_mask):
        return soft_label_kd_loss(student, teacher, valid_mask, self.temperature, self.mode)


@DISTILL_LOSS_REGISTRY.register()
class SoftmaxKDLoss(_SoftLabelLoss):
    """
    :func:`softmax_kd_loss` (softmax classifiers, e.g. RoI heads) as a registered loss:
    ``loss(student_logits, teacher_logits)`` with (R, C) logits of the same R boxes.
    """

    def __call__(self, student, teacher):
        return softmax_kd_loss(student, teacher, self.temperature, self.mode)

"""
CrossKD (Wang et al., "CrossKD: Cross-Head Knowledge Distillation for Object Detection",
CVPR 2024) for RetinaNet students: the student's head-tower features go through the
teacher's remaining head layers, and these cross-head predictions mimic the teacher's own.
"""

from typing import Dict, List, Sequence

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling.meta_arch.retinanet import permute_to_N_HWA_K
from detectron2.structures import Boxes
from torch import nn

from ...losses import BoxDistillLoss, CrossKDClassLoss, build_distill_loss
from ...losses.precision import at_least_fp32
from .connectors import Connector

__all__ = ["CrossKDDistiller", "tower_split", "tower_channels", "align_scale"]


def tower_split(subnet: nn.Sequential, index: int) -> int:
    """
    Where CrossKD cuts a RetinaNet head tower (``cls_subnet``/``bbox_subnet``: conv, [norm],
    ReLU, repeated): the position p such that ``subnet[:p]`` computes the output of the
    first ``index`` convs (with their norms) before the last one's activation, and
    ``subnet[p:]`` the rest, starting with that activation.  ``index`` 0 cuts before the
    first conv (p = 0: the tower's input, the FPN feature).

    Raises:
        ValueError: the tower has fewer than ``index`` convs.
    """
    if index == 0:
        return 0
    activations = [i for i, m in enumerate(subnet) if isinstance(m, nn.ReLU)]
    if not 0 < index <= len(activations):
        raise ValueError(
            "KD.CROSSKD.HEAD_INDEX is {}, but the head tower has {} convs (MODEL.RETINANET."
            "NUM_CONVS): give an index from 0 to {}".format(
                index, len(activations), len(activations)
            )
        )
    return activations[index - 1]


def tower_channels(subnet: nn.Sequential, index: int, in_channels: int) -> int:
    """Channels of a head tower's features at its CrossKD cut (``in_channels`` at index 0)."""
    convs = [m for m in subnet[: tower_split(subnet, index)] if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels if convs else in_channels


def align_scale(student: torch.Tensor, teacher: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """
    The student's features with the teacher's per-channel statistics, as CrossKD's reference
    code does before the teacher's layers: each channel standardised over (N, H, W), then
    scaled by the teacher's channel std and shifted by its mean (unbiased std).

    Args:
        student, teacher: (N, C, H, W) of one level.
    Returns:
        (N, C, H, W), differentiable in ``student``.
    """
    dims = (0, 2, 3)
    t = teacher.detach()
    s_mean, s_std = student.mean(dims, keepdim=True), student.std(dims, keepdim=True)
    t_mean, t_std = t.mean(dims, keepdim=True), t.std(dims, keepdim=True)
    return (student - s_mean) / (s_std + eps) * t_std + t_mean


class CrossKDDistiller(nn.Module):
    """
    CrossKD for a RetinaNet student and a RetinaNet teacher of the same classes and anchors
    per position.  The student's class and box towers are cut after ``head_index`` convs
    (before that conv's activation; 0: the FPN features themselves), mapped to the teacher's
    channels by a 1x1 connector where they differ, given the teacher's per-channel
    statistics at the same cut (``align``), then run through the rest of the teacher's
    towers and its predictors (frozen; the gradient reaches the student).  The cross-head
    predictions are pulled to the teacher's own, on every anchor the student's matching
    does not ignore, divided by the batch's positive anchors (as in the reference code):

    * ``loss_kd_crosskd_cls``: :class:`CrossKDClassLoss` (quality-focal or binary KL) on the
      sigmoid class scores;
    * ``loss_kd_crosskd_box``: :class:`BoxDistillLoss` (GIoU on boxes decoded against the
      teacher's anchors, or L1 on deltas), each anchor weighted by the teacher's highest
      class probability.

    Its parameters are the connector's (none when widths match), dropped at export.
    """

    @configurable
    def __init__(
        self,
        *,
        head_index: int,
        student_channels: int,
        teacher_channels: int,
        class_loss: CrossKDClassLoss,
        class_weight: float,
        box_loss: BoxDistillLoss,
        box_weight: float,
        align: bool = True,
        adapter: str = "auto"
    ):
        """
        Args:
            head_index: convs of the student's towers before the cut (the paper's i;
                0: the FPN features).
            student_channels, teacher_channels: the towers' widths at the cut.
            class_loss, class_weight: the class-score term and its weight.
            box_loss, box_weight: the box term and its weight.
            align: give the student's features the teacher's per-channel mean and std.
            adapter: the connector mode ("auto": a 1x1 conv where widths differ,
                "conv1x1", "none").
        """
        super().__init__()
        if head_index < 0:
            raise ValueError("KD.CROSSKD.HEAD_INDEX must be >= 0, got {}".format(head_index))
        self.head_index = head_index
        self.student_channels = student_channels
        self.teacher_channels = teacher_channels
        self.class_loss = class_loss
        self.class_weight = class_weight
        self.box_loss = box_loss
        self.box_weight = box_weight
        self.align = align
        try:
            self.connector = Connector(
                {"cls": student_channels, "box": student_channels},
                {"cls": teacher_channels, "box": teacher_channels},
                ["cls", "box"],
                adapter,
            )
        except ValueError as e:
            raise ValueError(
                "CrossKD head towers: {} (here the key is KD.CROSSKD.ADAPTER)".format(e)
            ) from None

    @classmethod
    def from_config(cls, cfg, student_channels: int, teacher_channels: int):
        """From ``KD.CROSSKD``."""
        c = cfg.KD.CROSSKD
        return {
            "head_index": c.HEAD_INDEX,
            "student_channels": student_channels,
            "teacher_channels": teacher_channels,
            "class_loss": build_distill_loss("CrossKDClassLoss", cfg),
            "class_weight": c.CLASS_WEIGHT,
            "box_loss": BoxDistillLoss(loss_type=c.BOX_LOSS),
            "box_weight": c.BOX_WEIGHT,
            "align": c.ALIGN_SCALE,
            "adapter": c.ADAPTER,
        }

    def cross_head(
        self,
        student_towers: Sequence[List[torch.Tensor]],
        teacher_towers: Sequence[List[torch.Tensor]],
        teacher,
    ):
        """
        The cross-head predictions.

        Args:
            student_towers, teacher_towers: (class tower, box tower) cuts, each per level
                (N, C_s, H, W) / (N, C_t, H, W).
            teacher: the :class:`FrozenTeacher`.
        Returns:
            per level, class logits (N, A*K, H, W) and box deltas (N, A*4, H, W).
        """
        inputs = []
        for name, s_levels, t_levels in zip(("cls", "box"), student_towers, teacher_towers):
            conv = self.connector[name] if name in self.connector else None
            levels = []
            for s, t in zip(s_levels, t_levels):
                s = conv(s) if conv is not None else s
                levels.append(align_scale(s, t) if self.align else s)
            inputs.append(levels)
        return teacher.dense_head_from_towers(inputs[0], inputs[1], self.head_index)

    def forward(
        self,
        student_towers: Sequence[List[torch.Tensor]],
        teacher_outputs: Sequence[List[torch.Tensor]],
        teacher,
        labels: torch.Tensor,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_towers: (class tower, box tower) of the student at the cut, per level
                (N, C_s, H, W).
            teacher_outputs: the teacher's :meth:`FrozenTeacher.dense_head_predictions` with
                ``tower_index=head_index``: logits, deltas, class tower, box tower per level.
            teacher: the :class:`FrozenTeacher` (its head, anchors and box transform).
            labels: (N, R) the student's matcher labels (1 positive, 0 negative, -1 ignored).
        Returns:
            ``loss_kd_crosskd_cls`` and ``loss_kd_crosskd_box`` (weighted scalars).
        """
        t_logits, t_deltas, t_cls, t_box = teacher_outputs
        x_logits, x_deltas = self.cross_head(student_towers, (t_cls, t_box), teacher)
        k = t_logits[0].shape[1] // (t_deltas[0].shape[1] // 4)
        valid = labels >= 0
        normalizer = max((labels == 1).sum().item(), 1)
        xs = cat([permute_to_N_HWA_K(x, k) for x in x_logits], dim=1)[valid]  # (P, K)
        ts = cat([permute_to_N_HWA_K(x, k) for x in t_logits], dim=1)[valid].detach()
        losses = {
            "loss_kd_crosskd_cls": self.class_weight
            * self.class_loss(xs, ts, normalizer=normalizer)
        }
        xd = cat([permute_to_N_HWA_K(x, 4) for x in x_deltas], dim=1)  # (N, R, 4)
        td = cat([permute_to_N_HWA_K(x, 4) for x in t_deltas], dim=1).detach()
        weights = at_least_fp32(ts).sigmoid().amax(dim=1)  # the teacher's top class probability
        if self.box_loss.takes_boxes:
            m = teacher.model
            anchors = Boxes.cat(m.anchor_generator(t_logits))  # (R, 4); only sizes are read
            anchors = anchors.tensor.expand(len(labels), -1, -1)[valid]  # (P, 4)
            transform = m.box2box_transform
            xd = transform.apply_deltas(xd[valid], anchors)
            td = transform.apply_deltas(td[valid], anchors)
        else:
            xd, td = xd[valid], td[valid]
        box = self.box_loss(xd, td, weights=weights, normalizer=normalizer)
        losses["loss_kd_crosskd_box"] = self.box_weight * box
        return losses

"""Channel-statistics transfer with AdaIN, judged by the teacher's own head."""

from typing import Dict, List

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from ...losses import AdaINHeadLoss, ChannelStatisticsLoss
from .connectors import Connector
from .feature import Channels, check_level_shapes, match_levels, per_level_channels

__all__ = ["ChannelStatsDistiller"]


class ChannelStatsDistiller(nn.Module):
    """
    Two losses on the teacher's dense-head levels (RetinaNet head, or a two-stage
    teacher's RPN):

    * ``loss_kd_stats``: the student's per-channel mean and std (after a 1x1 adapter
      where channels differ) pulled to the teacher's (:class:`ChannelStatisticsLoss`);
    * ``loss_kd_adain``: the student's statistics transplanted into the teacher's
      features by AdaIN; the teacher's head judges them: the squared difference of
      its outputs on those features and on its own (:class:`AdaINHeadLoss`).  Its
      gradient reaches the student through the transplanted statistics only.

    The adapters are a :class:`Connector` (mode "auto") and share its initialisation,
    Kaiming-uniform (a=1) weights and zero bias.  Before issue 31 they kept PyTorch's
    default ``nn.Conv2d`` initialisation, so a channel-statistics student starts from
    other adapter weights (and later random numbers) than with earlier kd_det versions.
    """

    @configurable
    def __init__(
        self,
        *,
        levels: List[str],
        student_channels: Channels,
        teacher_channels: Channels,
        stats_weight: float = 1.0,
        adain_weight: float = 1.0
    ):
        """
        Args:
            levels: the teacher head's levels (all of them: the head judges whole pyramids),
                e.g. ["p3", "p4", "p5", "p6", "p7"] for a RetinaNet teacher, its RPN's
                ["p2", ..., "p6"] for a two-stage one (the meta-architecture checks).
            student_channels, teacher_channels: channels per level, a dict or one int for
                every level (checked against both backbones by the meta-architecture).
            stats_weight, adain_weight: weights of the two losses (0 disables one).
        """
        super().__init__()
        self.levels = list(levels)
        self.student_channels = per_level_channels(
            student_channels, self.levels, "student_channels"
        )
        self.teacher_channels = per_level_channels(
            teacher_channels, self.levels, "teacher_channels"
        )
        self.stats_weight = stats_weight
        self.adain_weight = adain_weight
        self.stats_loss = ChannelStatisticsLoss()
        self.adain_loss = AdaINHeadLoss()
        self.adapters = Connector(self.student_channels, self.teacher_channels, self.levels, "auto")

    @classmethod
    def from_config(
        cls,
        cfg,
        student_shapes: Dict[str, ShapeSpec],
        teacher_shapes: Dict[str, ShapeSpec],
        head_levels: List[str],
    ):
        levels = match_levels(student_shapes, teacher_shapes, head_levels)
        return {
            "levels": levels,
            "student_channels": {k: student_shapes[k].channels for k in levels},
            "teacher_channels": {k: teacher_shapes[k].channels for k in levels},
            "stats_weight": cfg.KD.CHANNEL_STATS.WEIGHT,
            "adain_weight": cfg.KD.CHANNEL_STATS.ADAIN_WEIGHT,
        }

    def check_shapes(self, student_shapes: Dict[str, ShapeSpec], teacher) -> None:
        """
        Raise unless the levels are the teacher's dense-head levels and the channels fit
        both backbones (``teacher``: a :class:`FrozenTeacher`).
        """
        head_levels = teacher.dense_head_levels
        if sorted(self.levels) != sorted(head_levels):
            raise ValueError(
                "channel_stats levels {} must be the levels of the teacher's dense "
                "head (its RetinaNet head or RPN), {}: its head judges whole "
                "pyramids; set levels={}".format(self.levels, head_levels, head_levels)
            )
        check_level_shapes(
            "channel_stats",
            self.levels,
            self.student_channels,
            self.teacher_channels,
            student_shapes,
            teacher.output_shape(),
        )

    def forward(
        self,
        student_features: Dict[str, torch.Tensor],
        teacher_features: Dict[str, torch.Tensor],
        teacher,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_features, teacher_features: name -> (N, C, H, W).
            teacher: a :class:`FrozenTeacher` (its ``dense_head_outputs`` judges the AdaIN
                features).
        Returns:
            {"loss_kd_stats": .., "loss_kd_adain": ..} (terms with weight 0 left out).
        """
        student = self.adapters(student_features, self.levels)
        target = [teacher_features[k] for k in self.levels]
        losses = {}
        if self.stats_weight > 0:
            stats = self.stats_loss(student, target)
            losses["loss_kd_" + self.stats_loss.short_name] = self.stats_weight * stats
        if self.adain_weight > 0:

            def head(features: List[torch.Tensor], grad: bool) -> List[torch.Tensor]:
                return teacher.dense_head_outputs(dict(zip(self.levels, features)), grad=grad)

            losses["loss_kd_" + self.adain_loss.short_name] = self.adain_weight * self.adain_loss(
                student, target, head=head
            )
        return losses

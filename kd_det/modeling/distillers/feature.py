"""Feature imitation: level matching, the student-side connector and the feature loss."""

from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from ...losses import FeatureLoss, build_feature_loss
from .connectors import Connector, MaskedGenerator

__all__ = ["FeatureDistiller", "match_levels", "per_level_channels", "check_level_shapes"]

#: channels of each level: a dict, or one int for every level (what a LazyConfig can write
#: without knowing a backbone's output shapes)
Channels = Union[int, Mapping[str, int]]


def per_level_channels(
    channels: Channels, levels: Sequence[str], what: str = "channels"
) -> Dict[str, int]:
    """
    ``channels`` as a dict over ``levels``: an int is every level's count.

    Raises:
        ValueError: a dict that leaves out one of ``levels`` (named by ``what``).
    """
    if isinstance(channels, int):
        return {k: channels for k in levels}
    missing = [k for k in levels if k not in channels]
    if missing:
        raise ValueError(
            "{} {} gives no channel count for levels {}: give one per level, or one "
            "int for every level".format(what, dict(channels), missing)
        )
    return {k: int(channels[k]) for k in levels}


def check_level_shapes(
    component: str,
    levels: Sequence[str],
    student_channels: Dict[str, int],
    teacher_channels: Dict[str, int],
    student_shapes: Dict[str, ShapeSpec],
    teacher_shapes: Dict[str, ShapeSpec],
    teacher: str = "teacher",
) -> None:
    """
    Check a distiller's explicit levels and channel counts against the backbones it was
    given to: each level output by both with one stride, and the channels it was built for.
    (A distiller built from a yacs config took them from these shapes: always true there.)

    Args:
        component: how messages name the distiller, e.g. "feature_distiller".
        student_shapes, teacher_shapes: the backbones' ``output_shape()``.
        teacher: what the target is, for messages ("teacher", "self-teacher").
    Raises:
        ValueError naming the level, the numbers and the argument to change.
    """
    for name in levels:
        for who, shapes in (("student", student_shapes), (teacher, teacher_shapes)):
            if name not in shapes:
                raise ValueError(
                    "{} imitates level {!r}, which the {}'s backbone does not output "
                    "(it has {}): set its levels to levels both output".format(
                        component, name, who, sorted(shapes)
                    )
                )
        if student_shapes[name].stride != teacher_shapes[name].stride:
            raise ValueError(
                "{}: level {!r} has stride {} in the student but {} in the {}; "
                "imitate only levels of equal stride".format(
                    component,
                    name,
                    student_shapes[name].stride,
                    teacher_shapes[name].stride,
                    teacher,
                )
            )
        for who, given, shapes, arg in (
            ("student", student_channels, student_shapes, "student_channels"),
            (teacher, teacher_channels, teacher_shapes, "teacher_channels"),
        ):
            if given[name] != shapes[name].channels:
                raise ValueError(
                    "{} was built for {} channels of the {} at level {!r}, but its "
                    "backbone outputs {}: set {}={}".format(
                        component,
                        given[name],
                        who,
                        name,
                        shapes[name].channels,
                        arg,
                        shapes[name].channels,
                    )
                )


def match_levels(
    student_shapes: Dict[str, ShapeSpec],
    teacher_shapes: Dict[str, ShapeSpec],
    in_features: List[str],
) -> List[str]:
    """
    The FPN levels to imitate: ``in_features``, or every level both backbones
    output.  Each must exist in both with the same stride.

    Raises:
        ValueError: naming the levels and strides that cannot be matched.
    """

    def describe(shapes):
        return ", ".join("{}(stride {})".format(k, v.stride) for k, v in shapes.items())

    levels = list(in_features) or [k for k in student_shapes if k in teacher_shapes]
    if not levels:
        raise ValueError(
            "no FPN level is shared by student [{}] and teacher [{}]; set KD.FEATURE.IN_FEATURES "
            "to levels both output".format(describe(student_shapes), describe(teacher_shapes))
        )
    for name in levels:
        if name not in student_shapes or name not in teacher_shapes:
            raise ValueError(
                "KD.FEATURE.IN_FEATURES level {!r} is not output by both backbones: student [{}], "
                "teacher [{}]".format(name, describe(student_shapes), describe(teacher_shapes))
            )
        if student_shapes[name].stride != teacher_shapes[name].stride:
            raise ValueError(
                "level {!r} has stride {} in the student but {} in the teacher; imitate only "
                "levels of equal stride (KD.FEATURE.IN_FEATURES)".format(
                    name, student_shapes[name].stride, teacher_shapes[name].stride
                )
            )
    return levels


# Default per-level weights for L levels (KD.FEATURE.LEVEL_REDUCTION).  "sum" is the
# convention of SSIM-KD, whose published lambda multiplies the sum over FPN levels.
LEVEL_REDUCTIONS = {
    "mean": lambda num_levels: [1.0 / num_levels] * num_levels,
    "sum": lambda num_levels: [1.0] * num_levels,
}


class FeatureDistiller(nn.Module):
    """
    Imitation of teacher backbone features by the student's.

    Holds the student-side 1x1 adapters (a :class:`Connector`, ``adapters``; trained with
    the student and dropped at export), for losses that need one (MGD) the masked generation
    blocks after them (a :class:`MaskedGenerator`, ``generator``; likewise) and the feature
    loss (a :class:`FeatureLoss` of :data:`~kd_det.losses.DISTILL_LOSS_REGISTRY`).
    """

    @configurable
    def __init__(
        self,
        *,
        levels: List[str],
        student_channels: Channels,
        teacher_channels: Channels,
        loss: FeatureLoss,
        weight: float,
        level_weights: Optional[List[float]] = None,
        level_reduction: str = "mean",
        adapter: str = "auto",
        generator: Optional[MaskedGenerator] = None,
    ):
        """
        Args:
            levels: feature names to imitate, e.g. ["p2", "p3", "p4", "p5", "p6"]; each must be
                output by both backbones with one stride (the meta-architecture checks).
            student_channels, teacher_channels: channels of each level, a dict or one int for
                every level (e.g. ``student_channels=64, teacher_channels=256`` for FPNs of
                those widths; the meta-architecture checks them against both backbones).
            loss: the feature loss, e.g. ``SSIMFeatureLoss()``.
            weight: multiplies the loss.
            level_weights: per-level weights; None/empty: ``level_reduction`` decides.
            level_reduction: "mean" (weights 1/L) or "sum" (weights 1) over the L levels.
            adapter: "auto" (1x1 conv where channels differ), "conv1x1" (always), "none".
            generator: MGD's masked generation blocks, applied after the adapters, with the
                teacher's channels at every level (e.g. ``MaskedGenerator(teacher_channels,
                levels)``); required by losses with ``needs_generator`` (MGDFeatureLoss).
        """
        super().__init__()
        self.levels = list(levels)
        self.loss = loss
        self.weight = weight
        if level_reduction not in LEVEL_REDUCTIONS:
            raise ValueError(
                "KD.FEATURE.LEVEL_REDUCTION must be one of {}, got {!r}".format(
                    sorted(LEVEL_REDUCTIONS), level_reduction
                )
            )
        if level_weights and len(level_weights) != len(self.levels):
            raise ValueError(
                "KD.FEATURE.LEVEL_WEIGHTS has {} entries for the {} imitated levels {}".format(
                    len(level_weights), len(self.levels), self.levels
                )
            )
        self.level_weights = (
            list(level_weights)
            if level_weights
            else LEVEL_REDUCTIONS[level_reduction](len(self.levels))
        )
        self.student_channels = per_level_channels(
            student_channels, self.levels, "student_channels"
        )
        self.teacher_channels = per_level_channels(
            teacher_channels, self.levels, "teacher_channels"
        )
        self.adapters = Connector(
            self.student_channels,
            self.teacher_channels,
            self.levels,
            adapter,
            loss.needs_equal_channels,
        )
        if loss.needs_generator and generator is None:
            raise ValueError(
                "{} compares generated features: give the distiller a generator "
                "(MaskedGenerator; KD.MGD in a yacs config)".format(type(loss).__name__)
            )
        if generator is not None:
            for name in self.levels:
                block = generator[name] if name in generator else None
                if block is None or block[0].in_channels != self.teacher_channels[name]:
                    raise ValueError(
                        "generator has no block for level {!r} with the teacher's {} channels; "
                        "build it as MaskedGenerator(teacher_channels, levels)".format(
                            name, self.teacher_channels[name]
                        )
                    )
        # None for every loss but MGD: their modules and state_dict keys stay as they were
        self.generator = generator

    @classmethod
    def from_config(
        cls, cfg, student_shapes: Dict[str, ShapeSpec], teacher_shapes: Dict[str, ShapeSpec]
    ):
        levels = match_levels(student_shapes, teacher_shapes, cfg.KD.FEATURE.IN_FEATURES)
        loss = build_feature_loss(cfg)
        generator = None
        if loss.needs_generator:
            generator = MaskedGenerator(
                {k: teacher_shapes[k].channels for k in levels},
                levels,
                mask_ratio=cfg.KD.MGD.MASK_RATIO,
                kernel_size=cfg.KD.MGD.KERNEL_SIZE,
                hidden_channels=cfg.KD.MGD.HIDDEN_CHANNELS,
            )
        return {
            "levels": levels,
            "student_channels": {k: student_shapes[k].channels for k in levels},
            "teacher_channels": {k: teacher_shapes[k].channels for k in levels},
            "loss": loss,
            "weight": cfg.KD.FEATURE.WEIGHT,
            "level_weights": cfg.KD.FEATURE.LEVEL_WEIGHTS,
            "level_reduction": cfg.KD.FEATURE.LEVEL_REDUCTION,
            "adapter": cfg.KD.FEATURE.ADAPTER,
            "generator": generator,
        }

    def check_shapes(
        self,
        student_shapes: Dict[str, ShapeSpec],
        teacher_shapes: Dict[str, ShapeSpec],
        component: str = "feature_distiller",
        teacher: str = "teacher",
    ) -> None:
        """Raise unless the levels and channels fit these backbones (:func:`check_level_shapes`)."""
        check_level_shapes(
            component,
            self.levels,
            self.student_channels,
            self.teacher_channels,
            student_shapes,
            teacher_shapes,
            teacher,
        )

    def adapt(
        self,
        student_features: Dict[str, torch.Tensor],
        rng: Optional[torch.Generator] = None,
    ) -> List[torch.Tensor]:
        """
        Student features of the imitated levels, through their adapters (and, with MGD, masked
        and generated): list of (N, C_t, H, W), what the loss compares with the teacher's.

        Args:
            rng: the random-number generator of MGD's masks (default: PyTorch's global one).
        """
        adapted = self.adapters(student_features, self.levels)
        if self.generator is None:
            return adapted
        return self.generator(adapted, self.levels, rng)

    def forward(
        self,
        student_features: Dict[str, torch.Tensor],
        teacher_features: Dict[str, torch.Tensor],
        position_weights: Optional[List[torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_features, teacher_features: name -> (N, C, H, W).
            position_weights: optional per-level (N, H, W) weights (e.g. PFI).
        Returns:
            {"loss_kd_<loss>": weighted scalar loss}
        """
        student = self.adapt(student_features)
        teacher = [teacher_features[k] for k in self.levels]
        value = self.loss(
            student, teacher, level_weights=self.level_weights, position_weights=position_weights
        )
        return {"loss_kd_" + self.loss.short_name: self.weight * value}

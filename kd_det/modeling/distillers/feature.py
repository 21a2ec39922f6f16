"""Feature imitation: level matching, the student-side connector and the feature loss."""

import logging
import math
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from torch import nn

from ...losses import FeatureLoss, build_feature_loss
from .connectors import Connector, MaskedGenerator

__all__ = [
    "FeatureDistiller",
    "match_levels",
    "level_pairs",
    "per_level_channels",
    "check_level_shapes",
]

logger = logging.getLogger(__name__)

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
    teacher_levels: Optional[Mapping[str, str]] = None,
    teacher_scale: float = 1.0,
) -> None:
    """
    Check a distiller's explicit levels and channel counts against the backbones it was
    given to: each level output by both with one stride, and the channels it was built for.
    (A distiller built from a yacs config took them from these shapes: always true there.)

    Args:
        component: how messages name the distiller, e.g. "feature_distiller".
        student_shapes, teacher_shapes: the backbones' ``output_shape()``.
        teacher: what the target is, for messages ("teacher", "self-teacher").
        teacher_levels: student level -> the teacher level it imitates (default: the same
            name); their strides in the student's image must agree within a factor of 2
            (``teacher_scale``: the teacher's input scale; see :func:`level_pairs`).
    Raises:
        ValueError naming the level, the numbers and the argument to change.
    """
    teacher_levels = dict(teacher_levels or {})
    for name in levels:
        tname = teacher_levels.get(name, name)
        for who, shapes, level in (
            ("student", student_shapes, name),
            (teacher, teacher_shapes, tname),
        ):
            if level not in shapes:
                raise ValueError(
                    "{} imitates level {!r}, which the {}'s backbone does not output "
                    "(it has {}): set its levels to levels both output".format(
                        component, level, who, sorted(shapes)
                    )
                )
        ratio = teacher_shapes[tname].stride / teacher_scale / student_shapes[name].stride
        exact = abs(math.log2(ratio)) < 1e-6
        if not exact and (teacher_scale == 1.0 or abs(math.log2(ratio)) >= 1.0):
            raise ValueError(
                "{}: level {!r} has stride {} in the student but {} in the {} (level {!r}, "
                "input scale {:g}); imitate only levels of equal stride".format(
                    component,
                    name,
                    student_shapes[name].stride,
                    teacher_shapes[tname].stride,
                    teacher,
                    tname,
                    teacher_scale,
                )
            )
        for who, given, shapes, arg in (
            ("student", student_channels, student_shapes, "student_channels"),
            (teacher, teacher_channels, teacher_shapes, "teacher_channels"),
        ):
            level = name if shapes is student_shapes else tname
            if given[name] != shapes[level].channels:
                raise ValueError(
                    "{} was built for {} channels of the {} at level {!r}, but its "
                    "backbone outputs {}: set {}={}".format(
                        component,
                        given[name],
                        who,
                        name,
                        shapes[level].channels,
                        arg,
                        shapes[level].channels,
                    )
                )


def _describe(shapes: Dict[str, ShapeSpec], scale: float = 1.0) -> str:
    return ", ".join(
        "{}(stride {:g})".format(k, v.stride / scale)
        for k, v in sorted(shapes.items(), key=lambda kv: kv[1].stride)
    )


def level_pairs(
    student_shapes: Dict[str, ShapeSpec],
    teacher_shapes: Dict[str, ShapeSpec],
    in_features: Sequence[str] = (),
    teacher_scale: float = 1.0,
) -> Dict[str, str]:
    """
    Student levels paired with teacher levels by their stride in the student's input image
    (not by name): a teacher run on the batch resized by ``teacher_scale`` has stride
    ``stride / teacher_scale`` there, so a 2x teacher's p3 (stride 8) pairs with the student's
    p2 (stride 4).  A student level no teacher level matches pairs with the teacher level of
    the nearest stride within a factor of 2, whose maps are then resampled to the student's
    size; levels with neither are skipped (logged).

    Args:
        in_features: the student levels to imitate (``KD.FEATURE.IN_FEATURES``); empty: every
            student level that pairs.  A level named here that does not pair is an error.
    Returns:
        student level -> teacher level, in the student's order.
    Raises:
        ValueError: naming the levels and strides that cannot be paired.
    """
    pairs, skipped = {}, []
    for name in in_features or list(student_shapes):
        if name not in student_shapes:
            raise ValueError(
                "KD.FEATURE.IN_FEATURES level {!r} is not output by both backbones (the "
                "student's does not): student [{}], teacher [{}]; name student levels".format(
                    name, _describe(student_shapes), _describe(teacher_shapes, teacher_scale)
                )
            )
        stride = student_shapes[name].stride
        distance = {
            t: abs(math.log2(s.stride / teacher_scale / stride)) for t, s in teacher_shapes.items()
        }
        best = min(distance, key=distance.get, default=None)
        if best is not None and distance[best] < 1e-6:
            pairs[name] = best
        elif best is not None and distance[best] < 1.0 and teacher_scale != 1.0:
            pairs[name] = best  # resampled to the student's size
            logger.info(
                "feature KD: student level %s (stride %d) pairs with teacher level %s "
                "(stride %g in the student's image), resampled",
                name,
                stride,
                best,
                teacher_shapes[best].stride / teacher_scale,
            )
        elif in_features:
            raise ValueError(
                "KD.FEATURE.IN_FEATURES level {!r} (stride {}) has no teacher level of that "
                "stride: student [{}], teacher [{}] (strides in the student's input image, "
                "KD.TEACHER.INPUT_SCALE {:g}); name only levels both output".format(
                    name,
                    stride,
                    _describe(student_shapes),
                    _describe(teacher_shapes, teacher_scale),
                    teacher_scale,
                )
            )
        else:
            skipped.append(name)
    if skipped:
        logger.info(
            "feature KD skips student levels %s: no teacher level of their stride (teacher [%s])",
            skipped,
            _describe(teacher_shapes, teacher_scale),
        )
    if not pairs:
        raise ValueError(
            "no FPN level is shared by student [{}] and teacher [{}] (strides in the student's "
            "input image); set KD.FEATURE.IN_FEATURES to levels both output".format(
                _describe(student_shapes), _describe(teacher_shapes, teacher_scale)
            )
        )
    return pairs


def match_levels(
    student_shapes: Dict[str, ShapeSpec],
    teacher_shapes: Dict[str, ShapeSpec],
    in_features: List[str],
) -> List[str]:
    """
    The FPN levels to imitate where teacher and student name them alike: ``in_features``, or
    every level both backbones output.  Each must exist in both with the same stride (what
    components that run the teacher's own head on its levels need; feature imitation pairs
    levels by stride, :func:`level_pairs`).

    Raises:
        ValueError: naming the levels and strides that cannot be matched.
    """
    levels = list(in_features) or [k for k in student_shapes if k in teacher_shapes]
    if not levels:
        raise ValueError(
            "no FPN level is shared by student [{}] and teacher [{}]; set KD.FEATURE.IN_FEATURES "
            "to levels both output".format(_describe(student_shapes), _describe(teacher_shapes))
        )
    for name in levels:
        if name not in student_shapes or name not in teacher_shapes:
            raise ValueError(
                "KD.FEATURE.IN_FEATURES level {!r} is not output by both backbones: student [{}], "
                "teacher [{}]".format(name, _describe(student_shapes), _describe(teacher_shapes))
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
        teacher_levels: Optional[Mapping[str, str]] = None,
        teacher_scale: float = 1.0,
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
            teacher_levels: student level -> the teacher level it imitates, paired by stride
                (:func:`level_pairs`); default: the same names.  ``teacher_channels`` are
                keyed by student level.
            teacher_scale: the factor the teacher's input was resized by
                (``KD.TEACHER.INPUT_SCALE``); checked against the strides.
        """
        super().__init__()
        self.levels = list(levels)
        self.teacher_levels = {k: (teacher_levels or {}).get(k, k) for k in self.levels}
        self.teacher_scale = float(teacher_scale)
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
        scale = cfg.KD.TEACHER.INPUT_SCALE
        pairs = level_pairs(student_shapes, teacher_shapes, cfg.KD.FEATURE.IN_FEATURES, scale)
        levels = list(pairs)
        loss = build_feature_loss(cfg)
        generator = None
        if loss.needs_generator:
            generator = MaskedGenerator(
                {k: teacher_shapes[pairs[k]].channels for k in levels},
                levels,
                mask_ratio=cfg.KD.MGD.MASK_RATIO,
                kernel_size=cfg.KD.MGD.KERNEL_SIZE,
                hidden_channels=cfg.KD.MGD.HIDDEN_CHANNELS,
            )
        return {
            "levels": levels,
            "student_channels": {k: student_shapes[k].channels for k in levels},
            "teacher_channels": {k: teacher_shapes[pairs[k]].channels for k in levels},
            "teacher_levels": pairs,
            "teacher_scale": scale,
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
            self.teacher_levels,
            self.teacher_scale,
        )

    def teacher_maps(
        self, teacher_features: Dict[str, torch.Tensor], student: Sequence[torch.Tensor]
    ) -> List[torch.Tensor]:
        """
        The teacher's maps of the imitated levels, paired by stride: per level (N, C_t, H, W)
        with the student's H, W (bilinearly resampled where the sizes differ: a level of
        another stride, or the last row/column a coarser padding rounds differently).
        """
        maps = []
        for name, s in zip(self.levels, student):
            t = teacher_features[self.teacher_levels[name]]
            if t.shape[-2:] != s.shape[-2:]:
                t = F.interpolate(t, size=s.shape[-2:], mode="bilinear", align_corners=False)
            maps.append(t)
        return maps

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
        teacher = self.teacher_maps(teacher_features, student)
        value = self.loss(
            student, teacher, level_weights=self.level_weights, position_weights=position_weights
        )
        return {"loss_kd_" + self.loss.short_name: self.weight * value}

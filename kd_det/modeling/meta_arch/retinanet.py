"""Distillation into a one-stage (RetinaNet) student."""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet

from ...losses import prediction_difference_weights
from ..distillers import (
    CrossKDDistiller,
    DenseBoxDistiller,
    DensePredictionDistiller,
    tower_channels,
    tower_split,
)
from ..recorders import Source
from .base import STUDENT_INPUT_SOURCES, DistillMixin

__all__ = ["DistillRetinaNet", "DENSE_SOURCES", "HEAD_TOWER_SOURCES"]

#: what a RetinaNet student records: its input and features, and its head's outputs,
#: ([class logits (N, A*K, H, W) per level], [box deltas (N, A*4, H, W) per level])
DENSE_SOURCES = dict(STUDENT_INPUT_SOURCES, head=Source("head"))
#: a RetinaNetHead's intermediate features, the outputs of its class and box towers before
#: the last convs: per level (N, C, H, W) (what CrossKD feeds through the other head)
HEAD_TOWER_SOURCES = {
    "cls_tower": Source("head.cls_subnet", calls="all"),
    "box_tower": Source("head.bbox_subnet", calls="all"),
}


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(DistillMixin, RetinaNet):
    """
    A RetinaNet student trained beside a frozen teacher (``cfg.KD.TEACHER``).

    Losses added to RetinaNet's ``loss_cls``/``loss_box_reg``, each switched in the config:

    * ``loss_kd_<feature loss>``: FPN feature imitation (``cfg.KD.FEATURE``: SSIM, L2, L1, CWD,
      MGD, PKD), weighted per position by the prediction difference when ``cfg.KD.PFI.ENABLED``;
    * ``loss_kd_rm``: Rank Mimicking (``cfg.KD.RM``), over the anchors the student's own
      matching made positive;
    * ``loss_kd_soft``: soft-label classification KD (``cfg.KD.SOFT_LABEL``);
    * ``loss_kd_crosskd_cls``, ``loss_kd_crosskd_box``: CrossKD (``cfg.KD.CROSSKD``, a
      :class:`CrossKDDistiller`): the student's head towers through the teacher's head;
    * ``loss_kd_box``: box distillation (``cfg.KD.BOX``, a :class:`DenseBoxDistiller`) on
      the anchors the student's own matching made positive.
    * ``loss_kd_lakd``: LAKD on the backbone's ResNet stages (``cfg.KD.LAKD``).

    RM, PFI, soft labels, CrossKD and box distillation need a RetinaNet teacher with the same
    classes, anchors
    per position and head levels.  Inference is the student alone.  In a LazyConfig, the
    student's ``L(RetinaNet)`` call with this class as its target and the distillation
    arguments added, e.g. RM + PFI::

        model._target_ = DistillRetinaNet
        model.teacher = L(build_teacher)(config="teacher.yaml", weights="teacher.pth")
        model.feature_distiller = L(FeatureDistiller)(levels=["p3", "p4", "p5", "p6", "p7"],
            student_channels=256, teacher_channels=256, loss=L(L2FeatureLoss)(), weight=1.0)
        model.prediction_distiller = L(DensePredictionDistiller)(num_classes="${..num_classes}",
            rm_loss=L(RankMimickingLoss)(), rm_weight=4.0)
        model.pfi = True
    """

    #: the vanilla meta-architecture the student is, once exported
    student_meta_architecture = "RetinaNet"

    @configurable
    def __init__(
        self,
        *,
        teacher,
        feature_distiller=None,
        channel_stats=None,
        extra_teachers=(),
        multi_teacher=None,
        inherit_prefixes=(),
        prediction_distiller: Optional[DensePredictionDistiller] = None,
        pfi: bool = False,
        crosskd: Optional[CrossKDDistiller] = None,
        box_distiller: Optional[DenseBoxDistiller] = None,
        local_attention=None,
        **kwargs
    ):
        """
        Args:
            teacher, feature_distiller, channel_stats, extra_teachers, multi_teacher,
                inherit_prefixes: see :class:`DistillMixin`.
            prediction_distiller: Rank Mimicking and soft labels, or None (or both weights 0).
            pfi: weight feature imitation per position by the prediction difference.
            crosskd: CrossKD, or None.
            box_distiller: box distillation, or None (or a weight of 0).
            local_attention: LAKD on the backbone's ResNet stages (a
                :class:`LocalAttentionDistiller`), or None.
            kwargs: RetinaNet's arguments.
        """
        super().__init__(**kwargs)
        self._init_distillation(
            teacher,
            feature_distiller,
            channel_stats,
            extra_teachers,
            multi_teacher,
            inherit_prefixes,
            self.num_classes,
            local_attention,
        )
        if prediction_distiller is not None:
            if not prediction_distiller.enabled:
                prediction_distiller = None  # weights of 0 switch it off, as in a yacs config
            elif prediction_distiller.num_classes != self.num_classes:
                raise ValueError(
                    "prediction_distiller has num_classes={} but the student {}: "
                    'give it the student\'s (num_classes="${{..num_classes}}" in '
                    "a LazyConfig)".format(prediction_distiller.num_classes, self.num_classes)
                )
        self.kd_prediction = prediction_distiller
        self.pfi = pfi
        self.kd_crosskd = crosskd
        if box_distiller is not None and not box_distiller.weight > 0:
            box_distiller = None  # a weight of 0 switches it off, as KD.BOX.WEIGHT 0 does
        self.kd_box = box_distiller
        if self.uses_teacher_predictions:
            self._check_teacher_head()
        if pfi and feature_distiller is None:
            raise ValueError(
                "KD.PFI.ENABLED (pfi) weights the feature imitation loss, but "
                "KD.FEATURE.ENABLED is False (no feature_distiller); set it True, "
                "with KD.FEATURE.LOSS 'L2FeatureLoss' (as in the paper) or "
                "'SSIMFeatureLoss'"
            )
        sources = dict(DENSE_SOURCES, **self.local_attention_sources())
        if crosskd is not None:
            sources.update(self._crosskd_sources(crosskd.head_index))
        self._init_recorders(
            sources,
            match_anchors=any(
                d is not None for d in (prediction_distiller, crosskd, box_distiller)
            ),
        )

    def _crosskd_sources(self, index: int) -> Dict[str, Source]:
        """Where the student's towers are cut for CrossKD: per level (N, C, H, W) records
        (none at index 0, where the cut is the FPN feature)."""
        if index == 0:
            return {}
        return {
            "crosskd_"
            + name: Source(
                "head.{}.{}".format(name, tower_split(getattr(self.head, name), index) - 1),
                calls="all",
            )
            for name in ("cls_subnet", "bbox_subnet")
        }

    @classmethod
    def from_config(cls, cfg):
        return cls.distill_kwargs(cfg, super().from_config(cfg))

    @classmethod
    def distill_kwargs(cls, cfg, student_kwargs: Dict) -> Dict:
        """``student_kwargs`` (RetinaNet's arguments) with the distillation ones, from
        ``cfg.KD``."""
        ret = cls._distill_from_config(cfg, student_kwargs)
        # KD.RM and KD.SOFT_LABEL; None when both are off
        prediction = DensePredictionDistiller(cfg, student_kwargs["num_classes"])
        ret.update(
            prediction_distiller=prediction if prediction.enabled else None, pfi=cfg.KD.PFI.ENABLED
        )
        if cfg.KD.CROSSKD.ENABLED:
            ret["teacher"].require_crosskd_head()
            index = cfg.KD.CROSSKD.HEAD_INDEX
            ret["crosskd"] = CrossKDDistiller(
                cfg,
                cls._tower_width(student_kwargs["head"], index),
                cls._tower_width(ret["teacher"].model.head, index),
            )
        if cfg.KD.BOX.ENABLED and cfg.KD.BOX.WEIGHT > 0:
            ret["box_distiller"] = DenseBoxDistiller(cfg)
        return ret

    @staticmethod
    def _tower_width(head, index: int) -> int:
        """A RetinaNetHead's class-tower width at the CrossKD cut ``index``."""
        in_channels = head.cls_subnet[0].in_channels if len(head.cls_subnet) else None
        if in_channels is None:  # no convs: the predictor reads the FPN feature
            in_channels = head.cls_score.in_channels
        return tower_channels(head.cls_subnet, index, in_channels)

    @property
    def uses_teacher_predictions(self) -> bool:
        return (
            self.kd_prediction is not None
            or self.pfi
            or self.kd_crosskd is not None
            or self.kd_box is not None
        )

    def _check_teacher_head(self):
        t = self.teacher
        t.require_dense_head()
        if self.kd_crosskd is not None:
            t.require_crosskd_head()
        if t.classes_by_name:  # another label space and anchor order (torchvision): mapped
            t.map_dense_student(self)
            return
        tm = t.model
        problems = []
        if tm.num_classes != self.num_classes:
            problems.append(
                "classes: teacher {}, student {}".format(tm.num_classes, self.num_classes)
            )
        ta, sa = tm.anchor_generator.num_anchors, self.anchor_generator.num_anchors
        if list(ta) != list(sa):
            problems.append(
                "anchors per position: teacher {}, student {}".format(list(ta), list(sa))
            )
        t_strides = [tm.backbone.output_shape()[f].stride for f in tm.head_in_features]
        s_strides = [self.backbone.output_shape()[f].stride for f in self.head_in_features]
        if t_strides != s_strides:
            problems.append(
                "head level strides: teacher {}, student {}".format(t_strides, s_strides)
            )
        if self.kd_crosskd is not None:
            index = self.kd_crosskd.head_index
            for who, head in (("student", self.head), ("teacher", tm.head)):
                for name in ("cls_subnet", "bbox_subnet"):
                    try:
                        tower_split(getattr(head, name), index)
                    except ValueError as e:
                        problems.append("{}'s {}: {}".format(who, name, e))
            if not problems:
                widths = (self._tower_width(self.head, index), self._tower_width(tm.head, index))
                given = (self.kd_crosskd.student_channels, self.kd_crosskd.teacher_channels)
                if widths != given:
                    problems.append(
                        "CrossKD tower widths at HEAD_INDEX {}: student {}, teacher {}, but "
                        "crosskd was given student_channels={}, teacher_channels={}".format(
                            index, *widths, *given
                        )
                    )
        if problems:
            raise ValueError(
                "RM/PFI/soft-label/CrossKD/box distillation compares per-anchor predictions, so "
                "teacher and "
                "student heads must match; they differ in "
                + "; ".join(problems)
                + ". Use the same NUM_CLASSES, ANCHOR_GENERATOR and head levels in both configs"
            )

    def distillation_losses(
        self, batched_inputs: List[Dict], recorded: Dict
    ) -> Dict[str, torch.Tensor]:
        images = self.recorded_images(batched_inputs, recorded)
        all_teacher_features = self.teacher_features(batched_inputs, images)
        losses, position_weights = {}, None
        if self.uses_teacher_predictions:
            student_logits, student_deltas = recorded["head"]  # per level (N, A*K|A*4, H, W)
            crosskd = self.kd_crosskd
            teacher_out = self.teacher.dense_head_predictions(
                all_teacher_features[0], None if crosskd is None else crosskd.head_index
            )
            teacher_logits, teacher_deltas = teacher_out[:2]
            if self.pfi:
                position_weights = self.pfi_weights(student_logits, teacher_logits)
            if self._kd_matches is not None:
                matched, labels = self.recorded_matching(batched_inputs, student_logits)
                gt_classes = [x.gt_classes for x in self.gt_instances(batched_inputs)]
            if self.kd_prediction is not None:
                losses.update(
                    self.kd_prediction(student_logits, teacher_logits, matched, labels, gt_classes)
                )
            if crosskd is not None:
                towers = self._crosskd_towers(recorded, crosskd.head_index)
                losses.update(crosskd(towers, teacher_out, self.teacher, labels))
            if self.kd_box is not None:
                losses.update(
                    self.kd_box(
                        student_deltas,
                        teacher_logits,
                        teacher_deltas,
                        self.anchor_generator(student_logits),
                        self.teacher.dense_anchors(teacher_logits),
                        matched,
                        labels,
                        gt_classes,
                        self.box2box_transform,
                        self.teacher.dense_box_transform,
                    )
                )
        losses.update(
            self.feature_losses(recorded["features"], all_teacher_features, position_weights)
        )
        losses.update(self.local_attention_losses(recorded))
        return losses

    def _crosskd_towers(self, recorded: Dict, index: int):
        """The student's (class tower, box tower) at the CrossKD cut, per level (N, C, H, W)."""
        if index == 0:
            features = [recorded["features"][f] for f in self.head_in_features]
            return features, features
        return recorded["crosskd_cls_subnet"], recorded["crosskd_bbox_subnet"]

    def pfi_weights(self, student_logits, teacher_logits) -> List[Optional[torch.Tensor]]:
        """PFI weights for the feature distiller's levels (uniform on levels the head does not
        see)."""
        by_level = dict(
            zip(
                self.head_in_features, prediction_difference_weights(student_logits, teacher_logits)
            )
        )
        return [by_level.get(name) for name in self.kd_feature.levels]

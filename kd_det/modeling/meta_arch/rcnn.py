"""Distillation into a two-stage (GeneralizedRCNN) student."""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN

from ..distillers import RoIBoxDistiller, RoISoftLabelDistiller
from ..recorders import Source
from .base import STUDENT_INPUT_SOURCES, DistillMixin

__all__ = ["DistillGeneralizedRCNN", "ROI_SOURCES", "ROI_BOX_SOURCES"]

#: what a soft-label student's RoI box head saw and said in its training pass: the boxes
#: given to its box pooler (per image, the sampled RoIs) and its box predictor's class
#: logits (R, K + 1).  Hooks, so Detectron2's RoI heads run unchanged (mask/keypoint heads,
#: ``train_on_pred_boxes``) and the box head runs once.
ROI_SOURCES = {
    "roi_boxes": Source("roi_heads.box_pooler", "input", 1),
    "roi_logits": Source("roi_heads.box_predictor", index=0),
}
#: what box distillation reads of the same pass: the sampled RoIs given to the box pooler, the
#: box predictor's deltas (R, 4 K) (or (R, 4), class-agnostic), and the sampled proposals as
#: the RoI heads return them in training (per image, Instances with ``gt_classes``)
ROI_BOX_SOURCES = {
    "roi_boxes": Source("roi_heads.box_pooler", "input", 1),
    "roi_deltas": Source("roi_heads.box_predictor", index=1),
    "roi_proposals": Source("roi_heads", index=0),
}


@META_ARCH_REGISTRY.register()
class DistillGeneralizedRCNN(DistillMixin, GeneralizedRCNN):
    """
    A GeneralizedRCNN student trained beside a frozen teacher (``cfg.KD.TEACHER``).

    Losses added to Detectron2's, each switched in the config:

    * ``loss_kd_<feature loss>``: FPN feature imitation (``cfg.KD.FEATURE``);
    * ``loss_kd_soft``: soft-label classification KD on the RoI head
      (``cfg.KD.SOFT_LABEL``, a :class:`RoISoftLabelDistiller`): the teacher's box head
      classifies the student's sampled RoIs on the teacher's features;
    * ``loss_kd_box``: box distillation on the RoI head (``cfg.KD.BOX``, a
      :class:`RoIBoxDistiller`): the teacher's boxes for the student's foreground sampled
      RoIs are regression targets, weighted by the teacher's ground-truth class probability.
    * ``loss_kd_lakd``: LAKD on the backbone's ResNet stages (``cfg.KD.LAKD``).

    Inference is the student alone.  In a LazyConfig, the student's ``L(GeneralizedRCNN)``
    call with this class as its target and the distillation arguments added::

        model._target_ = DistillGeneralizedRCNN
        model.teacher = L(build_teacher)(config="teacher.yaml", weights="teacher.pth",
            expected_classes=L(thing_classes)(names="${dataloader.train.dataset.names}"))
        model.feature_distiller = L(FeatureDistiller)(levels=["p2", "p3", "p4", "p5", "p6"],
            student_channels=64, teacher_channels=256, loss=L(SSIMFeatureLoss)(), weight=2.0)
    """

    #: the vanilla meta-architecture the student is, once exported
    student_meta_architecture = "GeneralizedRCNN"

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
        roi_soft_label: Optional[RoISoftLabelDistiller] = None,
        roi_box: Optional[RoIBoxDistiller] = None,
        local_attention=None,
        **kwargs
    ):
        """
        Args:
            teacher, feature_distiller, channel_stats, extra_teachers, multi_teacher,
                inherit_prefixes: see :class:`DistillMixin`.
            roi_soft_label: RoI soft-label KD, or None (or a weight of 0).
            roi_box: RoI box distillation, or None (or a weight of 0).
            local_attention: LAKD on the backbone's ResNet stages (a
                :class:`LocalAttentionDistiller`), or None.
            kwargs: GeneralizedRCNN's arguments.
        """
        super().__init__(**kwargs)
        self._init_distillation(
            teacher,
            feature_distiller,
            channel_stats,
            extra_teachers,
            multi_teacher,
            inherit_prefixes,
            self.roi_heads.num_classes,
            local_attention,
        )
        if roi_soft_label is not None and not roi_soft_label.weight > 0:
            roi_soft_label = None  # a weight of 0 switches it off, as KD.SOFT_LABEL.WEIGHT 0 does
        self.kd_roi_soft_label = roi_soft_label
        sources = dict(STUDENT_INPUT_SOURCES, **self.local_attention_sources())
        if roi_soft_label is not None:
            teacher.require_roi_head()
            RoISoftLabelDistiller.check_student(self.roi_heads)
            sources.update(ROI_SOURCES)
        if roi_box is not None and not roi_box.weight > 0:
            roi_box = None
        self.kd_roi_box = roi_box
        if roi_box is not None:
            teacher.require_roi_head()
            RoIBoxDistiller.check_student(self.roi_heads)
            sources.update(ROI_BOX_SOURCES)
        self._init_recorders(sources)

    @classmethod
    def from_config(cls, cfg):
        return cls.distill_kwargs(cfg, super().from_config(cfg))

    @classmethod
    def distill_kwargs(cls, cfg, student_kwargs: Dict) -> Dict:
        """``student_kwargs`` (GeneralizedRCNN's) with the distillation ones, from ``cfg.KD``."""
        kd = cfg.KD
        one_stage = [
            name
            for name, on in (
                ("KD.RM", kd.RM.ENABLED),
                ("KD.PFI", kd.PFI.ENABLED),
                ("KD.CROSSKD", kd.CROSSKD.ENABLED),
            )
            if on
        ]
        if one_stage:
            raise ValueError(
                "{} distil per-anchor predictions of one-stage detectors, but the "
                "student is a DistillGeneralizedRCNN; use a RetinaNet student "
                "(DistillRetinaNet) or disable them".format(" and ".join(one_stage))
            )
        ret = cls._distill_from_config(cfg, student_kwargs)
        soft = kd.SOFT_LABEL.ENABLED and kd.SOFT_LABEL.WEIGHT > 0
        ret["roi_soft_label"] = RoISoftLabelDistiller(cfg) if soft else None
        box = kd.BOX.ENABLED and kd.BOX.WEIGHT > 0
        ret["roi_box"] = RoIBoxDistiller(cfg) if box else None
        return ret

    def distillation_losses(
        self, batched_inputs: List[Dict], recorded: Dict
    ) -> Dict[str, torch.Tensor]:
        images = self.recorded_images(batched_inputs, recorded)
        teacher_features = self.teacher_features(batched_inputs, images)
        losses = self.feature_losses(recorded["features"], teacher_features)
        if self.kd_roi_soft_label is not None:
            losses.update(
                self.kd_roi_soft_label(
                    recorded["roi_logits"], recorded["roi_boxes"], self.teacher, teacher_features[0]
                )
            )
        if self.kd_roi_box is not None:
            gt_classes = torch.cat([p.gt_classes for p in recorded["roi_proposals"]])
            losses.update(
                self.kd_roi_box(
                    recorded["roi_deltas"],
                    recorded["roi_boxes"],
                    gt_classes,
                    self.teacher,
                    teacher_features[0],
                    self.roi_heads.box_predictor.box2box_transform,
                )
            )
        losses.update(self.local_attention_losses(recorded))
        return losses

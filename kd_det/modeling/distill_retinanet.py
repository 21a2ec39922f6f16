"""Distillation into a one-stage (RetinaNet) student."""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.layers import cat
from detectron2.modeling import META_ARCH_REGISTRY, RetinaNet
from detectron2.modeling.meta_arch.retinanet import permute_to_N_HWA_K
from detectron2.structures import Boxes, Instances, pairwise_iou

from ..losses.prediction import prediction_difference_weights, rank_mimicking_loss, soft_label_kd_loss
from .distill_base import DistillMixin

__all__ = ["DistillRetinaNet", "match_anchors"]


@torch.no_grad()
def match_anchors(anchors: List[Boxes], gt_instances: List[Instances], matcher) -> torch.Tensor:
    """
    The ground-truth object each anchor is a positive for, by ``matcher`` (the
    student's RetinaNet anchor matcher).

    Args:
        anchors: per level Boxes (R_l, 4), the same for every image.
        gt_instances: N Instances with ``gt_boxes``.
    Returns:
        (N, R) long: object index within its image, -1 for negative or ignored anchors.
    """
    anchors = Boxes.cat(anchors)
    out = []
    for gt in gt_instances:
        if len(gt) == 0:
            out.append(torch.full((len(anchors),), -1, dtype=torch.long, device=anchors.device))
            continue
        matched, labels = matcher(pairwise_iou(gt.gt_boxes, anchors))
        out.append(torch.where(labels == 1, matched, torch.full_like(matched, -1)))
    return torch.stack(out)


@META_ARCH_REGISTRY.register()
class DistillRetinaNet(DistillMixin, RetinaNet):
    """
    A RetinaNet student trained beside a frozen teacher (``cfg.KD.TEACHER``).

    Losses added to RetinaNet's ``loss_cls``/``loss_box_reg``, each switched in the config:

    * ``loss_kd_<feature loss>``: FPN feature imitation (``cfg.KD.FEATURE``: SSIM, L2, L1),
      weighted per position by the prediction difference when ``cfg.KD.PFI.ENABLED``;
    * ``loss_kd_rm``: Rank Mimicking (``cfg.KD.RM``);
    * ``loss_kd_soft``: soft-label classification KD (``cfg.KD.SOFT_LABEL``).

    RM, PFI and soft labels need a RetinaNet teacher with the same classes, anchors
    per position and head levels.  Inference is the student alone.
    """

    #: the vanilla meta-architecture the student is, once exported
    student_meta_architecture = "RetinaNet"

    @configurable
    def __init__(
        self,
        *,
        teacher,
        feature_distiller,
        channel_stats=None,
        extra_teachers=(),
        multi_teacher=None,
        inherit_prefixes=(),
        rm_weight: float = 0.0,
        rm_temperature: float = 1.0,
        pfi: bool = False,
        soft_label_weight: float = 0.0,
        soft_label_temperature: float = 1.0,
        soft_label_mode: str = "kl",
        **kwargs
    ):
        """
        Args:
            teacher, feature_distiller, channel_stats, extra_teachers, multi_teacher,
                inherit_prefixes: see :class:`DistillMixin`.
            rm_weight: weight of Rank Mimicking; 0 disables it.
            rm_temperature: its softmax temperature.
            pfi: weight feature imitation per position by the prediction difference.
            soft_label_weight, soft_label_temperature, soft_label_mode: soft-label KD
                (weight 0 disables it); see :func:`soft_label_kd_loss`.
            kwargs: RetinaNet's arguments.
        """
        super().__init__(**kwargs)
        self._init_distillation(teacher, feature_distiller, channel_stats, extra_teachers, multi_teacher,
                                inherit_prefixes)
        self.rm_weight = rm_weight
        self.rm_temperature = rm_temperature
        self.pfi = pfi
        self._init_soft_label(soft_label_weight, soft_label_temperature, soft_label_mode)
        if self.uses_teacher_predictions:
            self._check_teacher_head()
        if pfi and feature_distiller is None:
            raise ValueError("KD.PFI.ENABLED weights the feature imitation loss, but "
                             "KD.FEATURE.ENABLED is False; set it True, with KD.FEATURE.LOSS "
                             "'L2FeatureLoss' (as in the paper) or 'SSIMFeatureLoss'")

    @classmethod
    def from_config(cls, cfg):
        return cls.distill_kwargs(cfg, super().from_config(cfg))

    @classmethod
    def distill_kwargs(cls, cfg, student_kwargs: Dict) -> Dict:
        """``student_kwargs`` (RetinaNet's arguments) with the distillation ones, from ``cfg.KD``."""
        ret = cls._distill_from_config(cfg, student_kwargs)
        kd = cfg.KD
        ret.update(
            rm_weight=kd.RM.WEIGHT if kd.RM.ENABLED else 0.0,
            rm_temperature=kd.RM.TEMPERATURE,
            pfi=kd.PFI.ENABLED,
            **cls._soft_label_from_config(cfg),
        )
        return ret

    @property
    def uses_teacher_predictions(self) -> bool:
        return self.rm_weight > 0 or self.pfi or self.soft_label_weight > 0

    def _check_teacher_head(self):
        t = self.teacher
        t.require_dense_head()
        tm = t.model
        problems = []
        if tm.num_classes != self.num_classes:
            problems.append("classes: teacher {}, student {}".format(tm.num_classes, self.num_classes))
        ta, sa = tm.anchor_generator.num_anchors, self.anchor_generator.num_anchors
        if list(ta) != list(sa):
            problems.append("anchors per position: teacher {}, student {}".format(list(ta), list(sa)))
        t_strides = [tm.backbone.output_shape()[f].stride for f in tm.head_in_features]
        s_strides = [self.backbone.output_shape()[f].stride for f in self.head_in_features]
        if t_strides != s_strides:
            problems.append("head level strides: teacher {}, student {}".format(t_strides, s_strides))
        if problems:
            raise ValueError("RM/PFI/soft-label distillation compares per-anchor predictions, so teacher and student "
                             "heads must match; they differ in " + "; ".join(problems) +
                             ". Use the same NUM_CLASSES, ANCHOR_GENERATOR and head levels in both configs")

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        if not self.training:
            return super().forward(batched_inputs)
        images = self.preprocess_image(batched_inputs)
        gt_instances = [x["instances"].to(self.device) for x in batched_inputs]
        features = self.backbone(images.tensor)
        head_features = [features[f] for f in self.head_in_features]
        predictions = self.head(head_features)
        losses = self.forward_training(images, head_features, predictions, gt_instances)

        all_teacher_features = self.teacher_features(batched_inputs, images)
        position_weights = None
        if self.uses_teacher_predictions:
            student_logits = predictions[0]  # per level (N, A*K, H, W)
            teacher_logits = self.teacher.dense_class_logits(all_teacher_features[0])
            if self.pfi:
                position_weights = self.pfi_weights(student_logits, teacher_logits)
            losses.update(self.prediction_losses(head_features, student_logits, teacher_logits, gt_instances))
        losses.update(self.feature_losses(features, all_teacher_features, position_weights))
        return losses

    def pfi_weights(self, student_logits, teacher_logits) -> List[Optional[torch.Tensor]]:
        """PFI weights for the feature distiller's levels (uniform on levels the head does not see)."""
        by_level = dict(zip(self.head_in_features, prediction_difference_weights(student_logits, teacher_logits)))
        return [by_level.get(name) for name in self.kd_feature.levels]

    def prediction_losses(self, head_features, student_logits, teacher_logits, gt_instances) -> Dict[str, torch.Tensor]:
        """``loss_kd_rm`` and ``loss_kd_soft`` from per-level (N, A*K, H, W) class logits."""
        s = cat([permute_to_N_HWA_K(x, self.num_classes) for x in student_logits], dim=1)  # (N, R, K)
        t = cat([permute_to_N_HWA_K(x, self.num_classes) for x in teacher_logits], dim=1)
        losses = {}
        if self.rm_weight > 0:
            matched = match_anchors(self.anchor_generator(head_features), gt_instances, self.anchor_matcher)
            rm = rank_mimicking_loss(s, t, matched, [g.gt_classes for g in gt_instances], self.rm_temperature)
            losses["loss_kd_rm"] = self.rm_weight * rm
        if self.soft_label_weight > 0:
            valid = self._not_ignored(head_features, gt_instances)
            soft = soft_label_kd_loss(s, t, valid, self.soft_label_temperature, self.soft_label_mode)
            losses["loss_kd_soft"] = self.soft_label_weight * soft
        return losses

    @torch.no_grad()
    def _not_ignored(self, head_features, gt_instances) -> torch.Tensor:
        """(N, R) bool: anchors the matcher does not ignore (labels >= 0)."""
        gt_labels, _ = self.label_anchors(self.anchor_generator(head_features), gt_instances)
        return torch.stack(gt_labels) >= 0

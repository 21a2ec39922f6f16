"""Teacher-free self-distillation (FRSKD) for RetinaNet and GeneralizedRCNN students.

The student's pyramid is refined by a :class:`BiFPNSelfTeacher`; the refined maps
get their own detection head (trained on the ground truth, losses ``loss_self_*``)
and are the target of the student's feature imitation (``KD.FEATURE``: attention
transfer as in the paper, or SSIM), which updates the student only.  A RetinaNet
student can also imitate the self-teacher head's class scores (``loss_kd_soft``).
Everything added lives under ``kd_*`` keys and is dropped at export.
"""

from typing import Dict, List, Optional

import torch
from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, GeneralizedRCNN, RetinaNet
from detectron2.modeling.meta_arch.retinanet import RetinaNetHead
from detectron2.modeling.proposal_generator import build_proposal_generator
from detectron2.modeling.roi_heads import build_roi_heads
from torch import nn

from ...losses import SoftLabelKDLoss
from ..distillers import DensePredictionDistiller, FeatureDistiller
from .base import STUDENT_INPUT_SOURCES, DistillForwardMixin
from .retinanet import DENSE_SOURCES
from .self_teacher import BiFPNSelfTeacher

__all__ = ["SelfDistillRetinaNet", "SelfDistillGeneralizedRCNN"]


def _check_head_input(name: str, head: Optional[nn.Module], width: int) -> None:
    """
    Raise unless a self-teacher head's first convolution (a RetinaNet head's or an RPN
    head's, which read the pyramid) takes the refined maps' ``width`` channels.
    """
    first = next((m for m in head.modules() if isinstance(m, nn.Conv2d)), None) if head else None
    if first is not None and first.in_channels != width:
        raise ValueError(
            "{} takes {} channels, but the self-teacher's refined maps have {} (its "
            "width; KD.SELF.WIDTH_MULTIPLIER): build the head for {} channels, or "
            "give the self-teacher width={}".format(
                name, first.in_channels, width, width, first.in_channels
            )
        )


class _SelfDistillMixin(DistillForwardMixin):
    """The self-teacher, its feature target and the shared loss bookkeeping."""

    def _init_self_distillation(
        self,
        self_teacher: BiFPNSelfTeacher,
        feature_distiller: FeatureDistiller,
        head_weight: float,
        detach_input: bool,
        head_features: List[str],
        heads: Dict[str, nn.Module],
    ):
        """
        Args:
            head_features: the levels the student's (and the self-teacher's) heads read.
            heads: the self-teacher's detection heads by argument name (their input
                channels are checked against the refined maps' width).
        """
        if feature_distiller is None:
            raise ValueError(
                "self-distillation imitates the self-teacher's refined features, "
                "but KD.FEATURE.ENABLED is False (no feature_distiller); set it "
                "True, with KD.FEATURE.LOSS 'AttentionTransferLoss' (as in FRSKD) or "
                "'SSIMFeatureLoss'"
            )
        shapes = self.backbone.output_shape()
        self_teacher.check_student(shapes)
        missing = [f for f in head_features if f not in self_teacher.in_features]
        if missing:
            raise ValueError(
                "the self-teacher's detection head needs levels {}, but "
                "KD.SELF.IN_FEATURES (self_teacher in_features) leaves out "
                "{}".format(list(head_features), missing)
            )
        feature_distiller.check_shapes(
            shapes, self_teacher.output_shape(), "feature_distiller", "self-teacher"
        )
        for name, head in heads.items():
            _check_head_input(name, head, self_teacher.width)
        self.kd_self_teacher = self_teacher
        self.kd_feature = feature_distiller
        self.self_head_weight = head_weight
        self.self_detach_input = detach_input

    @staticmethod
    def _self_from_config(cfg, ret: Dict, head_features: List[str]) -> Dict:
        """Add the self-teacher over ``head_features`` (or KD.SELF.IN_FEATURES, which must cover
        them)."""
        if not cfg.KD.FEATURE.ENABLED:
            raise ValueError(
                "self-distillation imitates the self-teacher's refined features, but "
                "KD.FEATURE.ENABLED is False; set it True, with KD.FEATURE.LOSS "
                "'AttentionTransferLoss' (as in FRSKD) or 'SSIMFeatureLoss'"
            )
        shapes = ret["backbone"].output_shape()
        self_teacher = BiFPNSelfTeacher(cfg, shapes, head_features)
        missing = [f for f in head_features if f not in self_teacher.in_features]
        if missing:
            raise ValueError(
                "the self-teacher's detection head needs levels {}, but KD.SELF.IN_FEATURES leaves "
                "out {}".format(list(head_features), missing)
            )
        feature = FeatureDistiller(cfg, shapes, self_teacher.output_shape())
        return dict(
            ret,
            self_teacher=self_teacher,
            feature_distiller=feature,
            self_head_weight=cfg.KD.SELF.HEAD_WEIGHT,
            self_detach_input=cfg.KD.SELF.DETACH_INPUT,
        )

    @staticmethod
    def _check_copied_heads(ret: Dict, levels: List[str]) -> None:
        """Copies of the student's own heads take its pyramid's channels: the refined maps must have
        as many."""
        shapes = ret["backbone"].output_shape()
        student = {shapes[f].channels for f in levels}
        width = ret["self_teacher"].width
        if student != {width}:
            raise ValueError(
                "the self-teacher's heads are copies of the student's, which take {} channels, but "
                "the refined maps have {} (KD.SELF.WIDTH_MULTIPLIER): keep the multiplier at 1.0, "
                "or write the student as a yacs config, whose self-teacher heads are built for the "
                "refined width".format(sorted(student), width)
            )

    def refine(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The self-teacher's refined maps of the student's ``features``."""
        if self.self_detach_input:
            features = {k: v.detach() for k, v in features.items()}
        return self.kd_self_teacher(features)

    def self_losses(self, head_losses: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """The self-teacher head's ground-truth losses, renamed ``loss_self_*`` and weighted."""
        return {
            "loss_self_" + k[len("loss_") :]: self.self_head_weight * v
            for k, v in head_losses.items()
        }


@META_ARCH_REGISTRY.register()
class SelfDistillRetinaNet(_SelfDistillMixin, RetinaNet):
    """
    A RetinaNet that distills from its own refined pyramid (FRSKD); no teacher checkpoint.

    Training losses: RetinaNet's ``loss_cls``/``loss_box_reg``; the self-teacher head's
    ``loss_self_cls``/``loss_self_box_reg``; ``loss_kd_<feature loss>`` (student features
    -> refined features, refined treated as constants); and, with
    ``KD.SELF.SOFT_LABEL.ENABLED``, ``loss_kd_soft`` (student class scores -> the
    self-teacher head's).  Inference is the plain RetinaNet.
    """

    student_meta_architecture = "RetinaNet"

    @configurable
    def __init__(
        self,
        *,
        self_teacher,
        feature_distiller,
        self_head: nn.Module,
        self_head_weight: float = 1.0,
        self_detach_input: bool = False,
        prediction_distiller: Optional[DensePredictionDistiller] = None,
        **kwargs
    ):
        """
        Args:
            self_teacher: the :class:`BiFPNSelfTeacher` over the student's head levels.
            feature_distiller: student features -> refined features.
            self_head: a RetinaNetHead on the refined maps.
            self_head_weight: multiplies the self-teacher head's losses.
            self_detach_input: stop the self-teacher's losses from reaching the student backbone.
            prediction_distiller: student scores -> self-teacher scores (soft labels, binary
                KL), or None.
            kwargs: RetinaNet's arguments.
        """
        super().__init__(**kwargs)
        self._init_self_distillation(
            self_teacher,
            feature_distiller,
            self_head_weight,
            self_detach_input,
            list(self.head_in_features),
            {"self_head": self_head},
        )
        self.kd_self_head = self_head
        self.kd_prediction = prediction_distiller
        self._init_recorders(DENSE_SOURCES, match_anchors=prediction_distiller is not None)

    @classmethod
    def from_config(cls, cfg):
        return cls.self_distill_kwargs(cfg, super().from_config(cfg))

    @classmethod
    def self_distill_kwargs(
        cls, cfg, student_kwargs: Dict, self_head: Optional[nn.Module] = None
    ) -> Dict:
        """
        The constructor's arguments: RetinaNet's built ``student_kwargs`` plus the
        self-teacher, its feature target and its head, from ``cfg.KD``.

        Args:
            self_head: the self-teacher's head, built elsewhere (a LazyConfig student's: a
                copy of its own head); None builds one from ``cfg.MODEL.RETINANET``.
        """
        levels = list(student_kwargs["head_in_features"])
        ret = cls._self_from_config(cfg, dict(student_kwargs), levels)
        refined = ret["self_teacher"].output_shape()
        if self_head is None:
            self_head = RetinaNetHead(cfg, [refined[f] for f in levels])
        else:
            cls._check_copied_heads(ret, levels)
        ret["self_head"] = self_head
        soft = cfg.KD.SELF.SOFT_LABEL
        weight, distiller = (soft.WEIGHT if soft.ENABLED else 0.0), None
        if weight > 0:
            loss = SoftLabelKDLoss(temperature=soft.TEMPERATURE, mode="kl")
            distiller = DensePredictionDistiller(
                num_classes=student_kwargs["num_classes"],
                soft_label_loss=loss,
                soft_label_weight=weight,
            )
        ret["prediction_distiller"] = distiller
        return ret

    def distillation_losses(
        self, batched_inputs: List[Dict], recorded: Dict
    ) -> Dict[str, torch.Tensor]:
        features, predictions = recorded["features"], recorded["head"]
        gt_instances = self.gt_instances(batched_inputs)
        refined = self.refine(features)
        refined_head = [refined[f] for f in self.head_in_features]
        self_predictions = self.kd_self_head(refined_head)
        # RetinaNet keeps an EMA of the positive-anchor count; the self-head's pass must not advance
        # it twice
        normalizer = getattr(self, "loss_normalizer", None)
        images = self.recorded_images(batched_inputs, recorded)
        with self.recorders_paused():  # the recorders keep the student's pass (and its matching)
            head_losses = self.forward_training(
                images, refined_head, self_predictions, gt_instances
            )
        losses = self.self_losses(head_losses)
        if normalizer is not None:
            self.loss_normalizer = normalizer
        losses.update(self.kd_feature(features, refined))
        if self.kd_prediction is not None:
            matched, labels = self.recorded_matching(batched_inputs, predictions[0])
            losses.update(
                self.kd_prediction(
                    predictions[0],
                    self_predictions[0],
                    matched,
                    labels,
                    [x.gt_classes for x in gt_instances],
                )
            )
        return losses


@META_ARCH_REGISTRY.register()
class SelfDistillGeneralizedRCNN(_SelfDistillMixin, GeneralizedRCNN):
    """
    A two-stage detector that distills from its own refined pyramid (FRSKD).

    The self-teacher's detection head is a second RPN and ROI heads (built from the
    same config) on the refined maps; their losses are ``loss_self_*``.  The student's
    pyramid imitates the refined one (``loss_kd_<feature loss>``).  Inference is the
    plain GeneralizedRCNN.  In a LazyConfig (see
    ``configs/synthetic/distill/self_frskd_faster_rcnn_R18_lazy.py``)::

        model._target_ = SelfDistillGeneralizedRCNN
        model.self_teacher = L(BiFPNSelfTeacher)(in_features=["p2", "p3", "p4", "p5", "p6"],
                                                 input_shapes=64, width=64)
        model.feature_distiller = L(FeatureDistiller)(levels=[...], student_channels=64,
            teacher_channels=64, loss=L(AttentionTransferLoss)(), weight=1.0)
        model.self_proposal_generator = copy.deepcopy(model.proposal_generator)
        model.self_roi_heads = copy.deepcopy(model.roi_heads)
    """

    student_meta_architecture = "GeneralizedRCNN"

    @configurable
    def __init__(
        self,
        *,
        self_teacher,
        feature_distiller,
        self_proposal_generator: nn.Module,
        self_roi_heads: nn.Module,
        self_head_weight: float = 1.0,
        self_detach_input: bool = False,
        **kwargs
    ):
        """
        Args:
            self_teacher, feature_distiller, self_head_weight, self_detach_input: see
                :class:`SelfDistillRetinaNet`.
            self_proposal_generator, self_roi_heads: the self-teacher's detection head.
            kwargs: GeneralizedRCNN's arguments.
        """
        super().__init__(**kwargs)
        self._init_self_distillation(
            self_teacher,
            feature_distiller,
            self_head_weight,
            self_detach_input,
            self._head_levels(
                self.backbone.output_shape(), self.proposal_generator, self.roi_heads
            ),
            {"self_proposal_generator": self_proposal_generator},
        )
        self.kd_self_proposal_generator = self_proposal_generator
        self.kd_self_roi_heads = self_roi_heads
        self._init_recorders(STUDENT_INPUT_SOURCES)

    @classmethod
    def from_config(cls, cfg):
        return cls.self_distill_kwargs(cfg, super().from_config(cfg))

    @classmethod
    def self_distill_kwargs(
        cls,
        cfg,
        student_kwargs: Dict,
        self_proposal_generator: Optional[nn.Module] = None,
        self_roi_heads: Optional[nn.Module] = None,
    ) -> Dict:
        """
        The constructor's arguments: GeneralizedRCNN's built ``student_kwargs`` plus the
        self-teacher, its feature target and its RPN and ROI heads, from ``cfg.KD``.

        Args:
            self_proposal_generator, self_roi_heads: the self-teacher's heads, built
                elsewhere (a LazyConfig student's: copies of its own); None builds them from
                ``cfg.MODEL``.
        """
        shapes = student_kwargs["backbone"].output_shape()
        levels = cls._head_levels(
            shapes, student_kwargs["proposal_generator"], student_kwargs["roi_heads"]
        )
        ret = cls._self_from_config(cfg, dict(student_kwargs), levels)
        refined = ret["self_teacher"].output_shape()
        if (self_proposal_generator is None) != (self_roi_heads is None):
            raise ValueError(
                "give both self-teacher heads (self_proposal_generator, self_roi_heads) or neither"
            )
        if self_proposal_generator is None:
            self_proposal_generator, self_roi_heads = build_proposal_generator(
                cfg, refined
            ), build_roi_heads(cfg, refined)
        else:
            cls._check_copied_heads(ret, levels)
        ret["self_proposal_generator"] = self_proposal_generator
        ret["self_roi_heads"] = self_roi_heads
        return ret

    @staticmethod
    def _head_levels(shapes: Dict, proposal_generator, roi_heads) -> List[str]:
        """The levels the RPN and RoI heads read, fine to coarse (precomputed proposals: no RPN)."""
        levels = set(roi_heads.in_features)
        if proposal_generator is not None:
            levels |= set(proposal_generator.in_features)
        return sorted(levels, key=lambda f: shapes[f].stride)

    def distillation_losses(
        self, batched_inputs: List[Dict], recorded: Dict
    ) -> Dict[str, torch.Tensor]:
        features = recorded["features"]
        images = self.recorded_images(batched_inputs, recorded)
        gt_instances = self.gt_instances(batched_inputs)
        refined = self.refine(features)
        if self.kd_self_proposal_generator is not None:
            proposals, self_proposal_losses = self.kd_self_proposal_generator(
                images, refined, gt_instances
            )
        else:  # precomputed proposals, as GeneralizedRCNN takes them
            proposals = [x["proposals"].to(self.device) for x in batched_inputs]
            self_proposal_losses = {}
        _, self_detector_losses = self.kd_self_roi_heads(images, refined, proposals, gt_instances)
        losses = self.self_losses(dict(self_detector_losses, **self_proposal_losses))
        losses.update(self.kd_feature(features, refined))
        return losses

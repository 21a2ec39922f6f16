"""
What every distillation meta-architecture shares: Detectron2's own training forward plus
the distillation losses read from recorders, and (with a teacher) the teacher and feature
imitation.
"""

import contextlib
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from detectron2.structures import ImageList
from detectron2.utils.events import get_event_storage

from ...config.detector import detector_settings
from ..distillers import (
    ChannelStatsDistiller,
    FeatureDistiller,
    LocalAttentionDistiller,
    MultiTeacherDistiller,
)
from ..distillers.local_attention import backbone_stage
from ..inherit import inherit_teacher_weights
from ..recorders import AnchorMatchRecorder, ModuleOutputRecorder, Source
from ..teacher import FrozenTeacher, build_teachers, check_num_classes

__all__ = ["KDStudentMixin", "DistillForwardMixin", "DistillMixin", "STUDENT_INPUT_SOURCES"]

#: what every student records: the normalised padded batch its backbone saw (N, 3, H, W),
#: and its backbone's outputs, name -> (N, C, H, W)
STUDENT_INPUT_SOURCES = {"images": Source("backbone", "input", 0), "features": Source("backbone")}


class KDStudentMixin:
    """
    What export needs of every kd_det meta-architecture: the vanilla one it becomes,
    and the rule that every ``state_dict`` key that is not the vanilla detector's
    (adapters, self-teachers, gates) starts with ``kd_``.
    """

    #: Detectron2 meta-architecture of the exported student (set by each subclass)
    student_meta_architecture: str = ""

    #: prefix of every state_dict key that belongs to distillation, not to the student
    kd_key_prefix = "kd_"


class DistillForwardMixin(KDStudentMixin):
    """
    The training forward of every kd_det meta-architecture: the vanilla Detectron2
    forward (``super().forward``: precomputed proposals, ``vis_period`` and all), then
    :meth:`distillation_losses` on what its recorders kept of that pass.  Inference is
    the vanilla forward alone.
    """

    def _init_recorders(
        self, sources: Mapping[str, Union[str, Source]], match_anchors: bool = False
    ) -> None:
        """
        Record ``sources`` (see :class:`ModuleOutputRecorder`) of the student's training
        passes and, with ``match_anchors``, its anchor matching (:class:`AnchorMatchRecorder`).
        """
        self._kd_recorder = ModuleOutputRecorder(self, sources, training_only=True)
        self._kd_matches = AnchorMatchRecorder(self) if match_anchors else None

    @contextlib.contextmanager
    def recorders_paused(self):
        """A context in which the student's recorders keep nothing (e.g. a second head's pass)."""
        with contextlib.ExitStack() as stack:
            for recorder in (self._kd_recorder, self._kd_matches):
                if recorder is not None:
                    stack.enter_context(recorder.paused())
            yield

    def forward(self, batched_inputs: List[Dict[str, torch.Tensor]]):
        """Detectron2's forward; in training its loss dict plus :meth:`distillation_losses`."""
        out = super().forward(batched_inputs)
        if not self.training:
            return out
        out.update(self.distillation_losses(batched_inputs, self._kd_recorder.pop()))
        return out

    def distillation_losses(
        self, batched_inputs: List[Dict], recorded: Dict
    ) -> Dict[str, torch.Tensor]:
        """The distillation terms of the loss dict, from the batch and the student's records."""
        raise NotImplementedError

    @staticmethod
    def recorded_images(batched_inputs: List[Dict], recorded: Dict) -> ImageList:
        """The student's batch as its backbone saw it: normalised and padded, (N, 3, H, W)."""
        return ImageList(recorded["images"], [tuple(x["image"].shape[-2:]) for x in batched_inputs])

    def gt_instances(self, batched_inputs: List[Dict]) -> List:
        """The batch's ground truth on the student's device, as Detectron2's forward takes it."""
        return [x["instances"].to(self.device) for x in batched_inputs]

    def recorded_matching(
        self,
        batched_inputs: List[Dict],
        class_logits: Sequence[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        A dense student's anchor matching of its training pass: (N, R) matched object
        indices and (N, R) matcher labels (see :meth:`AnchorMatchRecorder.pop`).

        Args:
            class_logits: the head's per-level (N, A*K, H, W) logits (they give R).
        """
        num_anchors = sum(x[0].numel() // self.num_classes for x in class_logits)
        num_objects = [len(x["instances"]) for x in batched_inputs]
        return self._kd_matches.pop(num_objects, num_anchors, self.device)


class DistillMixin(DistillForwardMixin):
    """
    Mixed into a Detectron2 meta-architecture (before it in the bases).

    Adds ``self.teacher`` (a :class:`FrozenTeacher`, not a submodule; the first of
    ``self.teachers``), ``self.kd_feature`` (a :class:`FeatureDistiller` or None),
    ``self.kd_stats`` (a :class:`ChannelStatsDistiller` or None) and, with several
    teachers, ``self.kd_multi_teacher`` (a :class:`MultiTeacherDistiller`, which then
    replaces ``kd_feature``), and ``self.kd_lakd`` (a :class:`LocalAttentionDistiller`
    or None: LAKD on the backbone's ResNet stages).  ``inherit_prefixes``
    (``KD.INHERIT.PREFIXES``) name the teacher weights the student starts from (see
    :func:`inherit_teacher_weights`).

    The constructor arguments (each meta-architecture's ``__init__``) are explicit, so a
    LazyConfig composes them with ``L(...)``; the shapes its distillers were given as
    plain numbers are checked here against the student's and the teachers' backbones.
    In a LazyConfig, list ``teacher`` and the distillers after the student's own
    arguments: ``instantiate`` builds arguments in order, and that order (student,
    teacher, distillers) is the yacs one, which sets the random initialisation.
    """

    def _init_distillation(
        self,
        teacher: FrozenTeacher,
        feature_distiller: Optional[FeatureDistiller],
        channel_stats: Optional[ChannelStatsDistiller] = None,
        extra_teachers: Sequence[FrozenTeacher] = (),
        multi_teacher: Optional[MultiTeacherDistiller] = None,
        inherit_prefixes: Sequence[str] = (),
        num_classes: int = 0,
        local_attention: Optional[LocalAttentionDistiller] = None,
    ):
        """
        Args:
            num_classes: the student's class count, which every teacher must have.
            local_attention: LAKD, or None.  Its stage inputs are recorded through
                :meth:`local_attention_sources` (add them to the student's recorder).
        """
        if not isinstance(teacher, FrozenTeacher):
            raise ValueError(
                "teacher must be a FrozenTeacher, e.g. built by "
                "L(kd_det.modeling.build_teacher)(config=..., weights=...); got "
                "{}".format(type(teacher).__name__)
            )
        self.teacher = teacher
        self.teachers = [teacher] + list(extra_teachers)
        self.kd_feature = feature_distiller
        self.kd_stats = channel_stats
        self.kd_multi_teacher = multi_teacher
        self._check_distillation(num_classes)
        self._init_local_attention(local_attention)
        # the student's initial weights; MODEL.WEIGHTS and --resume load over them
        inherit_teacher_weights(self, teacher.model, inherit_prefixes)

    def _check_distillation(self, num_classes: int) -> None:
        """The teachers and distillers fit together and fit the student's and teachers' shapes."""
        check_num_classes(self.teachers, num_classes)
        student_shapes = self.backbone.output_shape()
        if len(self.teachers) > 1 or self.kd_multi_teacher is not None:
            multi = self.kd_multi_teacher
            if multi is None or self.kd_feature is not None or self.kd_stats is not None:
                raise ValueError(
                    "several teachers (teacher and extra_teachers; "
                    "KD.MULTI_TEACHER) are combined for feature imitation only, by "
                    "multi_teacher=MultiTeacherDistiller(...) with one "
                    "FeatureDistiller per teacher; give it, and no feature_distiller "
                    "or channel_stats"
                )
            if len(multi.distillers) != len(self.teachers):
                raise ValueError(
                    "multi_teacher has {} feature distillers for {} teachers "
                    "(teacher and extra_teachers): give one per teacher, in "
                    "order".format(len(multi.distillers), len(self.teachers))
                )
            for k, (distiller, teacher) in enumerate(zip(multi.distillers, self.teachers)):
                distiller.check_shapes(
                    student_shapes, teacher.output_shape(), "multi_teacher.distillers[{}]".format(k)
                )
        if self.kd_feature is not None:
            self.kd_feature.check_shapes(student_shapes, self.teacher.output_shape())
        if self.kd_stats is not None:
            if self.teacher.input_scale != 1.0:
                raise ValueError(
                    "KD.CHANNEL_STATS runs the teacher's head on features of the student's "
                    "levels, which needs KD.TEACHER.INPUT_SCALE 1.0 (it is {:g})".format(
                        self.teacher.input_scale
                    )
                )
            self.kd_stats.check_shapes(student_shapes, self.teacher)

    def _init_local_attention(self, local_attention: Optional[LocalAttentionDistiller]) -> None:
        """Check LAKD against both backbones; record the teacher's stage outputs (hooks)."""
        self.kd_lakd = local_attention
        self._lakd_teacher = None
        if local_attention is None:
            return
        if len(self.teachers) > 1:
            raise ValueError(
                "LAKD (local_attention, KD.LAKD) distils from one teacher; drop "
                "extra_teachers (KD.MULTI_TEACHER) or LAKD"
            )
        if self.teacher.input_scale != 1.0 or not self.teacher.runs_in_detectron2:
            raise ValueError(
                "LAKD (KD.LAKD) compares ResNet stages of a Detectron2 teacher at the student's "
                "input size; the teacher is a {} at KD.TEACHER.INPUT_SCALE {:g}: disable "
                "KD.LAKD".format(self.teacher.meta_architecture, self.teacher.input_scale)
            )
        teacher_backbone = self.teacher.model.backbone
        local_attention.check_backbones(self.backbone, teacher_backbone)
        # on the teacher's backbone: each of its calls clears what the last one left
        self._lakd_teacher = ModuleOutputRecorder(
            teacher_backbone, local_attention.stage_output_sources(teacher_backbone)
        )

    def local_attention_sources(self) -> Dict[str, Source]:
        """What the student's recorder must keep for LAKD: each stage's input (or nothing)."""
        if self.kd_lakd is None:
            return {}
        return self.kd_lakd.stage_input_sources(self.backbone)

    def local_attention_losses(self, recorded: Dict) -> Dict[str, torch.Tensor]:
        """
        LAKD's ``loss_kd_lakd`` (nothing without LAKD), from the student's records and the
        teacher's stage outputs of this step's :meth:`teacher_features`; the iteration
        (which stages are on) is the Detectron2 event storage's.
        """
        if self.kd_lakd is None:
            return {}
        teacher_outputs = self._lakd_teacher.pop()
        missing = [s for s in self.kd_lakd.stages if s not in teacher_outputs]
        if missing:
            raise RuntimeError(
                "LAKD found no teacher output of stages {}: call teacher_features() on the "
                "batch first (its backbone pass records them)".format(missing)
            )
        stages = {s: backbone_stage(self.backbone, s) for s in self.kd_lakd.stages}
        inputs = {s: recorded["lakd_input_" + s] for s in self.kd_lakd.stages}
        return self.kd_lakd(stages, inputs, teacher_outputs, get_event_storage().iter)

    def _apply(self, fn, *args, **kwargs):
        # The teachers are not submodules (see FrozenTeacher), so nn.Module would leave them
        # where they are on .to()/.cuda()/.double(); they follow the student instead (a
        # LazyConfig model is built on the CPU and moved to train.device afterwards).
        ret = super()._apply(fn, *args, **kwargs)
        for teacher in getattr(self, "teachers", ()):
            teacher.model._apply(fn, *args, **kwargs)
        return ret

    @staticmethod
    def _distill_from_config(cfg, ret: Dict) -> Dict:
        """
        Add ``teacher``, ``extra_teachers``, ``feature_distiller``, ``channel_stats``,
        ``multi_teacher``, ``local_attention`` and ``inherit_prefixes`` to a vanilla
        ``from_config`` result.
        """
        teachers = build_teachers(cfg)
        check_num_classes(teachers, detector_settings(cfg).num_classes)
        teacher = teachers[0]
        ret = dict(ret, inherit_prefixes=list(cfg.KD.INHERIT.PREFIXES))
        feature = stats = multi = None
        student_shapes = ret["backbone"].output_shape()
        if len(teachers) > 1:
            kd = cfg.KD
            others = [
                name
                for name, on in (
                    ("KD.RM", kd.RM.ENABLED),
                    ("KD.PFI", kd.PFI.ENABLED),
                    ("KD.SOFT_LABEL", kd.SOFT_LABEL.ENABLED),
                    ("KD.CHANNEL_STATS", kd.CHANNEL_STATS.ENABLED),
                    ("KD.CROSSKD", kd.CROSSKD.ENABLED),
                    ("KD.BOX", kd.BOX.ENABLED),
                    ("KD.LAKD", kd.LAKD.ENABLED),
                )
                if on
            ]
            if others or not kd.FEATURE.ENABLED:
                raise ValueError(
                    "several teachers (KD.MULTI_TEACHER) are combined for feature "
                    "imitation only: set KD.FEATURE.ENABLED True{}, or use one "
                    "teacher".format(" and disable " + ", ".join(others) if others else "")
                )
            multi = MultiTeacherDistiller(cfg, student_shapes, [t.output_shape() for t in teachers])
            return dict(
                ret,
                teacher=teacher,
                extra_teachers=teachers[1:],
                feature_distiller=None,
                channel_stats=None,
                multi_teacher=multi,
            )
        if cfg.KD.FEATURE.ENABLED:
            feature = FeatureDistiller(cfg, student_shapes, teacher.output_shape())
        if cfg.KD.CHANNEL_STATS.ENABLED:
            stats = ChannelStatsDistiller(
                cfg, student_shapes, teacher.output_shape(), teacher.dense_head_levels
            )
        lakd = LocalAttentionDistiller(cfg) if cfg.KD.LAKD.ENABLED else None
        return dict(
            ret,
            teacher=teacher,
            feature_distiller=feature,
            channel_stats=stats,
            local_attention=lakd,
        )

    def teacher_images(
        self, batched_inputs: List[Dict], images: ImageList, teacher: FrozenTeacher = None
    ) -> ImageList:
        """A teacher's (default: the first's) view of the student's batch (shared when both
        normalise alike)."""
        teacher = teacher or self.teacher
        if teacher.takes_input_like(self.input_format, self.pixel_mean, self.pixel_std):
            return images
        return teacher.preprocess_image(batched_inputs, images, self.input_format)

    def teacher_features(
        self, batched_inputs: List[Dict], images: ImageList
    ) -> List[Dict[str, torch.Tensor]]:
        """Each teacher's backbone features of the batch: per teacher, name -> (N, C, H, W)."""
        return [
            t.backbone_features(self.teacher_images(batched_inputs, images, t))
            for t in self.teachers
        ]

    def feature_losses(
        self,
        student_features: Dict[str, torch.Tensor],
        teacher_features: List[Dict[str, torch.Tensor]],
        position_weights: Optional[List[torch.Tensor]] = None,
    ) -> Dict[str, torch.Tensor]:
        """
        Feature imitation (one teacher, or several through ``kd_multi_teacher``) and
        channel-statistics losses, each only if configured.

        Args:
            teacher_features: per teacher, as returned by :meth:`teacher_features`.
        """
        if self.kd_multi_teacher is not None:
            return self.kd_multi_teacher(student_features, teacher_features)
        losses = {}
        if self.kd_feature is not None:
            losses.update(self.kd_feature(student_features, teacher_features[0], position_weights))
        if self.kd_stats is not None:
            losses.update(self.kd_stats(student_features, teacher_features[0], self.teacher))
        return losses

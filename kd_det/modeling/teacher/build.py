"""
Building teachers: :func:`build_teacher` from explicit arguments (or a student's
``KD.TEACHER``), :func:`build_teachers` for every teacher a student's config names.
"""

import logging
from typing import List, Optional, Sequence

import torch
from detectron2.config import configurable

from ...config.detector import (
    build_detector,
    describe_config,
    detector_settings,
    load_detector_config,
    meta_architecture_of,
)
from ...data.classes import check_same_classes, registered_thing_classes
from .frozen import FrozenTeacher
from .kinds import register_teacher_kind, teacher_kind_builder
from .resolve import resolve_teacher_config
from .weights import load_teacher_weights

__all__ = ["build_teacher", "build_teachers", "check_num_classes", "build_detectron2_teacher"]

logger = logging.getLogger(__name__)


def _teacher_from_config(
    cfg,
    config: Optional[str] = None,
    weights: Optional[str] = None,
    weights_sha256: Optional[str] = None,
):
    """
    :func:`build_teacher`'s arguments from a student's config: ``KD.TEACHER`` (``config``,
    ``weights`` and ``weights_sha256`` replace its CONFIG, WEIGHTS and WEIGHTS_SHA256: one of
    several teachers), the
    student's device, and its class names (from ``DATASETS.TRAIN``) when
    ``KD.TEACHER.CHECK_CLASSES``.
    """
    teacher = cfg.KD.TEACHER
    student_classes = None
    if teacher.CHECK_CLASSES:
        student_classes = registered_thing_classes(cfg.DATASETS.TRAIN)
    return {
        "config": teacher.CONFIG if config is None else config,
        "weights": teacher.WEIGHTS if weights is None else weights,
        "weights_sha256": teacher.WEIGHTS_SHA256 if weights_sha256 is None else weights_sha256,
        "opts": tuple(teacher.OPTS),
        "autocast": teacher.AUTOCAST,
        "channels_last": teacher.CHANNELS_LAST,
        "expected_classes": student_classes,
        "device": cfg.MODEL.DEVICE,
        "input_scale": teacher.INPUT_SCALE,
    }


def _is_detector(model) -> bool:
    return (
        isinstance(model, torch.nn.Module)
        and all(hasattr(model, a) for a in ("backbone", "pixel_mean"))
        and (hasattr(model, "roi_heads") or hasattr(model, "head"))
    )


@configurable(from_config=_teacher_from_config)
def build_teacher(
    config: str,
    weights: str,
    *,
    weights_sha256: str = "",
    opts: Sequence[str] = (),
    autocast: str = "",
    channels_last: bool = False,
    expected_classes: Optional[Sequence[str]] = None,
    device: str = "cpu",
    input_scale: float = 1.0,
) -> FrozenTeacher:
    """
    Build a teacher detector, load its weights and freeze it.  Also callable as
    ``build_teacher(student_cfg)``, which reads the student's ``KD.TEACHER``.

    The teacher's kind is ``config``'s scheme, looked up in
    :data:`~kd_det.modeling.teacher.kinds.TEACHER_KIND_REGISTRY`: ``torchvision://NAME``
    builds a torchvision detector (:mod:`.torchvision_teacher`); a path or model-zoo name
    (no scheme) a Detectron2 one (:func:`build_detectron2_teacher`).  The arguments are
    those of the kind's builder; for a Detectron2 teacher:

    Args:
        config: its Detectron2 config, a yacs ``.yaml`` or a LazyConfig ``.py``: a path, or a
            config of Detectron2's model zoo by name (:func:`resolve_teacher_config`).
        weights: its checkpoint, a path or a URL of a scheme registered in
            :mod:`kd_det.checkpoint.loading` (``detectron2://``, ``https://``, ...).
        weights_sha256: the checkpoint's SHA-256 (full, or its first 8 or more hex digits),
            checked before it is read; empty: not pinned.
        opts: overrides of ``config``: yacs ``KEY VALUE ...`` pairs, or ``"key=value"``
            strings for a LazyConfig.
        autocast, channels_last: see :class:`FrozenTeacher`.
        expected_classes: the student's class names (class i = index i); the teacher's
            training sets, where registered, must name the same ones in the same order.
            None: not checked.
        device: where the teacher runs.
        input_scale: the factor the teacher's input is resized by (``KD.TEACHER.INPUT_SCALE``,
            see :class:`FrozenTeacher`).
    """
    return teacher_kind_builder(config)(
        config,
        weights,
        weights_sha256=weights_sha256,
        opts=opts,
        autocast=autocast,
        channels_last=channels_last,
        expected_classes=expected_classes,
        device=device,
        input_scale=input_scale,
    )


@register_teacher_kind("")
def build_detectron2_teacher(
    config: str,
    weights: str,
    *,
    weights_sha256: str = "",
    opts: Sequence[str] = (),
    autocast: str = "",
    channels_last: bool = False,
    expected_classes: Optional[Sequence[str]] = None,
    device: str = "cpu",
    input_scale: float = 1.0,
) -> FrozenTeacher:
    """A Detectron2 teacher (GeneralizedRCNN or RetinaNet); arguments as :func:`build_teacher`."""
    path = resolve_teacher_config(config)
    name = describe_config(path, "teacher")
    cfg = load_detector_config(path, opts, role="teacher", opts_name="KD.TEACHER.OPTS")
    meta_architecture = meta_architecture_of(cfg)
    if meta_architecture.startswith("Distill"):  # refused before it builds a teacher of its own
        raise ValueError(
            "{} builds a {}; a teacher must be a plain detector (GeneralizedRCNN or "
            "RetinaNet)".format(name, meta_architecture)
        )
    try:
        model = build_detector(cfg, device)
    except Exception as e:
        raise ValueError(
            "the model of {} does not build: {}: {}".format(name, type(e).__name__, e)
        ) from e
    if not _is_detector(model):
        raise ValueError(
            "{} builds a {}, not a Detectron2 detector: kd_det needs a "
            "GeneralizedRCNN or RetinaNet (a backbone, pixel_mean/std and RoI or "
            "dense heads)".format(name, type(model).__name__)
        )
    try:
        settings = detector_settings(cfg)
    except ValueError as e:
        raise ValueError("{}: {}".format(name, e)) from e
    load_teacher_weights(model, weights, path, weights_sha256)
    teacher = FrozenTeacher(
        model,
        settings,
        autocast=autocast,
        channels_last=channels_last,
        weights=weights,
        config=path,
        input_scale=input_scale,
    )
    check_same_classes(expected_classes, settings.train_datasets, path)
    logger.info("Loaded teacher {} from {}".format(settings.meta_architecture, weights))
    return teacher


def check_num_classes(teachers: Sequence[FrozenTeacher], num_classes: int) -> None:
    """Raise unless every teacher has the student's ``num_classes`` classes (teachers whose
    classes map to the student's by name are checked where their predictions are used)."""
    for teacher in teachers:
        if teacher.classes_by_name:
            continue
        if teacher.num_classes != num_classes:
            raise ValueError(
                "teacher has {} classes ({}) but the student has {}: both must be "
                "trained on the same label space (set NUM_CLASSES alike)".format(
                    teacher.num_classes, teacher.config, num_classes
                )
            )


def build_teachers(cfg) -> List[FrozenTeacher]:
    """
    The teachers of a student's distillation config: ``KD.MULTI_TEACHER.CONFIGS/WEIGHTS``
    when set (several teachers; ``KD.TEACHER``'s other keys apply to each), else the one
    ``KD.TEACHER``.
    """
    mt = cfg.KD.MULTI_TEACHER
    if not mt.CONFIGS:
        return [build_teacher(cfg)]
    if cfg.KD.TEACHER.CONFIG:
        raise ValueError(
            "both KD.TEACHER.CONFIG and KD.MULTI_TEACHER.CONFIGS are set; list every "
            "teacher in KD.MULTI_TEACHER.CONFIGS (and its weights in "
            "KD.MULTI_TEACHER.WEIGHTS) and leave KD.TEACHER.CONFIG empty"
        )
    if len(mt.WEIGHTS) != len(mt.CONFIGS):
        raise ValueError(
            "KD.MULTI_TEACHER.CONFIGS has {} teachers but KD.MULTI_TEACHER.WEIGHTS {} "
            "checkpoints; give one checkpoint per teacher config".format(
                len(mt.CONFIGS), len(mt.WEIGHTS)
            )
        )
    pins = list(mt.WEIGHTS_SHA256) or [""] * len(mt.WEIGHTS)
    if len(pins) != len(mt.WEIGHTS):
        raise ValueError(
            "KD.MULTI_TEACHER.WEIGHTS_SHA256 has {} digests for {} checkpoints; give one per "
            'checkpoint ("" for one left unpinned), or none'.format(len(pins), len(mt.WEIGHTS))
        )
    return [
        build_teacher(cfg, config, weights, pin)
        for config, weights, pin in zip(mt.CONFIGS, mt.WEIGHTS, pins)
    ]

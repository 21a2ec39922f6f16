"""
What a training run's config says about the run, of either kind, for reports such as the
model zoo's table (``tools/model_zoo.py``): the student's backbone, the schedule, and what
it distils, in words (:func:`distillation_summary`), read without building anything::

    summary = distillation_summary(config)   # a CfgNode, or a loaded LazyConfig
    summary.methods                          # e.g. ("SSIM (PFI)", "RM")
    summary.teacher                          # the (first) teacher's config, "" without one
"""

from dataclasses import dataclass
from typing import List, Optional, Tuple

from detectron2.config import CfgNode
from omegaconf import DictConfig, OmegaConf

from .defaults import get_kd_cfg
from .detector import DetectorConfig, meta_architecture_of
from .lazy import lazy_get
from .renames import rename_config_dict

__all__ = ["backbone_name", "training_schedule", "DistillationSummary", "distillation_summary"]


def backbone_name(config: DetectorConfig) -> str:
    """
    The student's backbone, e.g. "R-50-FPN": yacs ``MODEL.RESNETS.DEPTH``; a LazyConfig's
    ``model.backbone.bottom_up.stages.depth``, else the class its ``model.backbone`` calls.
    """
    if isinstance(config, CfgNode):
        return "R-{}-FPN".format(config.MODEL.RESNETS.DEPTH)
    depth = lazy_get(config, "model.backbone.bottom_up.stages.depth")
    if depth:
        return "R-{}-FPN".format(depth)
    return str(lazy_get(config, "model.backbone._target_", "?")).rsplit(".", 1)[-1]


def training_schedule(config: DetectorConfig) -> Tuple[Optional[int], Optional[int]]:
    """
    (iterations, images per batch): yacs ``SOLVER.MAX_ITER`` and ``IMS_PER_BATCH``; a
    LazyConfig's ``train.max_iter`` and ``dataloader.train.total_batch_size`` (None where
    it has none).
    """
    if isinstance(config, CfgNode):
        return config.SOLVER.MAX_ITER, config.SOLVER.IMS_PER_BATCH
    return (
        lazy_get(config, "train.max_iter"),
        lazy_get(config, "dataloader.train.total_batch_size"),
    )


@dataclass(frozen=True)
class DistillationSummary:
    """The distillation a config trains with, named as MODEL_ZOO.md names it."""

    meta_architecture: str  # e.g. "DistillRetinaNet"; a vanilla one for a plain detector
    methods: Tuple[str, ...]  # e.g. ("SSIM (PFI)", "RM"); () for a plain detector
    teacher: str = ""  # the (first) teacher's config; "" without a teacher


def _short(loss_name: str, suffix: str) -> str:
    return loss_name.rsplit(".", 1)[-1].replace(suffix, "")


def _frskd(loss_name: str) -> List[str]:
    return ["FRSKD self-distillation ({})".format(_short(loss_name, "Loss"))]


def _yacs_methods(kd, meta_architecture: str) -> List[str]:
    """The methods a (yacs) ``KD`` node enables for ``meta_architecture``."""
    if meta_architecture.startswith("SelfDistill"):
        return _frskd(kd.FEATURE.LOSS)
    if not meta_architecture.startswith("Distill"):
        return []
    methods = []
    if kd.FEATURE.ENABLED:
        pfi = " (PFI)" if kd.PFI.ENABLED else ""
        methods.append(_short(kd.FEATURE.LOSS, "FeatureLoss") + pfi)
    if kd.RM.ENABLED:
        methods.append("RM")
    if kd.SOFT_LABEL.ENABLED:
        methods.append("soft-label")
    if kd.CROSSKD.ENABLED:
        methods.append("CrossKD")
    if kd.BOX.ENABLED and kd.BOX.WEIGHT > 0:
        methods.append("box")
    if kd.CHANNEL_STATS.ENABLED:
        methods.append("channel stats")
    if kd.LAKD.ENABLED:
        methods.append("LAKD")
    if kd.INHERIT.PREFIXES:
        methods.append("init from teacher")
    return methods


class _OldKD:
    """
    The ``kd={...}`` dict of kd_det's deprecated LazyConfig form, read key by key with
    kd_det's defaults where it says nothing (old key names renamed): ``.FEATURE.LOSS`` etc.
    """

    def __init__(self, kd, defaults=None, prefix: str = ""):
        self._kd, self._defaults, self._prefix = kd, defaults, prefix

    def __getattr__(self, key):
        default = getattr(self._defaults, key)
        value = self._kd.get(key, None) if hasattr(self._kd, "get") else None
        if isinstance(default, CfgNode):
            return _OldKD(value or {}, default)
        return default if value is None else value


def _target_name(node) -> str:
    target = lazy_get(node, "_target_")
    if target is None:
        return ""
    return target if isinstance(target, str) else getattr(target, "__qualname__", str(target))


def _weighted(node, loss: str, weight: str) -> bool:
    return lazy_get(node, loss) is not None and float(lazy_get(node, weight, 0.0)) > 0


def _lazy_methods(model, meta_architecture: str) -> List[str]:
    """The methods of a LazyConfig's ``model``, composed directly (the distillers' LazyCalls)."""
    feature = lazy_get(model, "feature_distiller")
    if feature is None and lazy_get(model, "multi_teacher.distillers"):
        feature = lazy_get(model, "multi_teacher.distillers")[0]  # one loss for every teacher
    if meta_architecture.startswith("SelfDistill"):
        return _frskd(_target_name(lazy_get(feature, "loss")))
    if not meta_architecture.startswith("Distill"):
        return []
    methods = []
    if feature is not None:
        pfi = " (PFI)" if lazy_get(model, "pfi", False) else ""
        methods.append(_short(_target_name(lazy_get(feature, "loss")), "FeatureLoss") + pfi)
    prediction = lazy_get(model, "prediction_distiller")
    if _weighted(prediction, "rm_loss", "rm_weight"):
        methods.append("RM")
    if _weighted(prediction, "soft_label_loss", "soft_label_weight") or _weighted(
        lazy_get(model, "roi_soft_label"), "loss", "weight"
    ):
        methods.append("soft-label")
    if lazy_get(model, "crosskd") is not None:
        methods.append("CrossKD")
    if _weighted(lazy_get(model, "box_distiller"), "loss", "weight") or _weighted(
        lazy_get(model, "roi_box"), "loss", "weight"
    ):
        methods.append("box")
    if lazy_get(model, "channel_stats") is not None:
        methods.append("channel stats")
    if lazy_get(model, "local_attention") is not None:
        methods.append("LAKD")
    if lazy_get(model, "inherit_prefixes"):
        methods.append("init from teacher")
    return methods


def distillation_summary(config) -> DistillationSummary:
    """
    The :class:`DistillationSummary` of a yacs config (its ``KD`` node) or of a LazyConfig
    (its ``model``: a distillation meta-architecture with the teacher and distillers as
    arguments, or the deprecated ``kd={...}`` form), read without building anything.
    """
    meta = meta_architecture_of(config)
    distilled = meta.startswith("Distill")
    if isinstance(config, CfgNode):
        kd = config.KD
        return DistillationSummary(
            meta, tuple(_yacs_methods(kd, meta)), kd.TEACHER.CONFIG if distilled else ""
        )
    model = lazy_get(config, "model")
    old = lazy_get(model, "kd")
    if old is not None:  # the deprecated form: kd keyed as the yacs KD node
        if isinstance(old, DictConfig):
            old = OmegaConf.to_container(old, resolve=True)
        renamed = rename_config_dict({"KD": dict(old)}, source="kd={...} of a LazyConfig student")
        kd = _OldKD(renamed["KD"], get_kd_cfg().KD)
        return DistillationSummary(
            meta, tuple(_yacs_methods(kd, meta)), kd.TEACHER.CONFIG if distilled else ""
        )
    return DistillationSummary(
        meta,
        tuple(_lazy_methods(model, meta)),
        str(lazy_get(model, "teacher.config", "")) if distilled else "",
    )

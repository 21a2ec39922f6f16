"""
A teacher given as a Detectron2 LazyConfig (``.py``), the form of Detectron2's newer
configs (``configs/new_baselines``): its ``model`` is instantiated, and the few settings
kd_det reads from a teacher's config are collected into a yacs view.
"""

import logging
import sys
from typing import Tuple

import torch
from detectron2.config import CfgNode, LazyConfig, get_cfg, instantiate

from ..config import add_kd_config
from ..config.lazy import dataset_names, lazy_get, single_short_edge, test_resizes

__all__ = ["build_lazy_teacher"]

logger = logging.getLogger(__name__)


def _apply_overrides(lazy, opts, path: str):
    bad = [o for o in opts if "=" not in str(o)]
    if bad:
        raise ValueError("KD.TEACHER.OPTS={} for the LazyConfig teacher {!r}: a LazyConfig takes overrides as "
                         "'key=value' strings (e.g. \"model.roi_heads.box_predictor.test_score_thresh=0.05\"), "
                         "not yacs KEY VALUE pairs; {} is not one".format(list(opts), path, bad[0]))
    try:
        return LazyConfig.apply_overrides(lazy, list(opts))
    except Exception as e:
        raise ValueError("KD.TEACHER.OPTS={} do not apply to the LazyConfig teacher {!r}: {}: {}".format(
            list(opts), path, type(e).__name__, e)) from e


def _view(lazy, model: torch.nn.Module, student_cfg: CfgNode, path: str) -> CfgNode:
    """
    A yacs config with the settings kd_det reads from a teacher: META_ARCHITECTURE,
    NUM_CLASSES, PIXEL_MEAN/STD, INPUT.FORMAT, MIN/MAX_SIZE_TEST (teacher evaluation),
    DATASETS (the class check). Every other key is a default and says nothing of the model.
    """
    cfg = add_kd_config(get_cfg())
    cfg.MODEL.META_ARCHITECTURE = type(model).__name__
    cfg.MODEL.DEVICE = student_cfg.MODEL.DEVICE
    cfg.MODEL.WEIGHTS = ""
    if hasattr(model, "head") and hasattr(model, "num_classes"):  # RetinaNet and its kind
        cfg.MODEL.RETINANET.NUM_CLASSES = int(model.num_classes)
    else:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = int(model.roi_heads.num_classes)
    cfg.MODEL.PIXEL_MEAN = [float(v) for v in model.pixel_mean.flatten()]
    cfg.MODEL.PIXEL_STD = [float(v) for v in model.pixel_std.flatten()]

    input_format = getattr(model, "input_format", None) or lazy_get(lazy, "dataloader.test.mapper.image_format")
    if input_format is None:
        raise ValueError("the LazyConfig teacher {!r} names no input format: set model.input_format (or "
                         "dataloader.test.mapper.image_format) to the channel order it was trained on, "
                         "\"BGR\" or \"RGB\"".format(path))
    cfg.INPUT.FORMAT = str(input_format)

    resize = test_resizes(lazy)
    if resize:
        short = single_short_edge(resize[0])
        # a test resize drawing from several lengths (unusual): evaluate at the largest
        cfg.INPUT.MIN_SIZE_TEST = short if short is not None else max(
            int(v) for v in lazy_get(resize[0], "short_edge_length"))
        # ResizeShortestEdge's own default: no limit
        cfg.INPUT.MAX_SIZE_TEST = int(lazy_get(resize[0], "max_size", sys.maxsize))
    else:
        # the teacher's own test-time resize is unknown: evaluate it at the student's test size
        cfg.INPUT.MIN_SIZE_TEST = student_cfg.INPUT.MIN_SIZE_TEST
        cfg.INPUT.MAX_SIZE_TEST = student_cfg.INPUT.MAX_SIZE_TEST
        logger.info("LazyConfig teacher %s has no ResizeShortestEdge in dataloader.test.mapper.augmentations: it is "
                    "evaluated at the student's test size (%d, max %d)", path, cfg.INPUT.MIN_SIZE_TEST,
                    cfg.INPUT.MAX_SIZE_TEST)
    cfg.DATASETS.TRAIN = dataset_names(lazy_get(lazy, "dataloader.train.dataset.names"))
    cfg.DATASETS.TEST = dataset_names(lazy_get(lazy, "dataloader.test.dataset.names"))
    cfg.freeze()
    return cfg


def build_lazy_teacher(student_cfg: CfgNode, path: str) -> Tuple[torch.nn.Module, CfgNode]:
    """
    The teacher detector of the LazyConfig file ``path`` with ``KD.TEACHER.OPTS``
    ('key=value' overrides) applied, on the student's device, weights not loaded;
    and the yacs view of its settings (see :func:`_view`).
    """
    try:
        lazy = LazyConfig.load(path)
    except Exception as e:
        raise ValueError("teacher LazyConfig {!r} does not load: {}: {}".format(path, type(e).__name__, e)) from e
    lazy = _apply_overrides(lazy, student_cfg.KD.TEACHER.OPTS, path)
    if "model" not in lazy:
        raise ValueError("teacher LazyConfig {!r} has no `model`: a LazyConfig teacher defines the detector as "
                         "`model = L(GeneralizedRCNN)(...)` or `L(RetinaNet)(...)`, as Detectron2's configs "
                         "do".format(path))
    try:
        model = instantiate(lazy.model)
    except Exception as e:
        raise ValueError("the model of teacher LazyConfig {!r} does not build: {}: {}".format(
            path, type(e).__name__, e)) from e
    name = type(model).__name__
    if name.startswith("Distill"):
        raise ValueError("teacher LazyConfig {!r} builds a {}; a teacher must be a plain detector (GeneralizedRCNN "
                         "or RetinaNet)".format(path, name))
    if not isinstance(model, torch.nn.Module) or not all(hasattr(model, a) for a in ("backbone", "pixel_mean")) \
            or not (hasattr(model, "roi_heads") or hasattr(model, "head")):
        raise ValueError("teacher LazyConfig {!r} builds a {}, not a Detectron2 detector: kd_det needs a "
                         "GeneralizedRCNN or RetinaNet (a backbone, pixel_mean/std and RoI or dense heads)".format(
                             path, name))
    model.to(torch.device(student_cfg.MODEL.DEVICE))
    return model, _view(lazy, model, student_cfg, path)

"""Evaluators selected by name.

``cfg.TEST.EVALUATOR`` names one; when empty, the dataset's ``evaluator_type``
metadata does ("coco" -> ``COCOEvaluator``, "pascal_voc" ->
``PascalVOCDetectionEvaluator``).  Users add evaluators with
``@EVALUATOR_REGISTRY.register()`` on a function ``(cfg, dataset_name, output_dir)
-> DatasetEvaluator``.
"""

import importlib
import os

from detectron2.data import MetadataCatalog
from detectron2.evaluation import COCOEvaluator, DatasetEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils.registry import Registry

__all__ = ["EVALUATOR_REGISTRY", "build_evaluator", "evaluator_name", "has_cpp_ops"]

EVALUATOR_REGISTRY = Registry("KD_EVALUATOR")
EVALUATOR_REGISTRY.__doc__ = "Functions (cfg, dataset_name, output_dir) -> DatasetEvaluator."


def has_cpp_ops() -> bool:
    """
    True when Detectron2's compiled extension is importable, not the placeholder that
    tools/install_detectron2.py puts in a pure-Python build (whose fast COCOeval is missing).
    """
    try:
        ext = importlib.import_module("detectron2._C")
    except ImportError:
        return False
    return not getattr(ext, "KD_DET_PLACEHOLDER", False)


# Dataset metadata ``evaluator_type`` -> evaluator name in the registry.
_BY_EVALUATOR_TYPE = {"coco": "coco", "pascal_voc": "pascal_voc"}


@EVALUATOR_REGISTRY.register()
def coco(cfg, dataset_name: str, output_dir: str) -> DatasetEvaluator:
    """COCO box AP; the fast C++ COCOeval only when Detectron2's extension is built."""
    return COCOEvaluator(dataset_name, output_dir=output_dir, use_fast_impl=has_cpp_ops())


@EVALUATOR_REGISTRY.register()
def pascal_voc(cfg, dataset_name: str, output_dir: str) -> DatasetEvaluator:
    """PASCAL VOC AP at IoU 0.5 (and AP over 0.5:0.95) per class."""
    return PascalVOCDetectionEvaluator(dataset_name)


def evaluator_name(cfg, dataset_name: str) -> str:
    """The registered evaluator name for ``dataset_name``: ``cfg.TEST.EVALUATOR`` or the dataset's
    ``evaluator_type``."""
    if cfg.TEST.EVALUATOR:
        return cfg.TEST.EVALUATOR
    evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
    if evaluator_type not in _BY_EVALUATOR_TYPE:
        raise ValueError(
            "dataset {!r} has evaluator_type {!r}, which kd_det has no evaluator for; set "
            "TEST.EVALUATOR to one of {}".format(
                dataset_name, evaluator_type, sorted(k for k, _ in EVALUATOR_REGISTRY)
            )
        )
    return _BY_EVALUATOR_TYPE[evaluator_type]


def build_evaluator(cfg, dataset_name: str, output_dir: str = None) -> DatasetEvaluator:
    """The evaluator for ``dataset_name``: ``cfg.TEST.EVALUATOR`` or the dataset's
    ``evaluator_type``."""
    output_dir = output_dir or os.path.join(cfg.OUTPUT_DIR, "inference")
    name = evaluator_name(cfg, dataset_name)
    try:
        factory = EVALUATOR_REGISTRY.get(name)
    except KeyError:
        raise KeyError(
            "unknown TEST.EVALUATOR {!r}; registered evaluators: {}".format(
                name, sorted(k for k, _ in EVALUATOR_REGISTRY)
            )
        ) from None
    return factory(cfg, dataset_name, output_dir)

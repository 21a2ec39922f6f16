"""
What a training run's config says about the run, of either kind, for reports such as the
model zoo's table (``tools/model_zoo.py``): the student's backbone, the schedule, and the
distillation settings as kd_det's yacs ``KD`` node.
"""

from typing import Mapping, Optional, Tuple

from detectron2.config import CfgNode
from omegaconf import DictConfig, OmegaConf

from .defaults import get_kd_cfg
from .detector import DetectorConfig
from .lazy import lazy_get
from .renames import rename_config_dict

__all__ = ["backbone_name", "training_schedule", "kd_settings"]


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
    return (lazy_get(config, "train.max_iter"),
            lazy_get(config, "dataloader.train.total_batch_size"))


def _ints_as_floats(kd: Mapping, defaults) -> dict:
    # yacs refuses an int where the default is a float; "WEIGHT": 2 is what people write
    out = {}
    for key, value in kd.items():
        default = defaults.get(key, None) if isinstance(defaults, CfgNode) else None
        if isinstance(value, Mapping):
            value = _ints_as_floats(value, default)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def kd_settings(config: DetectorConfig) -> CfgNode:
    """
    The distillation settings of a run's config as kd_det's ``KD`` node: a yacs config's
    own; for a LazyConfig, its ``model.kd`` (the ``kd={...}`` of ``lazy_distilled_model``,
    older keys renamed) merged into kd_det's defaults, which are all a LazyConfig without
    ``model.kd`` gets.
    """
    if isinstance(config, CfgNode):
        return config.KD
    kd = lazy_get(config, "model.kd", {})
    kd = OmegaConf.to_container(kd, resolve=True) if isinstance(kd, DictConfig) else dict(kd)
    kd = rename_config_dict({"KD": kd}, source="kd={...} of a LazyConfig student")["KD"]
    node = get_kd_cfg().KD
    node.merge_from_other_cfg(CfgNode(_ints_as_floats(kd, node)))
    return node

"""
kd_det's configuration: the yacs defaults (:mod:`.defaults`), the renames of older
keys applied when a config loads (:mod:`.renames`) and the readers of Detectron2
LazyConfigs (:mod:`.lazy`).  The only place that reads a config's kind: a detector's
config of either kind is loaded, described and built by :mod:`.detector`, its data
loaders by :mod:`.loaders`, its student-only config by :mod:`.student`, and a run's
summary (backbone, schedule, distillation methods) by :mod:`.run`.
"""

from .defaults import add_kd_config, get_kd_cfg
from .renames import merge_kd_config

__all__ = ["add_kd_config", "get_kd_cfg", "merge_kd_config"]

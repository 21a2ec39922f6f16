"""
kd_det's configuration: the yacs defaults (:mod:`.defaults`) and the readers of
Detectron2 LazyConfigs (:mod:`.lazy`).  The only place that reads a config's kind.
"""

from .defaults import add_kd_config, get_kd_cfg

__all__ = ["add_kd_config", "get_kd_cfg"]

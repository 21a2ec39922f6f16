"""Which file a teacher's config is: a path, or a config of Detectron2's model zoo by its name."""

import logging
import os
from typing import Optional

__all__ = ["resolve_teacher_config"]

logger = logging.getLogger(__name__)


def _model_zoo_config_file(name: str) -> Optional[str]:
    """
    The file of ``name`` in Detectron2's model zoo (e.g.
    "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"), or None.
    """
    try:
        from detectron2 import model_zoo

        return model_zoo.get_config_file(name)
    except Exception:  # not a model-zoo name, or a Detectron2 installed without its configs
        return None


def resolve_teacher_config(path: str) -> str:
    """
    The teacher config file ``KD.TEACHER.CONFIG`` names: a path (relative to the working
    directory) or, where no such file exists, a config of Detectron2's model zoo by its
    name there, as ``detectron2.model_zoo.get_config_file`` takes it (e.g.
    ``new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ.py``).

    Raises:
        ValueError / FileNotFoundError naming the fix when it is empty or neither.
    """
    if not path:
        raise ValueError(
            "KD.TEACHER.CONFIG is empty: set it to the teacher's Detectron2 config "
            "file (e.g. configs/synthetic/faster_rcnn_R_50_FPN.yaml)"
        )
    if os.path.isfile(path):
        return path
    zoo_file = None if os.path.isabs(path) else _model_zoo_config_file(path)
    if zoo_file is not None:
        logger.info("teacher config %s: Detectron2's model-zoo config %s", path, zoo_file)
        return zoo_file
    raise FileNotFoundError(
        "teacher config KD.TEACHER.CONFIG={!r} does not exist (paths are relative to the working "
        "directory {}) and is not a config of Detectron2's model zoo (e.g. "
        "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml)".format(path, os.getcwd())
    )

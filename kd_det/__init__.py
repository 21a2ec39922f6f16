"""kd_det: knowledge distillation of object detectors on Detectron2.

Importing kd_det registers its meta-architectures (``DistillGeneralizedRCNN``,
``DistillRetinaNet``) in Detectron2's META_ARCH_REGISTRY and its synthetic
datasets in Detectron2's catalogs.
"""

from . import _compat  # noqa: F401  (first: third-party import-time warnings, see _compat.py)
from . import losses, modeling  # noqa: F401  (registers meta-architectures)
from .config import add_kd_config, get_kd_cfg, merge_kd_config
from .data import register_synthetic_datasets

__version__ = "0.1.0"

register_synthetic_datasets()

__all__ = ["add_kd_config", "get_kd_cfg", "merge_kd_config", "__version__"]

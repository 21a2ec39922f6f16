"""
Checkpoints: how kd_det writes them and how it reads them.

- :mod:`kd_det.checkpoint.loading`: the one place that resolves and reads weights (paths,
  URLs, schemes, SHA-256 pins), without running code (:mod:`kd_det.checkpoint.safe_pickle`).
- :mod:`kd_det.checkpoint.torchvision_weights`: ``torchvision://NAME``, weights of torchvision's
  registry.
- :mod:`kd_det.checkpoint.torchvision_backbone`: torchvision's ImageNet ResNets as Detectron2
  backbone checkpoints (``MODEL.WEIGHTS torchvision://resnet18``: converted on first use).
- :mod:`kd_det.checkpoint.atomic`: crash-safe saving (a file is complete or absent).
- :mod:`kd_det.checkpoint.leftovers`: removing the temporary files of killed saves.
- :mod:`kd_det.checkpoint.retention`: keeping the newest N periodic checkpoints.
"""

from .atomic import AtomicDetectionCheckpointer, atomic_write_bytes
from .leftovers import remove_leftover_temp_files
from .loading import (
    SafeDetectionCheckpointer,
    UnsafeCheckpointError,
    WeightsMismatchError,
    add_trust_pickle_argument,
    check_sha256,
    file_sha256,
    incompatible_keys_problems,
    load_checkpoint,
    read_checkpoint,
    register_weights_converter,
    register_weights_scheme,
    resolve_weights,
    trust_pickle_from_args,
)
from .retention import prune_checkpoints
from .torchvision_backbone import convert_resnet_state_dict, detectron2_backbone_checkpoint
from .torchvision_weights import torchvision_weights, torchvision_weights_file

__all__ = [
    "AtomicDetectionCheckpointer",
    "atomic_write_bytes",
    "SafeDetectionCheckpointer",
    "UnsafeCheckpointError",
    "WeightsMismatchError",
    "add_trust_pickle_argument",
    "check_sha256",
    "file_sha256",
    "incompatible_keys_problems",
    "load_checkpoint",
    "read_checkpoint",
    "register_weights_scheme",
    "resolve_weights",
    "trust_pickle_from_args",
    "remove_leftover_temp_files",
    "prune_checkpoints",
    "torchvision_weights",
    "torchvision_weights_file",
    "convert_resnet_state_dict",
    "detectron2_backbone_checkpoint",
    "register_weights_converter",
]

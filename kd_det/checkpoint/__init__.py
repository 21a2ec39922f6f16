"""
Checkpoints: how kd_det writes them and how it reads them.

- :mod:`kd_det.checkpoint.atomic`: crash-safe saving (a file is complete or absent).
- :mod:`kd_det.checkpoint.leftovers`: removing the temporary files of killed saves.
- :mod:`kd_det.checkpoint.retention`: keeping the newest N periodic checkpoints.
"""

from .atomic import AtomicDetectionCheckpointer, atomic_write_bytes
from .leftovers import remove_leftover_temp_files
from .retention import prune_checkpoints

__all__ = [
    "AtomicDetectionCheckpointer",
    "atomic_write_bytes",
    "remove_leftover_temp_files",
    "prune_checkpoints",
]

"""
Checkpoints: how kd_det writes them and how it reads them.

- :mod:`kd_det.checkpoint.atomic`: crash-safe saving (a file is complete or absent).
"""

from .atomic import AtomicDetectionCheckpointer, atomic_write_bytes

__all__ = ["AtomicDetectionCheckpointer", "atomic_write_bytes"]

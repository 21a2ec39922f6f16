"""
Releasing a distilled student, in two steps:

- :mod:`kd_det.release.student`: the student-only Detectron2 checkpoint and the student's
  own config (:mod:`kd_det.config.student`), which vanilla Detectron2 loads without kd_det;
- :mod:`kd_det.release.deploy`: TorchScript and ONNX exports of that student, checked
  against the eager model, for a deployment without Detectron2.
"""

from ..checkpoint import file_sha256
from .deploy import ONNX_OPSET, DeploySettings, export_onnx, export_torchscript, load_student
from .student import StudentCheckpointer, release_student, student_state_dict

__all__ = [
    "StudentCheckpointer",
    "file_sha256",
    "release_student",
    "student_state_dict",
    "ONNX_OPSET",
    "DeploySettings",
    "export_torchscript",
    "export_onnx",
    "load_student",
]

"""
Release of a distilled student: a student-only Detectron2 checkpoint and the student's
own config, both loadable by vanilla Detectron2 without kd_det (what the model zoo ships).
TorchScript/ONNX deployment of the released student is :mod:`kd_det.release.deploy`.
"""

import os
from typing import Dict

import torch

from ..checkpoint import (
    SafeDetectionCheckpointer,
    atomic_write_bytes,
    file_sha256,
    incompatible_keys_problems,
    read_checkpoint,
)
from ..config.detector import DetectorConfig, build_detector
from ..config.student import save_config, student_model_config, vanilla_student_config
from ..modeling.meta_arch import KDStudentMixin

__all__ = ["student_state_dict", "StudentCheckpointer", "release_student", "file_sha256"]


def student_state_dict(checkpoint_model: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The student's weights of a distillation checkpoint's ``model`` dict (``kd_*`` keys
    dropped)."""
    return {
        k: v for k, v in checkpoint_model.items() if not k.startswith(KDStudentMixin.kd_key_prefix)
    }


class StudentCheckpointer(SafeDetectionCheckpointer):
    """
    Loads a distillation checkpoint (read without running code) into the bare student
    (:func:`~kd_det.config.student.student_model_config`): its ``kd_*`` weights are dropped
    instead of being reported as unused keys.
    """

    def _load_model(self, checkpoint):
        checkpoint["model"] = student_state_dict(checkpoint["model"])
        return super()._load_model(checkpoint)


def release_student(
    config: DetectorConfig, weights: str, output_dir: str, name: str = "model_final"
) -> Dict[str, str]:
    """
    Write ``<name>.pth`` (student-only Detectron2 checkpoint) and ``config.yaml`` to
    ``output_dir``: the student's own config with the released weights as its weights
    (:func:`~kd_det.config.student.vanilla_student_config`), which vanilla Detectron2
    loads (:func:`~kd_det.config.student.load_student_config`) and builds without kd_det.

    Args:
        config: the training config (distillation or vanilla; yacs or LazyConfig).
        weights: the training checkpoint (a Detectron2 ``.pth`` with a ``model`` dict).
    Returns:
        {"weights": path, "config": path, "sha256": hex digest of the weights file}.
    Raises:
        FileNotFoundError / ValueError naming the checkpoint when it is missing or not a Detectron2
            checkpoint.
    """
    weights_out = _write_student_weights(config, weights, output_dir, name)
    config_out = os.path.join(output_dir, "config.yaml")
    save_config(vanilla_student_config(config, weights_out), config_out)
    return {"weights": weights_out, "config": config_out, "sha256": file_sha256(weights_out)}


def _write_student_weights(config: DetectorConfig, weights: str, output_dir: str, name: str) -> str:
    """Write ``output_dir/<name>.pth``: the student's weights of the training checkpoint
    ``weights``, once they are checked to build ``config``'s student exactly."""
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            "no checkpoint at {!r}: pass the training run's model_final.pth (or another "
            "model_XXXXXXX.pth from its OUTPUT_DIR)".format(weights)
        )
    ckpt = read_checkpoint(weights)  # refuses a file that would run code
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError(
            "{!r} is not a Detectron2 training checkpoint "
            "(a dict with a 'model' state dict)".format(weights)
        )
    student = student_state_dict(ckpt["model"])
    _check_builds_student(config, student, weights)
    os.makedirs(output_dir, exist_ok=True)
    weights_out = os.path.join(output_dir, name + ".pth")
    # iteration kept for provenance; optimizer/scheduler state are training-only
    released = {
        "model": student,
        "iteration": ckpt.get("iteration"),
        "__author__": "kd_det export_student",
    }
    atomic_write_bytes(weights_out, lambda f: torch.save(released, f))
    return weights_out


def _check_builds_student(
    config: DetectorConfig, student: Dict[str, torch.Tensor], weights: str
) -> None:
    """Raise unless ``student`` has exactly the keys and shapes of ``config``'s student."""
    model = build_detector(student_model_config(config), device="cpu")
    checkpointer = StudentCheckpointer(model)
    problems = incompatible_keys_problems(checkpointer._load_model({"model": dict(student)}))
    if problems:
        raise ValueError(
            "{!r} does not hold this config's student ({}). Pass the checkpoint of the run "
            "this config trained, with the same config overrides".format(
                weights, "; ".join(problems)
            )
        )

"""
Release of a distilled student: a student-only Detectron2 checkpoint and the student's
own config, both loadable by vanilla Detectron2 without kd_det (what the model zoo ships).
TorchScript/ONNX deployment of the released student is :mod:`kd_det.release.deploy`.
"""

import copy
import hashlib
import os
from typing import Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.modeling import META_ARCH_REGISTRY

from ..checkpoint import atomic_write_bytes
from ..modeling.meta_arch import KDStudentMixin

__all__ = ["vanilla_student_config", "student_inference_cfg", "student_state_dict",
           "StudentCheckpointer", "release_student", "release_lazy_student", "file_sha256"]


def _drop_unknown_keys(cfg: CfgNode, reference: CfgNode) -> CfgNode:
    """Copy of ``cfg`` without keys that ``reference`` (a vanilla Detectron2 config) lacks."""
    out = CfgNode()
    for key, value in cfg.items():
        if key not in reference:
            continue
        if isinstance(value, CfgNode) and isinstance(reference[key], CfgNode):
            out[key] = _drop_unknown_keys(value, reference[key])
        else:
            out[key] = value
    return out


def vanilla_student_config(cfg: CfgNode, weights: str = "") -> CfgNode:
    """
    The student's config as vanilla Detectron2 reads it: the distillation
    meta-architecture replaced by the plain one (``DistillRetinaNet`` ->
    ``RetinaNet``), every kd_det key (``KD``, ``TEST.EVALUATOR``, ...) removed, and
    ``MODEL.WEIGHTS`` set to ``weights``.
    """
    arch = cfg.MODEL.META_ARCHITECTURE
    cls = META_ARCH_REGISTRY.get(arch)
    out = _drop_unknown_keys(cfg, get_cfg())
    out.defrost()
    if issubclass(cls, KDStudentMixin):
        out.MODEL.META_ARCHITECTURE = cls.student_meta_architecture
    out.MODEL.WEIGHTS = weights
    return out


def student_inference_cfg(cfg: CfgNode) -> CfgNode:
    """
    ``cfg`` (a kd_det config) with the distillation meta-architecture replaced by the
    student's plain one, so that ``build_model`` makes the student alone: no teacher
    (nor its weights), no adapters or self-teacher. Every other key (datasets,
    ``TEST.EVALUATOR``, ...) is kept, as evaluation reads them.
    """
    cls = META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    if not issubclass(cls, KDStudentMixin):
        return cfg
    out = cfg.clone()
    out.defrost()
    out.MODEL.META_ARCHITECTURE = cls.student_meta_architecture
    out.freeze()
    return out


def student_state_dict(checkpoint_model: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """The student's weights of a distillation checkpoint's ``model`` dict (``kd_*`` keys dropped)."""
    return {k: v for k, v in checkpoint_model.items() if not k.startswith(KDStudentMixin.kd_key_prefix)}


class StudentCheckpointer(DetectionCheckpointer):
    """
    Loads a distillation checkpoint into the bare student (:func:`student_inference_cfg`):
    its ``kd_*`` weights are dropped instead of being reported as unused keys.
    """

    def _load_model(self, checkpoint):
        checkpoint["model"] = student_state_dict(checkpoint["model"])
        return super()._load_model(checkpoint)


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def release_student(cfg: CfgNode, weights: str, output_dir: str,
                    name: str = "model_final") -> Dict[str, str]:
    """
    Write ``<name>.pth`` (student-only Detectron2 checkpoint) and ``config.yaml`` to ``output_dir``.

    Args:
        cfg: the training config (distillation or vanilla).
        weights: the training checkpoint (a Detectron2 ``.pth`` with a ``model`` dict).
    Returns:
        {"weights": path, "config": path, "sha256": hex digest of the weights file}.
    Raises:
        FileNotFoundError / ValueError naming the checkpoint when it is missing or not a Detectron2 checkpoint.
    """
    weights_out = _write_student_weights(weights, output_dir, name)
    config_out = os.path.join(output_dir, "config.yaml")
    with open(config_out, "w") as f:
        f.write(vanilla_student_config(cfg, weights_out).dump())
    return {"weights": weights_out, "config": config_out, "sha256": file_sha256(weights_out)}


def _write_student_weights(weights: str, output_dir: str, name: str) -> str:
    """Write ``output_dir/<name>.pth``: the student's weights of the training checkpoint ``weights``."""
    if not os.path.isfile(weights):
        raise FileNotFoundError("no checkpoint at {!r}: pass the training run's model_final.pth (or another "
                                "model_XXXXXXX.pth from its OUTPUT_DIR)".format(weights))
    try:
        ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    except Exception as e:
        raise ValueError("cannot read checkpoint {!r}: {}: {}".format(weights, type(e).__name__, e)) from e
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("model"), dict):
        raise ValueError("{!r} is not a Detectron2 training checkpoint (a dict with a 'model' state dict)".format(weights))
    os.makedirs(output_dir, exist_ok=True)
    weights_out = os.path.join(output_dir, name + ".pth")
    # iteration kept for provenance; optimizer/scheduler state are training-only
    student = {"model": student_state_dict(ckpt["model"]), "iteration": ckpt.get("iteration"),
               "__author__": "kd_det export_student"}
    atomic_write_bytes(weights_out, lambda f: torch.save(student, f))
    return weights_out


def release_lazy_student(cfg, weights: str, output_dir: str,
                         name: str = "model_final") -> Dict[str, str]:
    """
    :func:`release_student` for a LazyConfig: ``<name>.pth`` and ``config.yaml``
    (``LazyConfig.save``), whose ``model`` is the student's plain one
    (:func:`~kd_det.modeling.lazy_student.lazy_student_model`) and whose
    ``train.init_checkpoint`` is the released weights: vanilla Detectron2 builds it with
    ``instantiate(LazyConfig.load(path).model)``.
    """
    from detectron2.config import LazyConfig

    from ..modeling.lazy_student import lazy_student_model

    weights_out = _write_student_weights(weights, output_dir, name)
    released = copy.deepcopy(cfg)
    released.model = lazy_student_model(released.model)
    if "train" in released:
        released.train.init_checkpoint = weights_out
    config_out = os.path.join(output_dir, "config.yaml")
    LazyConfig.save(released, config_out)
    return {"weights": weights_out, "config": config_out, "sha256": file_sha256(weights_out)}

"""
Where a student's features differ from its teacher's: per image and imitated FPN level,
the feature-imitation loss as a map over positions, beside both features and (RetinaNet
with ``KD.PFI``) the prediction-guided weights, for ``tools/visualize_distillation.py``.
"""

from typing import Dict, List, Optional

import torch

from .meta_arch import DistillMixin

__all__ = ["distillation_maps", "check_distillation_model"]


def _activation(x: torch.Tensor) -> torch.Tensor:
    """(C, H, W) -> (H, W): root mean square over channels, the usual picture of a feature map."""
    return x.float().pow(2).mean(dim=0).sqrt()


def _uncrop(lmap: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(H', W') -> (H, W): a valid-window loss map (SSIM) back in its place, NaN around it."""
    out = lmap.new_full((height, width), float("nan"))
    top, left = (height - lmap.shape[0]) // 2, (width - lmap.shape[1]) // 2
    out[top : top + lmap.shape[0], left : left + lmap.shape[1]] = lmap
    return out


def check_distillation_model(model) -> None:
    """Raise ValueError, naming the fix, unless ``model`` is a one-teacher ``Distill*`` model
    imitating features."""
    if not isinstance(model, DistillMixin):
        raise ValueError(
            "{} has no teacher: distillation maps need a Distill* meta-architecture (a "
            "distillation config, not the teacher's or a released student's)".format(
                type(model).__name__
            )
        )
    if getattr(model, "kd_multi_teacher", None) is not None:
        raise ValueError(
            "KD.MULTI_TEACHER: each teacher has its own adapters and per-image weights; maps are "
            "drawn for one teacher only (use a config with KD.TEACHER alone)"
        )
    if model.kd_feature is None:
        raise ValueError(
            "the config imitates no features (KD.FEATURE.ENABLED is False): set it "
            "True, with KD.FEATURE.LOSS the loss to map, e.g. SSIMFeatureLoss"
        )


@torch.no_grad()
def distillation_maps(model, batched_inputs: List[Dict]) -> List[Dict]:
    """
    Args:
        model: a ``Distill*`` model with feature imitation (``KD.FEATURE``); it is
            run as it is (train or eval mode: BatchNorm statistics differ).
        batched_inputs: Detectron2 inputs, each computed alone (batch of one), so no
            padding of another image enters its maps.
    Returns:
        per image: ``{"levels": {name: {...}}, "loss": float}`` where each level has
        ``"teacher"``, ``"student"`` (H, W) CPU tensors, the root mean square over
        channels of the teacher's and the adapted student's features; ``"loss"``
        (H, W), the loss map averaged over channels (NaN where a valid-window loss
        has no value); ``"loss_mean"``, its mean (the level's unweighted loss);
        with PFI also ``"pfi"`` (H, W) and ``"pfi_loss"``, the PFI-weighted loss.
        ``"loss"`` of the image is ``KD.FEATURE.WEIGHT`` times the level-weighted
        sum: the image's ``loss_kd_<name>`` in training.
    """
    check_distillation_model(model)
    distiller = model.kd_feature
    results = []
    for one in batched_inputs:
        images = model.preprocess_image([one])
        features = model.backbone(images.tensor)
        teacher = model.teacher_features([one], images)[0]
        student = distiller.adapt(features)
        weights = _position_weights(model, features, teacher)
        levels, total = {}, 0.0
        for i, name in enumerate(distiller.levels):
            s, t = student[i], teacher[name].to(student[i].dtype)
            lmap = distiller.loss.loss_map(s.float(), t.float())[0].mean(dim=0)  # (H', W')
            height, width = s.shape[-2:]
            level = {
                "teacher": _activation(t[0]).cpu(),
                "student": _activation(s[0]).cpu(),
                "loss": _uncrop(lmap, height, width).cpu(),
                "loss_mean": float(lmap.mean()),
            }
            pw = None if weights is None else weights[i]
            if pw is not None:
                level["pfi"] = pw[0].float().cpu()
                level["pfi_loss"] = float(
                    distiller.loss.level_loss(s.float(), t.float(), pw.float())
                )
            levels[name] = level
            total += distiller.level_weights[i] * level.get("pfi_loss", level["loss_mean"])
        results.append({"levels": levels, "loss": distiller.weight * total})
    return results


def _position_weights(model, features, teacher_features) -> Optional[List[Optional[torch.Tensor]]]:
    """PFI's per-level (1, H, W) weights, as the RetinaNet student's forward computes them; None
    without PFI."""
    if not getattr(model, "pfi", False):
        return None
    student_logits = model.head([features[f] for f in model.head_in_features])[0]
    return model.pfi_weights(student_logits, model.teacher.dense_class_logits(teacher_features))

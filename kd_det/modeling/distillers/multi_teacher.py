"""Feature imitation of several teachers, weighted per image by a learned gate or by fixed weights.

The adaptive weighting follows adaptive multi-teacher distillation (Liu et al.,
AMTML-KD, 2020): each teacher has a learned latent vector; an image's importance
weights are the softmax over teachers of its (pooled, detached) student features,
embedded, dotted with each latent.
"""

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.utils.events import get_event_storage
from torch import nn

from .feature import Channels, FeatureDistiller, per_level_channels

__all__ = ["TeacherImportanceGate", "MultiTeacherDistiller"]


class TeacherImportanceGate(nn.Module):
    """
    Per-image teacher weights from the student's features:
    softmax_k(<relu(W pool(features)), z_k>).

    The input is detached: the gate learns which teacher to follow from the
    distillation loss, and never shapes the student's features itself.
    """

    def __init__(
        self, levels: List[str], channels: Channels, num_teachers: int, latent_dim: int = 64
    ):
        """
        Args:
            levels: the student's levels it pools (those of the feature distillers).
            channels: the student's channels per level, a dict or one int for every level.
            num_teachers: how many teachers it weighs.
            latent_dim: size of the embedding and of each teacher's latent vector.
        """
        super().__init__()
        self.levels = list(levels)
        channels = per_level_channels(channels, self.levels, "TeacherImportanceGate channels")
        self.embed = nn.Linear(sum(channels[k] for k in self.levels), latent_dim)
        self.teacher_latents = nn.Parameter(torch.randn(num_teachers, latent_dim) / latent_dim**0.5)

    def forward(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """features: name -> (N, C, H, W) -> (N, num_teachers) weights, each row summing to 1."""
        pooled = torch.cat(
            [F.adaptive_avg_pool2d(features[k].detach(), 1).flatten(1) for k in self.levels], dim=1
        )
        return torch.softmax(F.relu(self.embed(pooled)) @ self.teacher_latents.t(), dim=1)


class MultiTeacherDistiller(nn.Module):
    """
    One :class:`FeatureDistiller` per teacher (each with its own adapters), their losses
    combined per image: sum_k w_k(image) * loss_k(image), averaged over images.
    ``w`` comes from a :class:`TeacherImportanceGate` or is fixed.  The mean weight of
    each teacher is logged as ``kd_teacher<k>_weight``.
    """

    @configurable
    def __init__(
        self,
        *,
        distillers: Sequence[FeatureDistiller],
        gate: Optional[TeacherImportanceGate] = None,
        fixed_weights: Optional[Sequence[float]] = None
    ):
        """
        Args:
            distillers: one per teacher, in the order of the student's teachers (the first
                is ``teacher``, the others ``extra_teachers``).
            gate: per-image weights learned from the student's features; or
            fixed_weights: one non-negative weight per teacher (normalised to sum 1).
        """
        super().__init__()
        if (gate is None) == (fixed_weights is None):
            raise ValueError(
                "give MultiTeacherDistiller either a gate or fixed weights "
                "(KD.MULTI_TEACHER.FIXED_WEIGHTS), not {}".format(
                    "both" if gate is not None else "neither"
                )
            )
        self.distillers = nn.ModuleList(distillers)
        self.gate = gate
        if fixed_weights is not None:
            if (
                len(fixed_weights) != len(distillers)
                or any(w < 0 for w in fixed_weights)
                or sum(fixed_weights) <= 0
            ):
                raise ValueError(
                    "KD.MULTI_TEACHER.FIXED_WEIGHTS needs one non-negative weight per teacher "
                    "({}), not all zero; got {}".format(len(distillers), list(fixed_weights))
                )
            total = float(sum(fixed_weights))
            self.fixed_weights = [float(w) / total for w in fixed_weights]
        else:
            self.fixed_weights = None

    @classmethod
    def from_config(
        cls, cfg, student_shapes: Dict[str, ShapeSpec], teacher_shapes: List[Dict[str, ShapeSpec]]
    ):
        # the distillers first, then the gate: the order their random initialisation is drawn in
        distillers = [FeatureDistiller(cfg, student_shapes, shapes) for shapes in teacher_shapes]
        mt = cfg.KD.MULTI_TEACHER
        if mt.FIXED_WEIGHTS:
            return {"distillers": distillers, "fixed_weights": list(mt.FIXED_WEIGHTS)}
        levels = distillers[0].levels
        gate = TeacherImportanceGate(
            levels, {k: student_shapes[k].channels for k in levels}, len(distillers), mt.GATE_DIM
        )
        return {"distillers": distillers, "gate": gate}

    def teacher_weights(self, student_features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, num_teachers) per-image weights."""
        if self.gate is not None:
            return self.gate(student_features)
        ref = next(iter(student_features.values()))
        return torch.tensor(self.fixed_weights, dtype=ref.dtype, device=ref.device).expand(
            ref.shape[0], -1
        )

    def forward(
        self,
        student_features: Dict[str, torch.Tensor],
        teacher_features: List[Dict[str, torch.Tensor]],
    ) -> Dict[str, torch.Tensor]:
        """
        Args:
            student_features: name -> (N, C, H, W).
            teacher_features: per teacher, name -> (N, C_k, H, W).
        Returns:
            {"loss_kd_<loss>": weighted scalar}.
        """
        weights = self.teacher_weights(student_features)
        total: Dict[str, torch.Tensor] = {}
        for k, (distiller, feats) in enumerate(zip(self.distillers, teacher_features)):
            w = weights[:, k]
            if self.gate is None:
                # uniform within the batch: a plain weighted sum (and the fused SSIM path stays
                # usable)
                losses = {
                    name: self.fixed_weights[k] * v
                    for name, v in distiller(student_features, feats).items()
                }
            else:
                # per-image weights as position weights; the loss is sum_n w_n l_n / sum_n w_n,
                # times mean_n w_n gives sum_n w_n l_n / N
                pw = [
                    w[:, None, None].expand(-1, *student_features[lvl].shape[-2:])
                    for lvl in distiller.levels
                ]
                losses = {
                    name: w.mean() * v for name, v in distiller(student_features, feats, pw).items()
                }
            for name, v in losses.items():
                total[name] = total[name] + v if name in total else v
        try:
            storage = get_event_storage()
        except AssertionError:  # outside a training loop
            storage = None
        if storage is not None:
            for k in range(weights.shape[1]):
                storage.put_scalar("kd_teacher{}_weight".format(k), weights[:, k].mean().item())
        return total

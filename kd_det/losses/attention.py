"""
The non-directional activation map of LAKD (Local Attention Knowledge Distillation, Zhang et
al. 2024, "LAKD-Activation Mapping Distillation Based on Local Learning"), as kd_det uses it
to compare a student stage with the teacher's stage of the same depth.

The map of an (N, C, H, W) feature is channel-agnostic (a mean over channels), sign-free
(of ``|x|^p``: a feature and its negation have the same map, so no direction is imposed on
the student's channels) and coarse (average-pooled to ``map_size`` x ``map_size``).  Student
and teacher maps are compared after an L2 normalisation per image, so neither the channel
count nor the feature scale of either network matters, and no adapter is needed.
"""

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from .feature import FeatureLoss
from .registry import DISTILL_LOSS_REGISTRY

__all__ = ["NonDirectionalAttentionLoss", "non_directional_attention"]


def non_directional_attention(x: torch.Tensor, p: float = 2.0, map_size: int = 0) -> torch.Tensor:
    """
    The non-directional activation map of ``x``.

    Args:
        x: (N, C, H, W) features.
        p: exponent of ``|x|``; at least 1 (below 1 the gradient at 0 is infinite).
        map_size: S > 0 average-pools the map to (S, S) (``adaptive_avg_pool2d``); 0 keeps
            (H, W).
    Returns:
        (N, 1, S, S) (or (N, 1, H, W)): ``mean_c |x|^p``, pooled, divided by its L2 norm
        over positions (per image; a map of zeros stays zero).
    """
    a = (x * x if p == 2 else x.abs().pow(p)).mean(dim=1, keepdim=True)
    if map_size > 0:
        a = F.adaptive_avg_pool2d(a, map_size)
    return a / a.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]


@DISTILL_LOSS_REGISTRY.register()
class NonDirectionalAttentionLoss(FeatureLoss):
    """
    LAKD's activation-map loss: per image, ``||Q_s - Q_t||^2`` summed over the S x S
    positions of the two maps of :func:`non_directional_attention` (unit L2 norm each, and
    non-negative, so the value is ``2 - 2 cos`` in [0, 2]), averaged over images and
    weighted over levels as every :class:`FeatureLoss`.  Student and teacher may differ in
    channels, not in (H, W) (stages of equal stride).

    (Attention transfer, :class:`AttentionTransferLoss`, is the case p = 2 without pooling.)
    """

    short_name = "lakd"
    needs_equal_channels = False

    @configurable
    def __init__(self, *, p: float = 2.0, map_size: int = 8):
        """
        Args:
            p: exponent of ``|x|`` (``KD.LAKD.P``), >= 1.
            map_size: side S of the pooled map (``KD.LAKD.MAP_SIZE``); 0: no pooling.
        """
        if not p >= 1:
            raise ValueError("KD.LAKD.P (p) must be at least 1, got {}".format(p))
        if map_size < 0:
            raise ValueError("KD.LAKD.MAP_SIZE (map_size) must be >= 0, got {}".format(map_size))
        self.p = float(p)
        self.map_size = int(map_size)

    @classmethod
    def from_config(cls, cfg):
        return {"p": cfg.KD.LAKD.P, "map_size": cfg.KD.LAKD.MAP_SIZE}

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, 1, S, S), see :func:`non_directional_attention`."""
        return non_directional_attention(x, self.p, self.map_size)

    def loss_map(self, student, teacher):
        qs, qt = self.attention(student), self.attention(teacher)
        # times S*S: the mean over positions (the base class's reduction) is then the sum
        return (qs - qt).pow(2) * (qs.shape[-2] * qs.shape[-1])

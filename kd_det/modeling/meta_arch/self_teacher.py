"""FRSKD's self-teacher: a BiFPN-style refinement of the student's own feature pyramid.

Feature Refinement via Self-Knowledge Distillation (Ji et al., CVPR 2021): an
auxiliary network reads the student's features, refines them through a top-down and
a bottom-up path, and its outputs serve as the distillation target.  It is trained
on the ground truth through its own detection head, needs no teacher checkpoint and
is dropped at export (it lives under a ``kd_`` key).
"""

from typing import Dict, List, Mapping, Union

import torch
import torch.nn.functional as F
from detectron2.config import configurable
from detectron2.layers import ShapeSpec, get_norm
from torch import nn

__all__ = ["FastNormalizedFusion", "SeparableConvBlock", "BiFPNSelfTeacher"]


class FastNormalizedFusion(nn.Module):
    """
    EfficientDet's fast normalised fusion: sum_i w_i x_i / (sum_i w_i + eps) with
    learned w_i >= 0 (ReLU), cheaper than a softmax over the weights.
    """

    def __init__(self, num_inputs: int, eps: float = 1e-4):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_inputs))
        self.eps = eps

    def forward(self, inputs: List[torch.Tensor]) -> torch.Tensor:
        """inputs: tensors of one shape (N, C, H, W) -> their fused (N, C, H, W)."""
        w = F.relu(self.weight)
        w = w / (w.sum() + self.eps)
        return sum(wi * x for wi, x in zip(w, inputs))


class SeparableConvBlock(nn.Sequential):
    """Depthwise 3x3 conv, pointwise 1x1 conv, norm, ReLU: (N, C, H, W) -> (N, C, H, W)."""

    def __init__(self, channels: int, norm: str):
        super().__init__(
            nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            nn.Conv2d(channels, channels, 1, bias=not norm),
            get_norm(norm, channels) or nn.Identity(),
            nn.ReLU(inplace=True),
        )


def _shape_spec(input_shapes, level: str) -> ShapeSpec:
    """Level ``level`` of :class:`BiFPNSelfTeacher`'s ``input_shapes`` (stride None: not given)."""
    if isinstance(input_shapes, int):
        return ShapeSpec(channels=input_shapes)
    if level not in input_shapes:
        raise ValueError(
            "the self-teacher's input_shapes give no level {!r} (they have {})".format(
                level, sorted(input_shapes)
            )
        )
    shape = input_shapes[level]
    return ShapeSpec(channels=int(shape)) if isinstance(shape, int) else shape


def _resize_to(x: torch.Tensor, like: torch.Tensor, mode: str) -> torch.Tensor:
    """``x`` resampled to the spatial size of ``like``: nearest upsampling, or max-pool
    downsampling."""
    size = like.shape[-2:]
    if x.shape[-2:] == size:
        return x
    if mode == "down":
        x = F.max_pool2d(x, kernel_size=3, stride=2, padding=1)
        if x.shape[-2:] == size:
            return x
    return F.interpolate(x, size=size, mode="nearest")


class BiFPNSelfTeacher(nn.Module):
    """
    Self-teacher over the student's pyramid ``in_features`` (fine to coarse):

    * lateral 1x1 conv + norm, C_l -> ``width`` channels (FRSKD's w x c_i);
    * top-down path: T_l = conv(fuse(L_l, up(T_{l+1}))), T_top = L_top;
    * bottom-up path: O_l = conv(fuse(L_l, T_l, down(O_{l-1}))), O_bottom = T_bottom,
      O_top = conv(fuse(L_top, down(O_{top-1})));

    with fast normalised fusion and depthwise-separable convs.  Outputs the refined
    maps O_l, (N, width, H_l, W_l), under the input names.
    """

    @configurable
    def __init__(
        self,
        *,
        in_features: List[str],
        input_shapes: Union[int, Mapping[str, Union[ShapeSpec, int]]],
        width: int,
        norm: str = "GN"
    ):
        """
        Args:
            in_features: pyramid levels, finest first (e.g. p2..p6 or p3..p7).
            input_shapes: the student backbone's output shapes; or, where they are not known
                (a LazyConfig), its channels: per level, or one int for every level (the
                student checks them, and gives the strides, when it is built).
            width: channels of every refined map.
            norm: Detectron2 norm name for the lateral and fused convs ("GN", "BN", "SyncBN", "").
        """
        super().__init__()
        if len(in_features) < 2:
            raise ValueError(
                "the self-teacher needs at least two pyramid levels, got {}".format(in_features)
            )
        shapes = {f: _shape_spec(input_shapes, f) for f in in_features}
        strides = [shapes[f].stride for f in in_features]
        self.in_features = list(in_features)
        self._check_order(strides)
        self._strides = dict(zip(in_features, strides))
        self.input_channels = {f: shapes[f].channels for f in in_features}
        self.width = width
        n = len(in_features)
        self.lateral = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(shapes[f].channels, width, 1, bias=not norm),
                get_norm(norm, width) or nn.Identity(),
            )
            for f in in_features
        )
        # top-down: levels n-2 .. 0; bottom-up: levels 1 .. n-1
        self.td_fuse = nn.ModuleList(FastNormalizedFusion(2) for _ in range(n - 1))
        self.td_conv = nn.ModuleList(SeparableConvBlock(width, norm) for _ in range(n - 1))
        self.bu_fuse = nn.ModuleList(
            FastNormalizedFusion(3 if i < n - 1 else 2) for i in range(1, n)
        )
        self.bu_conv = nn.ModuleList(SeparableConvBlock(width, norm) for _ in range(n - 1))

    @classmethod
    def from_config(cls, cfg, input_shapes: Dict[str, ShapeSpec], default_features: List[str]):
        in_features = list(cfg.KD.SELF.IN_FEATURES) or list(default_features)
        missing = [f for f in in_features if f not in input_shapes]
        if missing:
            raise ValueError(
                "KD.SELF.IN_FEATURES {} are not student backbone outputs ({})".format(
                    missing, sorted(input_shapes)
                )
            )
        channels = max(input_shapes[f].channels for f in in_features)
        return {
            "in_features": in_features,
            "input_shapes": input_shapes,
            "width": int(round(cfg.KD.SELF.WIDTH_MULTIPLIER * channels)),
            "norm": cfg.KD.SELF.NORM,
        }

    def _check_order(self, strides: List) -> None:
        if None not in strides and strides != sorted(strides):
            raise ValueError(
                "KD.SELF.IN_FEATURES must go from fine to coarse; strides {} of "
                "{}".format(strides, self.in_features)
            )

    def check_student(self, shapes: Dict[str, ShapeSpec]) -> None:
        """
        Raise unless the student's backbone (``shapes``, its ``output_shape()``) outputs the
        levels and channels this self-teacher was built for; takes its strides.
        """
        missing = [f for f in self.in_features if f not in shapes]
        if missing:
            raise ValueError(
                "self_teacher levels {} are not student backbone outputs ({})".format(
                    missing, sorted(shapes)
                )
            )
        self._check_order([shapes[f].stride for f in self.in_features])
        for f in self.in_features:
            if self.input_channels[f] != shapes[f].channels:
                raise ValueError(
                    "self_teacher was built for {} channels at level {!r}, but the "
                    "student's backbone outputs {}: set its input_shapes={}".format(
                        self.input_channels[f], f, shapes[f].channels, shapes[f].channels
                    )
                )
        self._strides = {f: shapes[f].stride for f in self.in_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            f: ShapeSpec(channels=self.width, stride=self._strides[f]) for f in self.in_features
        }

    def forward(self, features: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """features: name -> (N, C_l, H_l, W_l) -> refined name -> (N, width, H_l, W_l)."""
        lat = [conv(features[f]) for conv, f in zip(self.lateral, self.in_features)]
        n = len(lat)
        td = [None] * n
        td[-1] = lat[-1]
        for i in range(n - 2, -1, -1):
            td[i] = self.td_conv[i](self.td_fuse[i]([lat[i], _resize_to(td[i + 1], lat[i], "up")]))
        out = [None] * n
        out[0] = td[0]
        for i in range(1, n):
            down = _resize_to(out[i - 1], lat[i], "down")
            inputs = [lat[i], td[i], down] if i < n - 1 else [lat[i], down]
            out[i] = self.bu_conv[i - 1](self.bu_fuse[i - 1](inputs))
        return dict(zip(self.in_features, out))

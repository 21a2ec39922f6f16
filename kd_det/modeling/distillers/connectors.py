"""Connectors: the student-side 1x1 convolutions that map student features to teacher channels."""

from typing import Dict, List, Sequence

import torch
from torch import nn

__all__ = ["Connector", "CONNECTOR_MODES"]

# Which levels get a 1x1 conv (KD.FEATURE.ADAPTER), given (student channels, teacher channels,
# whether the loss compares channel by channel).
CONNECTOR_MODES = {
    "auto": lambda cs, ct, needs_equal: cs != ct and needs_equal,
    "conv1x1": lambda cs, ct, needs_equal: True,
    "none": lambda cs, ct, needs_equal: False,
}


class Connector(nn.ModuleDict):
    """
    Per-level 1x1 convolutions from the student's channels to the teacher's, trained with
    the student and dropped at export.  A ``ModuleDict`` from level name to conv, holding
    only the levels that have one, so its ``state_dict`` keys are ``<level>.weight`` and
    ``<level>.bias`` (``kd_feature.adapters.p3.weight`` on a FeatureDistiller, as in every
    checkpoint kd_det has written).

    Every conv is initialised alike: Kaiming-uniform weights (a=1, i.e. gain 1 for a linear
    map) and zero bias, after PyTorch's default initialisation has run (its random draws
    come first, so the order of random numbers is that of a plain ``nn.Conv2d``).
    """

    def __init__(
        self,
        student_channels: Dict[str, int],
        teacher_channels: Dict[str, int],
        levels: Sequence[str],
        mode: str = "auto",
        needs_equal_channels: bool = True,
    ):
        """
        Args:
            student_channels, teacher_channels: channels of each level.
            levels: the levels to connect, in order (convs are created in this order).
            mode: "auto" (a conv where channels differ), "conv1x1" (always) or "none" (never).
            needs_equal_channels: whether the loss behind compares channel by channel; if not,
                "auto" adds no conv and differing channels are no error.
        Raises:
            ValueError: an unknown mode, or "none" where channels differ and must be equal.
        """
        super().__init__()
        if mode not in CONNECTOR_MODES:
            raise ValueError(
                "KD.FEATURE.ADAPTER must be 'auto', 'conv1x1' or 'none', got " "{!r}".format(mode)
            )
        for name in levels:
            cs, ct = student_channels[name], teacher_channels[name]
            if CONNECTOR_MODES[mode](cs, ct, needs_equal_channels):
                self[name] = self.make_conv(cs, ct)
            elif cs != ct and needs_equal_channels:
                raise ValueError(
                    "level {!r}: student has {} channels, teacher {}; set "
                    "KD.FEATURE.ADAPTER to 'auto' or 'conv1x1' to learn a 1x1 "
                    "adapter".format(name, cs, ct)
                )

    @staticmethod
    def make_conv(in_channels: int, out_channels: int) -> nn.Conv2d:
        """The one 1x1 conv of every connector, initialised as the class says."""
        conv = nn.Conv2d(in_channels, out_channels, kernel_size=1)
        nn.init.kaiming_uniform_(conv.weight, a=1)
        nn.init.zeros_(conv.bias)
        return conv

    def forward(
        self, features: Dict[str, torch.Tensor], levels: Sequence[str]
    ) -> List[torch.Tensor]:
        """
        Args:
            features: name -> (N, C_s, H, W).
            levels: the levels to return, in order.
        Returns:
            per level, (N, C_t, H, W) through its conv, or the feature itself where there is none.
        """
        return [self[k](features[k]) if k in self else features[k] for k in levels]

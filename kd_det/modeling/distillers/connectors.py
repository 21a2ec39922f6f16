"""
Connectors: the student-side modules between the student's features and a feature loss: the
1x1 convolutions that map student features to teacher channels (:class:`Connector`), and
MGD's masked generation blocks (:class:`MaskedGenerator`).
"""

from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

__all__ = ["Connector", "CONNECTOR_MODES", "MaskedGenerator"]

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


class MaskedGenerator(nn.ModuleDict):
    """
    MGD's generation (Yang et al., ECCV 2022; mmrazor's ``MGDConnector``): per level, a random
    spatial mask zeroes each position of each image with probability ``mask_ratio`` (the same
    positions in every channel), then a block conv-ReLU-conv (``kernel_size``, padding to keep
    H, W) generates a full feature from what is left, to be compared with the teacher's.
    Trained with the student and dropped at export (a distiller's module, under ``kd_``).

    A ``ModuleDict`` from level name to ``nn.Sequential(conv, ReLU, conv)``: state_dict keys
    ``<level>.0.weight``, ``<level>.2.bias``... (PyTorch's default initialisation, as MGD's).
    """

    def __init__(
        self,
        channels: Dict[str, int],
        levels: Sequence[str],
        mask_ratio: float = 0.65,
        kernel_size: int = 3,
        hidden_channels: int = 0,
    ):
        """
        Args:
            channels: the teacher's channels of each level (the adapted student's).
            levels: the levels to generate, in order (blocks are created in this order).
            mask_ratio: probability that a position is masked (MGD's lambda), in [0, 1).
            kernel_size: the two convs' kernel size, odd.
            hidden_channels: channels between the two convs; 0 means the level's own.
        """
        super().__init__()
        if not 0 <= mask_ratio < 1:
            raise ValueError("KD.MGD.MASK_RATIO must be in [0, 1), got {}".format(mask_ratio))
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError("KD.MGD.KERNEL_SIZE must be odd, got {}".format(kernel_size))
        if hidden_channels < 0:
            raise ValueError(
                "KD.MGD.HIDDEN_CHANNELS must be >= 0 (0: the level's channels), got "
                "{}".format(hidden_channels)
            )
        self.mask_ratio = float(mask_ratio)
        pad = kernel_size // 2
        for name in levels:
            c = channels[name]
            hidden = hidden_channels or c
            self[name] = nn.Sequential(
                nn.Conv2d(c, hidden, kernel_size, padding=pad),
                nn.ReLU(inplace=True),
                nn.Conv2d(hidden, c, kernel_size, padding=pad),
            )

    def mask(self, x: torch.Tensor, rng: Optional[torch.Generator] = None) -> torch.Tensor:
        """
        Args:
            x: (N, C, H, W).
            rng: the random-number generator to draw from (default: PyTorch's global one; the
                masks then follow ``torch.manual_seed`` / Detectron2's ``SEED``).
        Returns:
            (N, 1, H, W) of x's dtype: 0 where masked (probability ``mask_ratio``), else 1.
        """
        n, _, h, w = x.shape
        draw = torch.rand((n, 1, h, w), generator=rng, device=x.device)
        return (draw >= self.mask_ratio).to(x.dtype)

    def forward(
        self,
        features: Sequence[torch.Tensor],
        levels: Sequence[str],
        rng: Optional[torch.Generator] = None,
    ) -> List[torch.Tensor]:
        """
        Args:
            features: per level of ``levels``, the (adapted) student's (N, C, H, W).
            rng: the masks' random-number generator (default: PyTorch's global one).
        Returns:
            per level, the generated (N, C, H, W).
        """
        return [self[k](x * self.mask(x, rng)) for k, x in zip(levels, features)]

"""Structural similarity (SSIM) between feature maps, in PyTorch.

SSIM is computed per (image, channel) map with a Gaussian window applied as two
separable 1-D depthwise convolutions without padding ("valid"), like
``skimage.metrics.structural_similarity(gaussian_weights=True,
use_sample_covariance=False)`` and pytorch-msssim: border positions whose window
would leave the map are not scored.  A map smaller than the window along an axis
uses the largest odd window that fits (same sigma, renormalised), so every FPN
level, P6/P7 of small inputs included, gets a score.
"""

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = ["gaussian_window_1d", "effective_window_sizes", "ssim_map", "minmax_normalize"]


def gaussian_window_1d(size: int, sigma: float, device=None, dtype=torch.float32) -> torch.Tensor:
    """A normalised 1-D Gaussian of odd length ``size`` centred on its middle tap. Shape (size,)."""
    if size < 1 or size % 2 == 0:
        raise ValueError("SSIM window size must be a positive odd number, got {}".format(size))
    coords = torch.arange(size, device=device, dtype=torch.float64) - (size - 1) / 2.0
    g = torch.exp(-(coords**2) / (2.0 * sigma * sigma))
    return (g / g.sum()).to(dtype)


def effective_window_sizes(height: int, width: int, window_size: int) -> Tuple[int, int]:
    """The window used along each axis: ``window_size``, or the largest odd size that fits."""

    def fit(n):
        return window_size if n >= window_size else max(1, n if n % 2 == 1 else n - 1)

    return fit(height), fit(width)


def minmax_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Rescale every (n, c) map of an (N, C, H, W) tensor to [0, 1]. Differentiable."""
    flat = x.flatten(2)
    lo = flat.amin(dim=2, keepdim=True)
    hi = flat.amax(dim=2, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(eps)).view_as(x)


def _separable_blur(x: torch.Tensor, win_h: torch.Tensor, win_w: torch.Tensor) -> torch.Tensor:
    """Valid Gaussian blur of every channel of (N, C, H, W) -> (N, C, H-kh+1, W-kw+1)."""
    c = x.shape[1]
    x = F.conv2d(x, win_w.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, win_h.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    c1: float = 0.01**2,
    c2: float = 0.03**2,
) -> torch.Tensor:
    """
    Local SSIM between ``x`` and ``y``.

    Args:
        x, y: (N, C, H, W) tensors of the same shape.
        window_size, sigma: the Gaussian window.
        c1, c2: stability constants; scalars, or tensors broadcastable to
            (N, C, 1, 1) (per-map constants).

    Returns:
        (N, C, H - kh + 1, W - kw + 1) SSIM values, with (kh, kw) from
        :func:`effective_window_sizes`.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError("ssim_map expects two (N, C, H, W) tensors of one shape, got {} and {}".format(
            tuple(x.shape), tuple(y.shape)))
    n, c, h, w = x.shape
    kh, kw = effective_window_sizes(h, w, window_size)
    win_h = gaussian_window_1d(kh, sigma, x.device, x.dtype)
    win_w = gaussian_window_1d(kw, sigma, x.device, x.dtype)

    # Five blurs rather than one over the concatenated maps: on the CPU the concatenated
    # grouped convolution measured 1.6x slower (and it copies all five maps).
    mu_x, mu_y, e_xx, e_yy, e_xy = (_separable_blur(m, win_h, win_w) for m in (x, y, x * x, y * y, x * y))
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    sigma_xx = e_xx - mu_xx
    sigma_yy = e_yy - mu_yy
    sigma_xy = e_xy - mu_xy
    num = (2 * mu_xy + c1) * (2 * sigma_xy + c2)
    den = (mu_xx + mu_yy + c1) * (sigma_xx + sigma_yy + c2)
    return num / den

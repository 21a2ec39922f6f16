"""Structural similarity (SSIM) between feature maps, in PyTorch.

SSIM is computed per (image, channel) map with a Gaussian window applied as two
separable 1-D depthwise convolutions without padding ("valid"), like
``skimage.metrics.structural_similarity(gaussian_weights=True,
use_sample_covariance=False)`` and pytorch-msssim: border positions whose window
would leave the map are not scored.  A map smaller than the window along an axis
uses the largest odd window that fits (same sigma, renormalised), so every FPN
level, P6/P7 of small inputs included, gets a score.
"""

from typing import Sequence, Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "gaussian_window_1d",
    "effective_window_sizes",
    "ssim_map",
    "minmax_normalize",
    "FULL_SSIM",
    "check_exponents",
]

#: (luminance, contrast, structure) exponents of the usual SSIM
FULL_SSIM = (1.0, 1.0, 1.0)


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


def check_exponents(exponents: Sequence[float]) -> Tuple[float, float, float]:
    """``exponents`` as a (luminance, contrast, structure) tuple; ValueError unless three,
    >= 0, one > 0."""
    values = tuple(float(e) for e in exponents)
    if len(values) != 3 or min(values) < 0 or max(values) == 0:
        raise ValueError(
            "KD.SSIM.EXPONENTS must be three non-negative exponents (luminance, contrast, "
            "structure), not all 0, e.g. [1.0, 1.0, 1.0] for SSIM or [0.0, 0.0, 1.0] for its "
            "structure term alone; got {}".format(list(exponents))
        )
    return values


class _SqrtBoundedGrad(torch.autograd.Function):
    """sqrt(x) of x >= 0, exact; its gradient 1 / (2 sqrt(x)) is taken at max(sqrt(x), floor)."""

    @staticmethod
    def forward(ctx, x, floor):
        root = x.clamp_min(0).sqrt()
        ctx.save_for_backward(root, floor)
        return root

    @staticmethod
    def backward(ctx, grad):
        root, floor = ctx.saved_tensors
        return grad / (2 * torch.maximum(root, floor)), None


def _power(x: torch.Tensor, exponent: float) -> torch.Tensor:
    """x ** exponent, sign kept (structure and, on raw features, luminance can be negative)."""
    if exponent == 1.0:
        return x
    if float(exponent).is_integer():
        return x.pow(exponent)
    return x.sign() * x.abs().pow(exponent)


def _components(mu_xx, mu_yy, mu_xy, sigma_xx, sigma_yy, sigma_xy, c1, c2, exponents):
    """l^a * c^b * s^g (Wang et al. 2004, with C3 = C2 / 2), computing only the terms used."""
    a, b, g = exponents
    c3 = c2 / 2
    out = 1.0
    if a:
        out = out * _power((2 * mu_xy + c1) / (mu_xx + mu_yy + c1), a)
    if b == g:  # c * s = (2 sigma_xy + C2) / (sigma_x^2 + sigma_y^2 + C2): no square root
        return out * _power((2 * sigma_xy + c2) / (sigma_xx + sigma_yy + c2), b) if b else out
    # sigma_x * sigma_y; below C3 (which dominates the structure term's denominator there) the
    # square root's unbounded gradient at 0 is capped, its value is not
    floor = torch.as_tensor(c3, dtype=sigma_xx.dtype, device=sigma_xx.device)
    sigma_x_sigma_y = _SqrtBoundedGrad.apply(sigma_xx.clamp_min(0) * sigma_yy.clamp_min(0), floor)
    if b:
        out = out * _power((2 * sigma_x_sigma_y + c2) / (sigma_xx + sigma_yy + c2), b)
    if g:
        out = out * _power((sigma_xy + c3) / (sigma_x_sigma_y + c3), g)
    return out


def ssim_map(
    x: torch.Tensor,
    y: torch.Tensor,
    window_size: int = 11,
    sigma: float = 1.5,
    c1: float = 0.01**2,
    c2: float = 0.03**2,
    exponents: Sequence[float] = FULL_SSIM,
) -> torch.Tensor:
    """
    Local SSIM between ``x`` and ``y``.

    Args:
        x, y: (N, C, H, W) tensors of the same shape.
        window_size, sigma: the Gaussian window.
        c1, c2: stability constants; scalars, or tensors broadcastable to
            (N, C, 1, 1) (per-map constants).
        exponents: (alpha, beta, gamma) of the luminance, contrast and structure
            terms, SSIM = l^alpha * c^beta * s^gamma (Wang et al. 2004, C3 = C2 / 2);
            (1, 1, 1) is the usual SSIM, (0, 0, 1) its structure term alone.

    Returns:
        (N, C, H - kh + 1, W - kw + 1) SSIM values, with (kh, kw) from
        :func:`effective_window_sizes`.
    """
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            "ssim_map expects two (N, C, H, W) tensors of one shape, got {} and {}".format(
                tuple(x.shape), tuple(y.shape)
            )
        )
    n, c, h, w = x.shape
    kh, kw = effective_window_sizes(h, w, window_size)
    win_h = gaussian_window_1d(kh, sigma, x.device, x.dtype)
    win_w = gaussian_window_1d(kw, sigma, x.device, x.dtype)

    # Five blurs rather than one over the concatenated maps: on the CPU the concatenated
    # grouped convolution measured 1.6x slower (and it copies all five maps).
    mu_x, mu_y, e_xx, e_yy, e_xy = (
        _separable_blur(m, win_h, win_w) for m in (x, y, x * x, y * y, x * y)
    )
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    sigma_xx = e_xx - mu_xx
    sigma_yy = e_yy - mu_yy
    sigma_xy = e_xy - mu_xy
    exponents = check_exponents(exponents)
    if exponents != FULL_SSIM:
        return _components(mu_xx, mu_yy, mu_xy, sigma_xx, sigma_yy, sigma_xy, c1, c2, exponents)
    num = (2 * mu_xy + c1) * (2 * sigma_xy + c2)
    den = (mu_xx + mu_yy + c1) * (sigma_xx + sigma_yy + c2)
    return num / den

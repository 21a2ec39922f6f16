"""
Losses in at least single precision under mixed-precision training (``SOLVER.AMP``).

Autocast hands the losses float16/bfloat16 student features and logits and would run
their convolutions in half precision too. SSIM's local variances are differences of
nearly equal window means (E[x^2] - E[x]^2), which half precision cancels: measured on
the CPU, the PyTorch SSIM path's gradient under float16 autocast was 6-8% off, under
bfloat16 up to 15%. The losses therefore promote their inputs and turn autocast off.
"""

import contextlib

import torch

__all__ = ["at_least_fp32", "full_precision"]


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """Half-precision tensors promoted to float32; float32 and float64 unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def full_precision(x: torch.Tensor):
    """A context in which autocast leaves ``x``'s device type alone (a no-op where it is not
    active)."""
    if not torch.is_autocast_enabled(x.device.type):
        return contextlib.nullcontext()
    return torch.autocast(x.device.type, enabled=False)

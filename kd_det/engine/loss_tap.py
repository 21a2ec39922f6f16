"""
A place between a training forward and its backward: the loss dict as the model returns it.

Detectron2's trainers (``SimpleTrainer``, ``AMPTrainer``, kd_det's
``GradientAccumulationTrainer``) call the model and back-propagate the sum of its loss dict in
one ``run_step``; no hook runs in between.  A forward hook on the (unwrapped) model does: it
sees the loss dict with its graph alive, before DDP's post-forward and before any backward,
and may return a changed dict (re-weighted terms), which the trainer then sums and logs.
"""

from typing import Callable, Dict, Optional

import torch
from torch.nn.parallel import DistributedDataParallel

__all__ = ["unwrap_model", "LossDictTap"]

LossFn = Callable[[Dict[str, torch.Tensor]], Optional[Dict[str, torch.Tensor]]]


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module inside a DistributedDataParallel wrapper (``model`` itself otherwise)."""
    return model.module if isinstance(model, DistributedDataParallel) else model


class LossDictTap:
    """
    Calls ``fn(loss_dict)`` after every training forward of ``model`` (inference forwards,
    whose output is not a dict of losses, are left alone); a dict ``fn`` returns replaces the
    loss dict.  Attach with :meth:`attach`, remove with :meth:`detach`.
    """

    def __init__(self, fn: LossFn):
        self._fn = fn
        self._handle = None

    def attach(self, model: torch.nn.Module) -> None:
        self.detach()
        self._handle = unwrap_model(model).register_forward_hook(self._hook)

    def detach(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _hook(self, module, inputs, output):
        if not (module.training and isinstance(output, dict) and torch.is_grad_enabled()):
            return None
        ret = self._fn(output)
        return output if ret is None else ret

"""Pieces for training from Detectron2 LazyConfigs (``tools/lazyconfig_train_net.py``)."""

from typing import Iterable, Union

import torch
from detectron2.config import CfgNode
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.registry import locate

__all__ = ["clipped_optimizer"]


def clipped_optimizer(optimizer_class: Union[str, type], params: Iterable, clip_type: str = "norm",
                      clip_value: float = 1.0, norm_type: float = 2.0, **optimizer_kwargs) -> torch.optim.Optimizer:
    """
    ``optimizer_class(params, **optimizer_kwargs)`` with Detectron2's gradient clipping
    (yacs ``SOLVER.CLIP_GRADIENTS``: "value" or "norm", per parameter), which a
    LazyConfig's ``optimizer`` otherwise cannot express::

        optimizer = L(clipped_optimizer)(optimizer_class="torch.optim.AdamW",
                                         params=L(get_default_optimizer_params)(), lr=1e-3,
                                         clip_type="norm", clip_value=5.0)

    Args:
        optimizer_class: a torch optimizer class, or its dotted name (which keeps the
            saved config.yaml loadable).
    """
    cls = locate(optimizer_class) if isinstance(optimizer_class, str) else optimizer_class
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError("optimizer_class={!r} is not a torch.optim.Optimizer class".format(optimizer_class))
    if clip_type not in ("value", "norm"):
        raise ValueError("clip_type={!r}: Detectron2 clips gradients by 'value' or 'norm'".format(clip_type))
    clip = CfgNode({"SOLVER": {"CLIP_GRADIENTS": {"ENABLED": True, "CLIP_TYPE": clip_type,
                                                  "CLIP_VALUE": float(clip_value), "NORM_TYPE": float(norm_type)}}})
    return maybe_add_gradient_clipping(clip, cls)(params, **optimizer_kwargs)

"""One registry for every distillation loss, and the interface they share.

A distillation loss compares what the student computed with what its teacher computed
(features, class logits, channel statistics).  Every loss, of every kind, is a class in
:data:`DISTILL_LOSS_REGISTRY` with one interface:

* it is built from explicit keyword arguments, or from a config through ``@configurable``
  (``cls(cfg)`` calls its ``from_config``);
* ``short_name`` names its entry in the loss dict, ``loss_kd_<short_name>``;
* ``loss(student, teacher, **inputs)`` returns a scalar; the teacher's side is a constant,
  and ``inputs`` are the named extra inputs the loss needs (level weights, anchor matches,
  a head to judge features with...);
* it holds no parameters and no state (adapters and weights belong to the distillers).

The pure functions beside each class (:func:`~kd_det.losses.rank_mimicking_loss`, ...) are
the tested maths; the classes call them.
"""

from typing import Any, Type

import torch
from detectron2.utils.registry import Registry

__all__ = [
    "DISTILL_LOSS_REGISTRY",
    "DistillLoss",
    "build_distill_loss",
    "distill_loss_class",
    "loss_names",
]

DISTILL_LOSS_REGISTRY = Registry("KD_DISTILL_LOSS")
DISTILL_LOSS_REGISTRY.__doc__ = """
Every distillation loss (feature, prediction, statistics), registered by class name.
Each is a :class:`DistillLoss`; the distillers build theirs with :func:`build_distill_loss`.
Register a new one with ``@DISTILL_LOSS_REGISTRY.register()``.
"""


class DistillLoss:
    """Base class of every registered distillation loss (see the module's docstring)."""

    #: suffix of the loss-dict key, ``loss_kd_<short_name>``
    short_name = "kd"
    #: what it compares ("feature", "prediction", "statistics"): for error messages
    kind = ""

    def __call__(self, student: Any, teacher: Any, **inputs) -> torch.Tensor:
        """
        Args:
            student: what the student computed (the loss's class says which shapes).
            teacher: the teacher's counterpart, treated as a constant.
            inputs: named extra inputs of this loss.
        Returns:
            scalar tensor.
        """
        raise NotImplementedError


def loss_names(base: Type[DistillLoss] = DistillLoss):
    """The registered names of the losses of kind ``base`` (every loss by default), sorted."""
    return sorted(k for k, cls in DISTILL_LOSS_REGISTRY if issubclass(cls, base))


def distill_loss_class(
    name: str, base: Type[DistillLoss] = DistillLoss, key: str = ""
) -> Type[DistillLoss]:
    """
    The registered loss class ``name``.

    Args:
        base: the kind of loss the caller can use (e.g. :class:`FeatureLoss`); a loss of
            another kind is refused with the names that fit.
        key: the config key that named the loss, for error messages.
    Raises:
        KeyError: unknown name; ValueError: a loss of another kind.
    """
    what = key or "distillation loss"
    try:
        cls = DISTILL_LOSS_REGISTRY.get(name)
    except KeyError:
        raise KeyError(
            "unknown {} {!r}; registered {} losses: {}. Register new ones with "
            "@kd_det.losses.DISTILL_LOSS_REGISTRY.register()".format(
                what, name, base.kind or "distillation", loss_names(base)
            )
        ) from None
    if not issubclass(cls, base):
        raise ValueError(
            "{} {!r} is a {} loss, but {} takes a {} loss: one of {}".format(
                what,
                name,
                cls.kind or "different",
                what,
                base.kind or base.__name__,
                loss_names(base),
            )
        )
    return cls


def build_distill_loss(
    name: str, cfg=None, *, base: Type[DistillLoss] = DistillLoss, key: str = "", **kwargs
) -> DistillLoss:
    """
    The registered loss ``name`` (see :func:`distill_loss_class`), built from ``cfg`` (its
    ``from_config``) or, without a config, from the explicit ``kwargs``.
    """
    cls = distill_loss_class(name, base, key)
    return cls(cfg) if cfg is not None else cls(**kwargs)

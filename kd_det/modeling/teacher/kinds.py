"""
Kinds of teacher, keyed by the scheme of ``KD.TEACHER.CONFIG``: ``torchvision://NAME`` is one
kind, a path or Detectron2 model-zoo name (no scheme) another.  Each kind registers a builder
with :func:`build_teacher`'s arguments that returns a
:class:`~kd_det.modeling.teacher.FrozenTeacher`.
"""

import re
from typing import Callable

from detectron2.utils.registry import Registry

__all__ = ["TEACHER_KIND_REGISTRY", "register_teacher_kind", "teacher_kind", "teacher_kind_builder"]

TEACHER_KIND_REGISTRY = Registry("TEACHER_KIND")
TEACHER_KIND_REGISTRY.__doc__ = """
Teacher builders by the scheme of their config ("" for Detectron2 configs, "torchvision").
"""

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def register_teacher_kind(scheme: str) -> Callable:
    """Decorator: register a teacher builder for configs of ``scheme`` ("": no scheme)."""

    def register(builder: Callable) -> Callable:
        # fvcore's Registry keys by __name__; a kind is keyed by its scheme
        TEACHER_KIND_REGISTRY._do_register(scheme.lower(), builder)
        return builder

    return register


def teacher_kind(config: str) -> str:
    """The kind of teacher ``config`` names: its scheme, lower case; "" for a path."""
    match = _SCHEME.match(config or "")
    return match.group(1).lower() if match else ""


def teacher_kind_builder(config: str) -> Callable:
    """
    The registered builder of ``config``'s kind.

    Raises:
        ValueError naming the known schemes when none is registered for it.
    """
    kind = teacher_kind(config)
    if kind not in TEACHER_KIND_REGISTRY:
        known = sorted(k + "://" for k, _ in TEACHER_KIND_REGISTRY if k)
        raise ValueError(
            "KD.TEACHER.CONFIG={!r}: no teacher kind {}://; use a Detectron2 config (a path or "
            "a model-zoo name) or one of {}".format(config, kind, ", ".join(known))
        )
    return TEACHER_KIND_REGISTRY.get(kind)

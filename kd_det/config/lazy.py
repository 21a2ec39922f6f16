"""
Reading settings out of a Detectron2 LazyConfig (``.py`` / saved ``.yaml``) without
instantiating it: the few things kd_det needs from a teacher's or a student's config
(test-time resize, input format, dataset names) live in its ``dataloader`` and ``model``.
"""

from typing import List, Optional, Tuple

__all__ = [
    "lazy_get",
    "is_call_of",
    "dataset_names",
    "test_resizes",
    "other_test_augmentations",
    "single_short_edge",
]


def lazy_get(node, dotted: str, default=None):
    """``node.a.b.c`` for ``dotted`` = "a.b.c", or ``default`` where a key is missing."""
    for key in dotted.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(key, None)
    return default if node is None else node


def is_call_of(node, name: str) -> bool:
    """Whether a LazyCall node calls the class or function named ``name``."""
    target = lazy_get(node, "_target_")
    if target is None:
        return False
    target_name = target if isinstance(target, str) else getattr(target, "__name__", "")
    return target_name.rsplit(".", 1)[-1] == name


def dataset_names(value) -> Tuple[str, ...]:
    """Dataset names of a ``get_detection_dataset_dicts(names=...)`` call: a str or a list."""
    if value is None:
        return ()
    return (value,) if isinstance(value, str) else tuple(value)


def _test_augmentations(lazy) -> List:
    return list(lazy_get(lazy, "dataloader.test.mapper.augmentations") or [])


def test_resizes(lazy) -> List:
    """The ``ResizeShortestEdge`` LazyCalls of ``dataloader.test.mapper.augmentations``."""
    return [a for a in _test_augmentations(lazy) if is_call_of(a, "ResizeShortestEdge")]


def other_test_augmentations(lazy) -> List[str]:
    """Names of the test augmentations that are not a ``ResizeShortestEdge``."""
    names = []
    for a in _test_augmentations(lazy):
        if not is_call_of(a, "ResizeShortestEdge"):
            target = lazy_get(a, "_target_", type(a).__name__)
            names.append(
                target if isinstance(target, str) else getattr(target, "__name__", str(target))
            )
    return names


def single_short_edge(resize) -> Optional[int]:
    """
    The one shortest-edge length of a test ``ResizeShortestEdge`` LazyCall: its
    ``short_edge_length`` when a number or a sequence of equal numbers; None when it
    draws from several (a training-style resize).
    """
    short = lazy_get(resize, "short_edge_length")
    if isinstance(short, (int, float)):
        return int(short)
    values = {int(v) for v in (short or [])}
    return values.pop() if len(values) == 1 else None

"""Evaluator registry: COCO and PASCAL VOC evaluation chosen by config or dataset metadata."""

from .registry import EVALUATOR_REGISTRY, build_evaluator, evaluator_name, has_cpp_ops

__all__ = ["EVALUATOR_REGISTRY", "build_evaluator", "evaluator_name", "has_cpp_ops"]

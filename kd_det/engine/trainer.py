"""Trainers, chosen by ``cfg.KD.TRAINER`` from :data:`TRAINER_REGISTRY`."""

from detectron2.engine import DefaultTrainer
from detectron2.utils.registry import Registry

from ..evaluation import build_evaluator

__all__ = ["TRAINER_REGISTRY", "KDTrainer", "get_trainer_class"]

TRAINER_REGISTRY = Registry("KD_TRAINER")
TRAINER_REGISTRY.__doc__ = """
Trainer classes (subclasses of Detectron2's DefaultTrainer), selected by ``cfg.KD.TRAINER``.
Register new ones with ``@TRAINER_REGISTRY.register()``.
"""


@TRAINER_REGISTRY.register()
class KDTrainer(DefaultTrainer):
    """
    Detectron2's DefaultTrainer with kd_det's evaluator registry.

    Distillation needs nothing else here: the teacher lives inside the model
    (not as a submodule), so optimizer, checkpointer, DDP and hooks see only the
    student; every ``loss_kd_*`` term is logged like any other loss.
    """

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)


def get_trainer_class(cfg):
    """The trainer class named by ``cfg.KD.TRAINER``, with a clear error for unknown names."""
    try:
        return TRAINER_REGISTRY.get(cfg.KD.TRAINER)
    except KeyError:
        raise KeyError("unknown KD.TRAINER {!r}; registered trainers: {}".format(
            cfg.KD.TRAINER, sorted(k for k, _ in TRAINER_REGISTRY))) from None

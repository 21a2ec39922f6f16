"""
Exact resume, the trainer side: the model's random draws of each step seeded from the data
stream's seed, the rank and the iteration (:class:`StepSeedHook`), and the loader's iterator
restarted at the checkpoint's position (:func:`restart_data_stream`). The data side is
:mod:`kd_det.data.stream`.
"""

from typing import Optional

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.stream import ResumableTrainLoader, seed_step

__all__ = ["StepSeedHook", "resumable_loader", "restart_data_stream"]


def resumable_loader(trainer) -> Optional[ResumableTrainLoader]:
    """The :class:`ResumableTrainLoader` of ``trainer`` (a SimpleTrainer or its kind), or None."""
    loader = getattr(trainer, "data_loader", None)
    return loader if isinstance(loader, ResumableTrainLoader) else None


class StepSeedHook(HookBase):
    """
    Before each step, seed the global random state from ``(loader.seed, rank, iteration)``
    (:func:`~kd_det.data.stream.seed_step`). Register it first, so that every hook's
    ``before_step`` sees the seeded state too. The seed is read at each step: a resumed
    run's loader holds the checkpoint's.
    """

    def __init__(self, loader: ResumableTrainLoader):
        self._loader = loader

    def before_step(self):
        seed_step(self._loader.seed, comm.get_rank(), self.trainer.iter)


def restart_data_stream(trainer, start_iter: int) -> bool:
    """
    After loading a checkpoint that training resumes from (``start_iter`` > 0): give
    ``trainer`` (a SimpleTrainer or its kind) a new iterator over its
    :class:`ResumableTrainLoader`, which starts at the loaded position. (An iterator not yet
    advanced would start there too: it reads the position on its first ``next``.) Returns
    whether the loader is resumable.
    """
    loader = resumable_loader(trainer)
    if loader is None:
        return False
    if start_iter > 0:
        trainer._data_loader_iter = iter(loader)
    return True

"""
Instance-level curriculum (Knowledge Distillation via Instance-level Sequence Learning),
its data side: the sampler and the scores file.

A snapshot of the student scores every training image
(:func:`kd_det.engine.curriculum.score_images`, run by ``tools/score_images.py``) into a
scores file (:func:`load_scores` reads it); :class:`CurriculumSampler` then feeds the
easiest images first, over phases that widen the pool, then every image uniformly.  The
trainer restarts its stream on resume (:func:`kd_det.engine.curriculum.restart_curriculum`).
"""

import itertools
import json
import logging
import math
import os
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from detectron2.utils import comm
from torch.utils.data.sampler import Sampler

__all__ = [
    "CurriculumSampler",
    "curriculum_sampler",
    "find_curriculum_sampler",
    "load_scores",
    "image_key",
]

logger = logging.getLogger(__name__)


def image_key(record: Dict) -> str:
    """The key of a dataset record in a scores file: its image_id, else its file name."""
    return str(record["image_id"]) if "image_id" in record else record["file_name"]


class CurriculumSampler(Sampler):
    """
    An infinite index stream for Detectron2's training loader that grows the pool of
    images from easy to hard.

    Phase p lasts until iteration ``phase_iters[p]`` and draws shuffled passes over
    the easiest ``phase_fractions[p]`` of the images; after the last phase every
    image is drawn uniformly (shuffled passes).  Like Detectron2's TrainingSampler,
    one global stream (same seed on every rank) is split between ranks, so the
    phases advance in step with the training iteration on every rank.
    """

    def __init__(
        self,
        scores: Sequence[float],
        phase_iters: Sequence[int],
        phase_fractions: Sequence[float],
        images_per_iter: int,
        seed: Optional[int] = None,
        start_iter: int = 0,
    ):
        """
        Args:
            scores: difficulty of each dataset index (lower = easier).
            phase_iters: iteration at which each phase ends, increasing.
            phase_fractions: share of the easiest images used in each phase, in (0, 1].
            images_per_iter: the total batch size (SOLVER.IMS_PER_BATCH), all ranks together.
            seed: shared by all ranks; None draws one shared seed.
            start_iter: the first iteration (set on resume with :meth:`set_start_iter`).
        """
        if len(phase_iters) != len(phase_fractions):
            raise ValueError(
                "TRAINER.CURRICULUM.PHASE_ITERS ({}) and PHASE_FRACTIONS ({}) need "
                "one entry per phase".format(list(phase_iters), list(phase_fractions))
            )
        if any(b <= a for a, b in zip(phase_iters, phase_iters[1:])) or any(
            i <= 0 for i in phase_iters
        ):
            raise ValueError(
                "TRAINER.CURRICULUM.PHASE_ITERS must be positive and increasing, "
                "got {}".format(list(phase_iters))
            )
        if any(not 0 < f <= 1 for f in phase_fractions):
            raise ValueError(
                "TRAINER.CURRICULUM.PHASE_FRACTIONS must lie in (0, 1], got {}".format(
                    list(phase_fractions)
                )
            )
        if len(scores) == 0:
            raise ValueError("CurriculumSampler needs at least one image")
        self._order = sorted(
            range(len(scores)), key=lambda i: (scores[i], i)
        )  # easiest first, ties by index
        self._n = len(scores)
        self._phase_ends = [
            int(i) * images_per_iter for i in phase_iters
        ]  # global stream positions
        self._pool_sizes = [max(1, math.ceil(f * self._n)) for f in phase_fractions]
        self._images_per_iter = images_per_iter
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._rank = comm.get_rank()
        self._world_size = comm.get_world_size()
        self._start = start_iter * images_per_iter

    def set_start_iter(self, start_iter: int) -> None:
        """Resume: the stream restarts at ``start_iter``'s position (used by the next
        ``iter()``)."""
        self._start = start_iter * self._images_per_iter

    def pool(self, iteration: int) -> List[int]:
        """Dataset indices drawn from at ``iteration``."""
        g = iteration * self._images_per_iter
        for end, size in zip(self._phase_ends, self._pool_sizes):
            if g < end:
                return self._order[:size]
        return list(range(self._n))

    def _segments(self):
        """(start, end, pool) of each phase in global positions; the last runs forever."""
        start = 0
        for end, size in zip(self._phase_ends, self._pool_sizes):
            yield start, end, self._order[:size]
            start = end
        yield start, None, list(range(self._n))

    def _global_stream(self) -> Iterator[int]:
        for p, (start, end, pool) in enumerate(self._segments()):
            if end is not None and end <= self._start:
                continue
            g = torch.Generator().manual_seed(
                self._seed + p
            )  # each phase's passes do not depend on resume
            pos = start
            while end is None or pos < end:
                for i in torch.randperm(len(pool), generator=g).tolist():
                    if end is not None and pos >= end:
                        break
                    if pos >= self._start:
                        yield pool[i]
                    pos += 1

    def __iter__(self) -> Iterator[int]:
        # the rank's share of the global stream (which starts at the resume position)
        yield from itertools.islice(self._global_stream(), self._rank, None, self._world_size)


def curriculum_sampler(
    dataset: List[Dict],
    scores: str,
    phase_iters: Sequence[int],
    phase_fractions: Sequence[float],
    images_per_iter: Optional[int] = None,
    seed: Optional[int] = None,
) -> CurriculumSampler:
    """
    The :class:`CurriculumSampler` of a LazyConfig's training loader (``TRAINER.CURRICULUM``
    in a yacs config)::

        dataloader.train.sampler = L(curriculum_sampler)(
            dataset="${..dataset}", scores="scores.json", phase_iters=[60, 120],
            phase_fractions=[0.5, 0.8])

    Args:
        dataset: the loader's records: ``"${..dataset}"``, the loader's own dataset LazyCall
            (the same records in the same order, and overrides of it apply to both).
        scores: a scores file of ``tools/score_images.py``.
        images_per_iter: images per iteration, all processes and micro-batches together;
            ``tools/lazyconfig_train_net.py`` sets it from ``dataloader.train.total_batch_size``.
    """
    if images_per_iter is None:
        raise ValueError(
            "curriculum_sampler needs images_per_iter, the images of one iteration "
            "(dataloader.train.total_batch_size): kd_det's tools/lazyconfig_train_net.py sets it; "
            "elsewhere set dataloader.train.sampler.images_per_iter"
        )
    return CurriculumSampler(
        load_scores(scores, dataset), phase_iters, phase_fractions, int(images_per_iter), seed
    )


def find_curriculum_sampler(data_loader) -> Optional[CurriculumSampler]:
    """The CurriculumSampler under Detectron2's loader wrappers (aspect-ratio grouping,
    ToIterableDataset), or None."""
    obj = data_loader
    for _ in range(4):
        sampler = getattr(obj, "sampler", None)
        if isinstance(sampler, CurriculumSampler):
            return sampler
        obj = getattr(obj, "dataset", None)
    return None


def load_scores(path: str, dataset_dicts: List[Dict]) -> List[float]:
    """
    The score of each record of ``dataset_dicts`` from a scores file written by
    ``tools/score_images.py`` ({"scores": {image key: score}, ...}).

    Raises:
        FileNotFoundError / ValueError naming the file, the images without a score and the fix.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(
            "TRAINER.CURRICULUM.SCORES={!r} does not exist; score the training "
            "images with a student snapshot first: "
            "tools/score_images.py --config-file <config> "
            "--snapshot <model.pth> --output {}".format(path, path)
        )
    try:
        with open(path) as f:
            scores = json.load(f)["scores"]
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(
            "{} is not a scores file of tools/score_images.py ({}: {})".format(
                path, type(e).__name__, e
            )
        ) from e
    missing = [image_key(r) for r in dataset_dicts if image_key(r) not in scores]
    if missing:
        raise ValueError(
            "{}: {} of {} training images have no score (first: {}); the file was made for another "
            "dataset. Re-run tools/score_images.py on DATASETS.TRAIN".format(
                path, len(missing), len(dataset_dicts), missing[:5]
            )
        )
    return [float(scores[image_key(r)]) for r in dataset_dicts]

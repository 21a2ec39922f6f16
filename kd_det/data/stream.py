"""
A training data stream that a checkpoint can resume exactly.

Detectron2 v0.6's training loader cannot be resumed where it stopped: each worker draws its
share of an infinite sampler and groups it by aspect ratio, and the mapper's augmentations
draw from the workers' global random state. Here everything is a function of the seed and a
position instead:

- an index stream (:data:`INDEX_STREAM_REGISTRY`, named after the ``DATALOADER.SAMPLER_TRAIN``
  it stands for): epoch ``e`` is a shuffled pass over the images (repeated by their repeat
  factor for ``RepeatFactorTrainingSampler``) drawn from ``(seed, e)`` alone;
- a :class:`BatchPlan`, computed in the training process: rank ``r`` of ``W`` takes the stream
  positions ``p = r mod W`` and groups them into batches by aspect ratio (as Detectron2's
  ``AspectRatioGroupedDataset``), from the dataset's ``width``/``height``, reading no image;
- :class:`SeededMapDataset`: each item is mapped with Python's, NumPy's and torch's CPU
  random state seeded from ``(seed, position)``, so its augmentation depends neither on the
  worker that maps it nor on what that worker mapped before.

The stream's state is then ``(seed, batches consumed)``: :class:`ResumableTrainLoader` saves
it (``state_dict``) and starts the plan at that batch after loading it, for any number of
processes and loader workers; the result does not depend on the number of workers.
:func:`seed_step` does the same for the model's own random draws (RPN/RoI sampling), from
``(seed, rank, iteration)``.
"""

import contextlib
import itertools
import logging
import random
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import configurable
from detectron2.data import DatasetFromList, DatasetMapper, get_detection_dataset_dicts
from detectron2.data import samplers as d2_samplers
from detectron2.data.build import trivial_batch_collator
from detectron2.utils import comm
from detectron2.utils.registry import Registry
from torch.utils.data import DataLoader, Dataset

__all__ = [
    "INDEX_STREAM_REGISTRY",
    "ShuffledPasses",
    "RepeatFactorPasses",
    "BatchPlan",
    "SeededMapDataset",
    "ResumableTrainLoader",
    "build_resumable_train_loader",
    "derive_seed",
    "seed_step",
    "train_dataset_dicts",
]

logger = logging.getLogger(__name__)

# domains of derive_seed, so that the streams drawn from one run seed are independent
_EPOCH, _ITEM, _STEP, _LOADER = 0, 1, 2, 3

INDEX_STREAM_REGISTRY = Registry("KD_INDEX_STREAM")
INDEX_STREAM_REGISTRY.__doc__ = """
Resumable index streams, keyed by the ``DATALOADER.SAMPLER_TRAIN`` value they stand for.
Each is called as ``fn(cfg, dataset_dicts)`` and returns an object with
``epoch(seed, e) -> list[int]`` (dataset indices of epoch ``e``, drawn from ``(seed, e)`` alone).
"""


def derive_seed(*keys: int) -> int:
    """A 63-bit seed mixed from non-negative integers (NumPy's SeedSequence)."""
    state = np.random.SeedSequence([int(k) for k in keys]).generate_state(1, np.uint64)
    return int(state[0]) & (2**63 - 1)


def _generator(*keys: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*keys))


class ShuffledPasses:
    """Detectron2's ``TrainingSampler`` (shuffled): epoch e is a permutation of all images."""

    def __init__(self, size: int):
        if size <= 0:
            raise ValueError("the training set is empty: DATASETS.TRAIN has no images")
        self.size = int(size)

    def epoch(self, seed: int, e: int) -> List[int]:
        return torch.randperm(self.size, generator=_generator(_EPOCH, seed, e)).tolist()


class RepeatFactorPasses:
    """
    Detectron2's ``RepeatFactorTrainingSampler``: in epoch e, image i appears
    ``floor(r_i)`` times plus once more with probability ``frac(r_i)``, shuffled.
    """

    def __init__(self, repeat_factors: Sequence[float]):
        factors = torch.as_tensor(repeat_factors, dtype=torch.float32)
        if factors.numel() == 0 or (factors < 1).any():
            raise ValueError("repeat factors must be >= 1, one per image (got {})".format(factors))
        self._int_part = torch.trunc(factors)
        self._frac_part = factors - self._int_part
        self.size = factors.numel()

    def epoch(self, seed: int, e: int) -> List[int]:
        g = _generator(_EPOCH, seed, e)
        rands = torch.rand(self.size, generator=g)
        reps = (self._int_part + (rands < self._frac_part).float()).long()
        indices = torch.repeat_interleave(torch.arange(self.size), reps)
        return indices[torch.randperm(len(indices), generator=g)].tolist()


@INDEX_STREAM_REGISTRY.register()
def TrainingSampler(cfg, dataset_dicts: List[Dict]) -> ShuffledPasses:  # noqa: N802 (the name)
    return ShuffledPasses(len(dataset_dicts))


@INDEX_STREAM_REGISTRY.register()
def RepeatFactorTrainingSampler(cfg, dataset_dicts: List[Dict]):  # noqa: N802 (the name)
    return RepeatFactorPasses(
        d2_samplers.RepeatFactorTrainingSampler.repeat_factors_from_category_frequency(
            dataset_dicts, cfg.DATALOADER.REPEAT_THRESHOLD
        )
    )


class BatchPlan:
    """
    The batches of one process: lists of ``(dataset index, stream position)``, from batch
    ``start`` on, forever. Used as a DataLoader's ``batch_sampler``.
    """

    def __init__(
        self,
        stream,
        seed: int,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        landscape: Optional[Sequence[bool]] = None,
        start: int = 0,
    ):
        """
        Args:
            stream: an index stream (``epoch(seed, e) -> list[int]``).
            batch_size: images per batch of this process.
            landscape: per dataset index, whether width > height; batches then hold one
                orientation only (aspect-ratio grouping). None: no grouping.
            start: batches to skip (those consumed before a resume).
        """
        self.stream, self.seed, self.batch_size = stream, int(seed), int(batch_size)
        self.rank, self.world_size = int(rank), int(world_size)
        self.landscape, self.start = landscape, int(start)

    def _all(self) -> Iterator[List[Tuple[int, int]]]:
        buckets: Tuple[list, list] = ([], [])
        first = 0  # stream position of the epoch's first index
        for e in itertools.count():
            indices = self.stream.epoch(self.seed, e)
            # this process's share: the positions p with p = rank (mod world_size)
            mine = first + (self.rank - first) % self.world_size
            for p in range(mine, first + len(indices), self.world_size):
                index = indices[p - first]
                bucket = buckets[0 if self.landscape is None or self.landscape[index] else 1]
                bucket.append((index, p))
                if len(bucket) == self.batch_size:
                    yield list(bucket)
                    bucket.clear()
            first += len(indices)

    def __iter__(self) -> Iterator[List[Tuple[int, int]]]:
        # regenerated from the beginning: index arithmetic only, no image is read
        return itertools.islice(self._all(), self.start, None)


@contextlib.contextmanager
def _item_rng(seed: int):
    """Python's, NumPy's and torch's CPU global random state seeded from ``seed`` inside,
    restored on exit (the training process maps items itself with 0 workers)."""
    states = (random.getstate(), np.random.get_state(), torch.random.get_rng_state())
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.random.default_generator.manual_seed(seed)  # CPU only: CUDA's stays the model's
    try:
        yield
    finally:
        random.setstate(states[0])
        np.random.set_state(states[1])
        torch.random.set_rng_state(states[2])


class SeededMapDataset(Dataset):
    """
    ``mapper(dataset[index])`` for keys ``(index, position)``, with the global random state
    seeded from ``(seed, position)``. A mapper that returns None (a skipped image) gets
    another image, drawn from the same seeded state, as Detectron2's MapDataset does.
    """

    def __init__(self, dataset_dicts: List[Dict], mapper: Callable, seed: int):
        self._dataset = DatasetFromList(dataset_dicts, copy=False)
        self._mapper = mapper
        self.seed = int(seed)

    def __len__(self):
        return len(self._dataset)

    def __getitem__(self, key: Tuple[int, int]):
        index, position = key
        with _item_rng(derive_seed(_ITEM, self.seed, position)):
            for attempt in itertools.count(1):
                data = self._mapper(self._dataset[index])
                if data is not None:
                    return data
                if attempt >= 3:
                    logger.warning(
                        "the mapper returned None for image {} (stream position {}), {} tries; "
                        "trying another image".format(index, position, attempt)
                    )
                index = random.randrange(len(self._dataset))


def _landscape(dataset_dicts: List[Dict]) -> List[bool]:
    missing = [i for i, d in enumerate(dataset_dicts) if "width" not in d or "height" not in d]
    if missing:
        raise ValueError(
            "aspect-ratio grouping needs 'width' and 'height' in every training record; "
            "record {} (of {} such) has none: add them to the dataset, or set "
            "DATALOADER.ASPECT_RATIO_GROUPING False".format(missing[0], len(missing))
        )
    return [d["width"] > d["height"] for d in dataset_dicts]


class ResumableTrainLoader:
    """
    An infinite training loader whose position is part of a checkpoint: iterating yields
    lists of mapped dicts, ``total_batch_size / world_size`` per process, as Detectron2's
    ``build_detection_train_loader``; ``state_dict()``/``load_state_dict()`` save and
    restore the seed and the number of batches consumed, and the next ``iter()`` continues
    from there.
    """

    def __init__(
        self,
        dataset: List[Dict],
        mapper: Callable,
        stream,
        total_batch_size: int,
        *,
        aspect_ratio_grouping: bool = True,
        num_workers: int = 0,
        collate_fn: Optional[Callable] = None,
        seed: Optional[int] = None,
    ):
        """
        Args:
            dataset: the training records (``get_detection_dataset_dicts``), a list.
            stream: an index stream (:data:`INDEX_STREAM_REGISTRY`).
            seed: the run's seed (``SEED``); None or < 0 draws one, shared by all processes.
        """
        if not isinstance(dataset, list):
            raise TypeError(
                "ResumableTrainLoader needs the training records as a list of dicts "
                "(get_detection_dataset_dicts), got {}".format(type(dataset).__name__)
            )
        world = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world:
            raise ValueError(
                "the batch ({} images) must be a positive multiple of the {} processes".format(
                    total_batch_size, world
                )
            )
        self._dataset, self._mapper, self.stream = dataset, mapper, stream
        self.total_batch_size, self.num_workers = int(total_batch_size), int(num_workers)
        self._collate = collate_fn or trivial_batch_collator
        self._landscape = _landscape(dataset) if aspect_ratio_grouping else None
        self._requested_seed = None if seed is None or seed < 0 else int(seed)
        self.seed = (
            self._requested_seed
            if self._requested_seed is not None
            else int(comm.shared_random_seed())
        )
        self.position = 0  # batches this process has taken from the loader

    def plan(self) -> BatchPlan:
        """This process's batches from the current position."""
        return BatchPlan(
            self.stream,
            self.seed,
            self.total_batch_size // comm.get_world_size(),
            comm.get_rank(),
            comm.get_world_size(),
            self._landscape,
            start=self.position,
        )

    def __iter__(self) -> Iterator[List[Dict]]:
        # a generator: nothing starts (no worker, no plan) before the first next(), so a
        # checkpoint loaded after the trainer took its iterator still decides the start
        loader = DataLoader(
            SeededMapDataset(self._dataset, self._mapper, self.seed),
            batch_sampler=self.plan(),
            num_workers=self.num_workers,
            collate_fn=self._collate,
            # its own generator: making an iterator must not draw from the global state
            generator=_generator(_LOADER, self.seed),
        )
        for batch in loader:
            self.position += 1
            yield batch

    def state_dict(self) -> Dict:
        return {
            "seed": self.seed,
            "position": self.position,
            "dataset_size": len(self._dataset),
            "world_size": comm.get_world_size(),
            "total_batch_size": self.total_batch_size,
            "stream": type(self.stream).__name__,
        }

    def load_state_dict(self, state: Dict, expected_position: Optional[int] = None) -> None:
        """
        Continue the stream ``state`` describes. Differences that make the continuation
        inexact (dataset, processes, batch, sampler) are warned about; a different process
        count or batch restarts the plan at ``expected_position`` (the batches the saved
        iteration implies), where given.
        """
        current = self.state_dict()
        changed = [
            "{} {} -> {}".format(k, state.get(k), current[k])
            for k in ("dataset_size", "world_size", "total_batch_size", "stream")
            if state.get(k) != current[k]
        ]
        if self._requested_seed is not None and self._requested_seed != state["seed"]:
            logger.warning(
                "SEED={} differs from the checkpoint's data-stream seed {}: the resumed run "
                "continues the checkpoint's stream (seed {}); start a new run to use "
                "another seed".format(self._requested_seed, state["seed"], state["seed"])
            )
        self.seed = int(state["seed"])
        self.position = int(state["position"])
        if changed:
            regrouped = (
                state.get("world_size") != current["world_size"]
                or state.get("total_batch_size") != current["total_batch_size"]
            )
            if regrouped and expected_position is not None:
                self.position = int(expected_position)
            logger.warning(
                "the training data differs from the checkpoint's ({}): the data stream "
                "continues at batch {} of this process, but not as the interrupted run "
                "would have".format("; ".join(changed), self.position)
            )
        else:
            logger.info(
                "Data stream resumed at batch {} (seed {})".format(self.position, self.seed)
            )


def train_dataset_dicts(cfg) -> List[dict]:
    """The training records of a yacs config, in the order Detectron2's loader uses them."""
    return get_detection_dataset_dicts(
        cfg.DATASETS.TRAIN,
        filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        min_keypoints=(
            cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
        ),
        proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
    )


def _loader_from_config(cfg, mapper=None, *, dataset=None, stream=None):
    if dataset is None:
        dataset = train_dataset_dicts(cfg)
    if stream is None:
        name = cfg.DATALOADER.SAMPLER_TRAIN
        if name not in INDEX_STREAM_REGISTRY:
            raise KeyError(
                "DATALOADER.SAMPLER_TRAIN={!r} has no resumable stream (registered: {}); "
                "use Detectron2's build_detection_train_loader for it".format(
                    name, sorted(k for k, _ in INDEX_STREAM_REGISTRY)
                )
            )
        stream = INDEX_STREAM_REGISTRY.get(name)(cfg, dataset)
    return {
        "dataset": dataset,
        "mapper": mapper if mapper is not None else DatasetMapper(cfg, True),
        "stream": stream,
        "total_batch_size": cfg.SOLVER.IMS_PER_BATCH,
        "aspect_ratio_grouping": cfg.DATALOADER.ASPECT_RATIO_GROUPING,
        "num_workers": cfg.DATALOADER.NUM_WORKERS,
        "seed": cfg.SEED,
    }


@configurable(from_config=_loader_from_config)
def build_resumable_train_loader(
    dataset: List[Dict],
    *,
    mapper: Callable,
    stream=None,
    total_batch_size: int,
    aspect_ratio_grouping: bool = True,
    num_workers: int = 0,
    collate_fn: Optional[Callable] = None,
    seed: Optional[int] = None,
) -> ResumableTrainLoader:
    """
    :class:`ResumableTrainLoader`, called as Detectron2's ``build_detection_train_loader``:
    ``(cfg, mapper=None, dataset=None, stream=None)`` or with explicit arguments (a LazyConfig).
    ``stream`` None is the shuffled passes of ``TrainingSampler``.
    """
    return ResumableTrainLoader(
        dataset,
        mapper,
        stream if stream is not None else ShuffledPasses(len(dataset)),
        total_batch_size,
        aspect_ratio_grouping=aspect_ratio_grouping,
        num_workers=num_workers,
        collate_fn=collate_fn,
        seed=seed,
    )


def seed_step(seed: int, rank: int, iteration: int) -> None:
    """
    Seed Python's, NumPy's and torch's (CPU and CUDA) global random state from ``(seed,
    rank, iteration)``: the model's draws in a step (RPN and RoI sampling) are then the same
    in a resumed run as in an uninterrupted one, and no per-process state needs saving.
    """
    s = derive_seed(_STEP, seed, rank, iteration)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)

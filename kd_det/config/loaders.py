"""
The data loaders a detector's config describes, of either kind: its test loader (yacs
``DATASETS.TEST[0]``, a LazyConfig's ``dataloader.test``), and annotated records at test
size, which the tools that look at a trained model use (scores, distillation maps).
"""

import copy
from typing import Iterable, Sequence, Tuple

from detectron2.config import CfgNode, instantiate
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    get_detection_dataset_dicts,
)
from detectron2.data import transforms as T

from .detector import DetectorConfig
from .lazy import dataset_names, lazy_get

__all__ = ["test_loader", "annotated_loader"]


def test_loader(config: DetectorConfig) -> Tuple[Iterable, str]:
    """
    The config's test loader, as its evaluation reads the images (test-time
    preprocessing, no annotations), and the name of its dataset(s).

    Raises:
        ValueError saying what the config lacks (``DATASETS.TEST``, ``dataloader.test``).
    """
    if isinstance(config, CfgNode):
        if not config.DATASETS.TEST:
            raise ValueError("the config has no DATASETS.TEST")
        name = config.DATASETS.TEST[0]
        return build_detection_test_loader(config, name), name
    if lazy_get(config, "dataloader.test") is None:
        raise ValueError("the LazyConfig has no dataloader.test")
    names = dataset_names(lazy_get(config, "dataloader.test.dataset.names"))
    return instantiate(config.dataloader.test), ",".join(names)


def annotated_loader(config: DetectorConfig, names: Sequence[str], split: str) -> Iterable:
    """
    The records of the datasets ``names`` one at a time (lists of one), with their
    annotations, resized as at test time and never flipped, so that what is computed on
    them does not depend on augmentation: the training mapper (annotations kept) with the
    test-time resize.

    Args:
        names: registered dataset names (registered by the caller).
        split: "train" keeps the training loader's own filtering of empty images (yacs
            ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``; a LazyConfig's ``dataloader.train.dataset``
            where ``names`` are its own); "test" keeps every image.
    """
    names = list(names)
    if isinstance(config, CfgNode):
        filter_empty = config.DATALOADER.FILTER_EMPTY_ANNOTATIONS if split == "train" else False
        dataset = get_detection_dataset_dicts(names, filter_empty=filter_empty)
        mapper = DatasetMapper(
            config,
            is_train=True,
            augmentations=[
                T.ResizeShortestEdge(config.INPUT.MIN_SIZE_TEST, config.INPUT.MAX_SIZE_TEST)
            ],
        )
        return build_detection_test_loader(
            dataset, mapper=mapper, num_workers=config.DATALOADER.NUM_WORKERS
        )
    own = list(dataset_names(lazy_get(config, "dataloader.train.dataset.names")))
    if split == "train" and names == own:
        dataset = instantiate(config.dataloader.train.dataset)  # with the config's own filtering
    else:
        dataset = get_detection_dataset_dicts(names, filter_empty=False)
    # the training mapper keeps the annotations; the test resize replaces its augmentations
    mapper = copy.deepcopy(config.dataloader.train.mapper)
    mapper.augmentations = list(lazy_get(config, "dataloader.test.mapper.augmentations") or [])
    workers = int(lazy_get(config, "dataloader.train.num_workers", 0))
    return build_detection_test_loader(dataset, mapper=instantiate(mapper), num_workers=workers)

"""
A trained model and annotated images at test size, from a yacs or a LazyConfig config:
what the tools that look at a snapshot need (``tools/score_images.py``,
``tools/visualize_distillation.py``).
"""

import copy
from typing import List, Optional, Sequence, Tuple

import torch

__all__ = ["load_snapshot"]


def load_snapshot(
    config_file: str, opts: Sequence[str], weights: Optional[str], split: str = "train",
    names: Optional[Sequence[str]] = None,
) -> Tuple[torch.nn.Module, object, List[str]]:
    """
    Build the config's model, load ``weights`` into it and map the records of a
    dataset with their annotations, resized as at test time and never flipped (so
    what is computed on them does not depend on augmentation).

    Args:
        config_file: a yacs ``.yaml`` (``opts`` as ``KEY VALUE ...``) or a LazyConfig
            ``.py`` (``opts`` as ``key=value``; the records and mapper of
            ``dataloader.train`` with ``dataloader.test``'s augmentations).
        weights: checkpoint to load; None: the config's ``MODEL.WEIGHTS`` /
            ``train.init_checkpoint``.
        split: "train" or "test": whose dataset names to use when ``names`` is None.
        names: registered dataset names to read instead.
    Returns:
        (model in training mode, a loader of one-record lists, the dataset names).
    """
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test', got {!r}".format(split))
    setup = _lazy if config_file.endswith(".py") else _yacs
    return setup(config_file, list(opts), weights, split, list(names) if names else None)


def _yacs(config_file, opts, weights, split, names):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetMapper, build_detection_test_loader, get_detection_dataset_dicts
    from detectron2.data import transforms as T
    from detectron2.modeling import build_model

    from ..config import get_kd_cfg, merge_kd_config
    from ..data import prepare_datasets

    cfg = merge_kd_config(get_kd_cfg(), config_file, opts)
    cfg.freeze()
    names = names or list(cfg.DATASETS.TRAIN if split == "train" else cfg.DATASETS.TEST)
    prepare_datasets(names)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights or cfg.MODEL.WEIGHTS)
    filter_empty = cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS if split == "train" else False
    dataset = get_detection_dataset_dicts(names, filter_empty=filter_empty)
    mapper = DatasetMapper(cfg, is_train=True, augmentations=[
        T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST)])
    loader = build_detection_test_loader(dataset, mapper=mapper, num_workers=cfg.DATALOADER.NUM_WORKERS)
    return model, loader, names


def _lazy(config_file, opts, weights, split, names):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.config import LazyConfig, instantiate
    from detectron2.data import build_detection_test_loader, get_detection_dataset_dicts

    from ..data import prepare_datasets
    from ..config.lazy import dataset_names, lazy_get

    lazy = LazyConfig.apply_overrides(LazyConfig.load(config_file), opts)
    own = list(dataset_names(lazy_get(lazy, "dataloader.{}.dataset.names".format(split))))
    names = names or own
    prepare_datasets(names)
    model = instantiate(lazy.model)
    model.to(lazy_get(lazy, "train.device", "cpu"))
    DetectionCheckpointer(model).load(weights or lazy_get(lazy, "train.init_checkpoint", ""))
    if split == "train" and names == own:
        dataset = instantiate(lazy.dataloader.train.dataset)  # with the config's own filtering
    else:
        dataset = get_detection_dataset_dicts(names, filter_empty=False)
    # the training mapper keeps the annotations; the test resize replaces its augmentations
    mapper = copy.deepcopy(lazy.dataloader.train.mapper)
    mapper.augmentations = list(lazy_get(lazy, "dataloader.test.mapper.augmentations") or [])
    loader = build_detection_test_loader(dataset, mapper=instantiate(mapper),
                                         num_workers=int(lazy_get(lazy, "dataloader.train.num_workers", 0)))
    return model, loader, names

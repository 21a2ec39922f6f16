"""
A trained model and annotated images at test size, from a yacs or a LazyConfig config:
what the tools that look at a snapshot need (``tools/score_images.py``,
``tools/visualize_distillation.py``).
"""

from typing import List, Optional, Sequence, Tuple

import torch
from detectron2.config import CfgNode

from ..checkpoint import SafeDetectionCheckpointer
from ..config.detector import (
    build_detector,
    detector_settings,
    detector_weights,
    load_detector_config,
)
from ..config.loaders import annotated_loader
from ..data import prepare_datasets, register_config_datasets, register_lazy_config_datasets

__all__ = ["load_snapshot"]


def load_snapshot(
    config_file: str,
    opts: Sequence[str],
    weights: Optional[str],
    split: str = "train",
    names: Optional[Sequence[str]] = None,
    datasets: Sequence[str] = (),
) -> Tuple[torch.nn.Module, object, List[str]]:
    """
    Build the config's model, load ``weights`` into it and map the records of a
    dataset with their annotations, resized as at test time and never flipped (so
    what is computed on them does not depend on augmentation).

    Args:
        config_file: a yacs ``.yaml`` (``opts`` as ``KEY VALUE ...``) or a LazyConfig
            ``.py`` (``opts`` as ``key=value``); the records are mapped as
            :func:`~kd_det.config.loaders.annotated_loader` does.
        weights: checkpoint to load; None: the config's ``MODEL.WEIGHTS`` /
            ``train.init_checkpoint``.
        split: "train" or "test": whose dataset names to use when ``names`` is None.
        names: registered dataset names to read instead.
        datasets: the tool's ``--dataset NAME=JSON:IMAGE_DIR`` values, registered with the
            config's own ``DATASETS.COCO_FORMAT`` / ``train.coco_format`` entries.
    Returns:
        (model in training mode, a loader of one-record lists, the dataset names).
    """
    if split not in ("train", "test"):
        raise ValueError("split must be 'train' or 'test', got {!r}".format(split))
    config = load_detector_config(config_file, opts, opts_name="the command line")
    if isinstance(config, CfgNode):
        register_config_datasets(config, datasets)
    else:
        register_lazy_config_datasets(config, datasets)
    settings = detector_settings(config)
    names = (
        list(names)
        if names
        else list(settings.train_datasets if split == "train" else settings.test_datasets)
    )
    prepare_datasets(names)
    model = build_detector(config, device=None)  # on the config's own device
    SafeDetectionCheckpointer(model).load(weights or detector_weights(config))
    return model, annotated_loader(config, names, split), names

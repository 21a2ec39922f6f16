"""
The one place that reads a detector's config of either kind: a yacs config (``.yaml``, or
its loaded :class:`CfgNode`) or a Detectron2 LazyConfig (``.py`` / saved ``.yaml``, or its
loaded :class:`DictConfig`).  Everything else takes :class:`DetectorSettings` and a built
model, and never asks which kind of config they came from.

    config = load_detector_config("configs/synthetic/faster_rcnn_R_50_FPN_lazy.py", opts)
    settings = detector_settings(config)     # class count, input format, test size, datasets
    model = build_detector(config, "cpu")    # weights not loaded
"""

import os
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import torch
from detectron2.config import CfgNode, LazyConfig, instantiate
from detectron2.modeling import build_model
from omegaconf import DictConfig
from PIL import Image

from .defaults import get_kd_cfg
from .lazy import (
    dataset_names,
    lazy_get,
    other_test_augmentations,
    single_short_edge,
    test_resizes,
)
from .renames import merge_kd_config

__all__ = [
    "DetectorSettings",
    "is_lazy_config",
    "describe_config",
    "train_command",
    "load_detector_config",
    "detector_settings",
    "meta_architecture_of",
    "build_detector",
    "detector_weights",
    "fixed_test_resize",
]

DetectorConfig = Union[CfgNode, DictConfig]


@dataclass(frozen=True)
class DetectorSettings:
    """
    What kd_det reads from a detector's config besides its model: what it is, its label
    space, how its inputs are prepared at test time, and the datasets it names.
    """

    meta_architecture: str  # e.g. "GeneralizedRCNN", "RetinaNet", "DistillRetinaNet"
    num_classes: int
    input_format: str  # channel order of the model's input, "BGR" or "RGB"
    pixel_mean: Tuple[float, ...]  # (C,) per input channel, in input_format's order
    pixel_std: Tuple[float, ...]  # (C,)
    # test-time ResizeShortestEdge: shortest edge, and longest edge at most; None where a
    # LazyConfig has no ResizeShortestEdge in dataloader.test.mapper.augmentations
    min_size_test: Optional[int]
    max_size_test: Optional[int]
    train_datasets: Tuple[str, ...] = ()
    test_datasets: Tuple[str, ...] = ()


def _is_saved_lazy_config(path: str) -> bool:
    """Whether a ``.yaml`` file is a saved LazyConfig (lowercase ``model``), not a yacs config."""
    # top-level keys read from the text: a saved LazyConfig holds python object tags
    # (ShapeSpec) that only LazyConfig.load's unsafe loader constructs
    with open(path) as f:
        keys = {line.split(":", 1)[0] for line in f if line[:1].isalpha() and ":" in line}
    return "model" in keys and "MODEL" not in keys


def is_lazy_config(config) -> bool:
    """
    Whether ``config`` is a LazyConfig, not a yacs config: a loaded config, or a file
    path (a ``.py``, or a ``.yaml`` that ``LazyConfig.save`` wrote, e.g. the config.yaml
    of a tools/lazyconfig_train_net.py run).
    """
    if isinstance(config, str):
        if config.endswith(".py"):
            return True
        return os.path.isfile(config) and _is_saved_lazy_config(config)
    return not isinstance(config, CfgNode)


def describe_config(path: str, role: str = "") -> str:
    """How messages name a config file, e.g. "teacher LazyConfig 'a.py'" or "config 'b.yaml'"."""
    kind = "LazyConfig" if is_lazy_config(path) else "config"
    return "{} {!r}".format("{} {}".format(role, kind) if role else kind, path)


def train_command(path: str) -> str:
    """The command that trains a detector from the config file ``path``."""
    tool = "lazyconfig_train_net.py" if is_lazy_config(path) else "train_net.py"
    return "tools/{} --config-file {}".format(tool, path)


def load_detector_config(
    path: str, opts: Sequence[str] = (), *, role: str = "", opts_name: str = "opts"
) -> DetectorConfig:
    """
    Load a detector config with command-line style overrides, as the Detectron2 tools do.

    Args:
        path: a yacs ``.yaml`` (kd_det's defaults included; older kd_det keys renamed) or a
            LazyConfig (``.py``, or a ``.yaml`` that ``LazyConfig.save`` wrote).
        opts: yacs ``KEY VALUE ...`` pairs, or a LazyConfig's ``"key=value"`` strings.
        role, opts_name: what the config and the overrides are to the caller (e.g.
            "teacher" and "KD.TEACHER.OPTS"), for the messages.
    Returns:
        a :class:`CfgNode` (not frozen) or a LazyConfig's :class:`DictConfig`.
    Raises:
        ValueError naming the file and the fix when it does not load or an override does not apply.
    """
    opts = list(opts)
    name = describe_config(path, role)
    if not is_lazy_config(path):
        cfg = get_kd_cfg()
        try:
            merge_kd_config(cfg, path, opts, opts_source=opts_name)
        except Exception as e:
            raise ValueError("{} does not build: {}: {}".format(name, type(e).__name__, e)) from e
        return cfg
    try:
        lazy = LazyConfig.load(path)
    except Exception as e:
        raise ValueError("{} does not load: {}: {}".format(name, type(e).__name__, e)) from e
    bad = [o for o in opts if "=" not in str(o)]
    if bad:
        raise ValueError(
            "{}={} for the {}: a LazyConfig takes overrides as 'key=value' strings (e.g. "
            '"model.roi_heads.box_predictor.test_score_thresh=0.05"), not yacs KEY VALUE pairs; '
            "{} is not one".format(opts_name, opts, name, bad[0])
        )
    try:
        return LazyConfig.apply_overrides(lazy, opts)
    except Exception as e:
        raise ValueError(
            "{}={} do not apply to the {}: {}: {}".format(
                opts_name, opts, name, type(e).__name__, e
            )
        ) from e


def _lazy_model(config: DictConfig):
    """A LazyConfig's ``model`` LazyCall; raises naming the fix where it has none."""
    model = lazy_get(config, "model")
    if model is None:
        raise ValueError(
            "the LazyConfig has no `model`: a LazyConfig detector defines it as "
            "`model = L(GeneralizedRCNN)(...)` or `L(RetinaNet)(...)`, as "
            "Detectron2's configs do"
        )
    return model


def _target_name(node) -> str:
    target = lazy_get(node, "_target_")
    if target is None:
        return ""
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return name.rsplit(".", 1)[-1]


def meta_architecture_of(config: DetectorConfig) -> str:
    """
    The meta-architecture a config builds: yacs ``MODEL.META_ARCHITECTURE``; for a
    LazyConfig the class its ``model`` calls, or the ``meta_architecture`` argument of
    a builder that takes one (kd_det's deprecated ``lazy_distilled_model``); "" without a model.
    """
    if isinstance(config, CfgNode):
        return config.MODEL.META_ARCHITECTURE
    model = lazy_get(config, "model")
    named = lazy_get(model, "meta_architecture")
    return str(named) if named else _target_name(model)


def _lazy_num_classes(model) -> int:
    # one-stage detectors take num_classes; R-CNNs give it to their RoI heads (and predictor)
    for key in ("num_classes", "roi_heads.num_classes", "roi_heads.box_predictor.num_classes"):
        value = lazy_get(model, key)
        if value is not None:
            return int(value)
    raise ValueError(
        "the LazyConfig's model names no class count: set model.num_classes "
        "(RetinaNet) or model.roi_heads.num_classes (R-CNN)"
    )


def _lazy_test_size(lazy) -> Tuple[Optional[int], Optional[int]]:
    resize = test_resizes(lazy)
    if not resize:
        return None, None
    short = single_short_edge(resize[0])
    if short is None:
        # a test resize drawing from several lengths (unusual): evaluate at the largest
        short = max(int(v) for v in lazy_get(resize[0], "short_edge_length"))
    # ResizeShortestEdge's own default: no limit
    return short, int(lazy_get(resize[0], "max_size", sys.maxsize))


def _floats(values) -> Tuple[float, ...]:
    return tuple(float(v) for v in values)


def detector_settings(config: DetectorConfig) -> DetectorSettings:
    """
    The :class:`DetectorSettings` of a yacs config or a LazyConfig (a plain detector or
    a kd_det student).  A LazyConfig is read without instantiating it: ``model``'s
    arguments, and ``dataloader``'s test resize (the first ``ResizeShortestEdge`` of
    ``dataloader.test.mapper.augmentations``), input format (``model.input_format``,
    else the test mapper's ``image_format``) and dataset names.

    Raises:
        ValueError naming the key to set when a LazyConfig says no class count or input format.
    """
    if isinstance(config, CfgNode):
        meta = config.MODEL.META_ARCHITECTURE
        num_classes = (
            config.MODEL.RETINANET.NUM_CLASSES
            if "RetinaNet" in meta
            else config.MODEL.ROI_HEADS.NUM_CLASSES
        )
        return DetectorSettings(
            meta,
            int(num_classes),
            config.INPUT.FORMAT,
            _floats(config.MODEL.PIXEL_MEAN),
            _floats(config.MODEL.PIXEL_STD),
            int(config.INPUT.MIN_SIZE_TEST),
            int(config.INPUT.MAX_SIZE_TEST),
            tuple(config.DATASETS.TRAIN),
            tuple(config.DATASETS.TEST),
        )
    model = _lazy_model(config)
    input_format = lazy_get(model, "input_format") or lazy_get(
        config, "dataloader.test.mapper.image_format"
    )
    if input_format is None:
        raise ValueError(
            "the LazyConfig names no input format: set model.input_format (or "
            "dataloader.test.mapper.image_format) to the channel order the model was "
            'trained on, "BGR" or "RGB"'
        )
    min_size, max_size = _lazy_test_size(config)
    return DetectorSettings(
        meta_architecture_of(config),
        _lazy_num_classes(model),
        str(input_format),
        _floats(lazy_get(model, "pixel_mean", ())),
        _floats(lazy_get(model, "pixel_std", ())),
        min_size,
        max_size,
        dataset_names(lazy_get(config, "dataloader.train.dataset.names")),
        dataset_names(lazy_get(config, "dataloader.test.dataset.names")),
    )


def build_detector(config: DetectorConfig, device: Optional[str] = "cpu") -> torch.nn.Module:
    """
    The model of a config on ``device``, weights not loaded: yacs ``build_model`` (with
    ``MODEL.DEVICE`` = ``device``), or ``instantiate`` of a LazyConfig's ``model``.

    Args:
        device: None: the config's own (``MODEL.DEVICE``, a LazyConfig's ``train.device``,
            else "cpu").
    """
    if isinstance(config, CfgNode):
        cfg = config.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = str(device or config.MODEL.DEVICE)
        return build_model(cfg)
    device = device or lazy_get(config, "train.device", "cpu")
    return instantiate(_lazy_model(config)).to(torch.device(device))


def detector_weights(config: DetectorConfig) -> str:
    """The weights a config names: ``MODEL.WEIGHTS``, a LazyConfig's ``train.init_checkpoint``."""
    if isinstance(config, CfgNode):
        return config.MODEL.WEIGHTS
    return str(lazy_get(config, "train.init_checkpoint", ""))


def fixed_test_resize(config: DetectorConfig) -> Tuple[int, int]:
    """
    The test-time preprocessing of a config as ``DefaultPredictor`` does it, which is what
    a deployed model repeats (its sidecar JSON, ``tools/predict_exported.py``): one
    bilinear ``ResizeShortestEdge`` to a fixed shortest edge.  A yacs config's is
    ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``; a LazyConfig's is
    ``dataloader.test.mapper.augmentations``, which must be exactly that.

    Returns:
        (shortest edge, longest edge at most).
    Raises:
        ValueError naming the fix where a LazyConfig's test augmentations are anything else.
    """
    if isinstance(config, CfgNode):
        return config.INPUT.MIN_SIZE_TEST, config.INPUT.MAX_SIZE_TEST
    if lazy_get(config, "dataloader.test") is None:
        raise ValueError(
            "the LazyConfig has no dataloader.test: the export takes the test-time resize from "
            "dataloader.test.mapper.augmentations (a ResizeShortestEdge, as in Detectron2's "
            "configs) and the sample image and class names from dataloader.test.dataset.names; "
            "add it"
        )
    resizes, others = test_resizes(config), other_test_augmentations(config)
    if len(resizes) != 1 or others:
        raise ValueError(
            "dataloader.test.mapper.augmentations of the LazyConfig is {} ResizeShortestEdge and "
            "{}: an exported model's preprocessing (its sidecar JSON, predict_exported.py) is one "
            "ResizeShortestEdge(short_edge_length=N, max_size=M), as DefaultPredictor's".format(
                len(resizes), others or "nothing else"
            )
        )
    short = single_short_edge(resizes[0])
    if short is None:
        raise ValueError(
            "the test ResizeShortestEdge of the LazyConfig draws its short edge from {}: a "
            "deployed model needs one size; set "
            "dataloader.test.mapper.augmentations.0.short_edge_length=N".format(
                list(lazy_get(resizes[0], "short_edge_length"))
            )
        )
    interp = lazy_get(resizes[0], "interp", Image.BILINEAR)
    if int(interp) != int(Image.BILINEAR):
        raise ValueError(
            "the test ResizeShortestEdge of the LazyConfig uses interp={}; exports "
            "describe bilinear resizing (DefaultPredictor's) only".format(interp)
        )
    return short, int(lazy_get(resizes[0], "max_size", sys.maxsize))

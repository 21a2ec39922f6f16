"""Datasets: the generated synthetic default data and its registration."""

from .bad_images import BadImageError, BadImageMapper, SkippedItemsHook
from .classes import ClassNames, check_same_classes, registered_thing_classes
from .coco_format import (
    add_dataset_argument,
    register_coco_format_datasets,
    register_config_datasets,
    register_lazy_config_datasets,
)
from .curriculum import CurriculumSampler, load_scores
from .datasets import prepare_datasets, register_synthetic_datasets, synthetic_root
from .empty import EmptyDatasetError, empty_dataset_errors
from .image_check import ImageCheck, check_image, check_images
from .stream import ResumableTrainLoader, build_resumable_train_loader
from .synthetic import (
    CLASS_NAMES,
    SyntheticSpec,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
)
from .validation import (
    DatasetError,
    validate_coco_json,
    validate_registered_datasets,
    validate_voc_dataset,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]

"""Registration of kd_det's synthetic dataset in Detectron2's catalogs.

Registered names (COCO evaluation / PASCAL VOC evaluation on the same images)::

    kd_synthetic_train, kd_synthetic_val
    kd_synthetic_voc_train, kd_synthetic_voc_val

The files live in ``$DETECTRON2_DATASETS/kd_synthetic`` (default ``./datasets``)
and are generated on first use.  Call :func:`prepare_datasets` before starting
several processes so that only one generates them.
"""

import os
from typing import Callable, Dict, Iterable

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json, load_voc_instances

from .synthetic import CLASS_NAMES, SyntheticSpec, ensure_synthetic_dataset

__all__ = ["synthetic_root", "register_synthetic_datasets", "prepare_datasets"]

# name -> function that makes the dataset's files exist
_PREPARERS: Dict[str, Callable[[], None]] = {}


def synthetic_root() -> str:
    return os.path.join(
        os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets")), "kd_synthetic"
    )


def register_synthetic_datasets(
    root: str = None, spec: SyntheticSpec = SyntheticSpec(), prefix="kd_synthetic"
):
    """Register the COCO- and VOC-format views of the synthetic dataset at ``root``."""
    root = root or synthetic_root()

    def ensure():
        ensure_synthetic_dataset(root, spec)

    image_root = os.path.join(root, "JPEGImages")
    for split in ("train", "val"):
        coco_name = "{}_{}".format(prefix, split)
        json_file = os.path.join(root, "annotations", "instances_{}.json".format(split))

        def load_coco(json_file=json_file, name=coco_name):
            ensure()
            return load_coco_json(json_file, image_root, name)

        DatasetCatalog.register(coco_name, load_coco)
        MetadataCatalog.get(coco_name).set(
            json_file=json_file,
            image_root=image_root,
            evaluator_type="coco",
            thing_classes=list(CLASS_NAMES),
        )
        voc_name = "{}_voc_{}".format(prefix, split)

        def load_voc(split=split):
            ensure()
            return load_voc_instances(root, split, CLASS_NAMES)

        DatasetCatalog.register(voc_name, load_voc)
        MetadataCatalog.get(voc_name).set(
            thing_classes=list(CLASS_NAMES),
            dirname=root,
            year=2007,
            split=split,
            evaluator_type="pascal_voc",
        )
        _PREPARERS[coco_name] = _PREPARERS[voc_name] = ensure


def prepare_datasets(names: Iterable[str]) -> None:
    """Generate the files of every kd_det-generated dataset among ``names`` (others are left
    alone)."""
    for name in names:
        if name in _PREPARERS:
            _PREPARERS[name]()

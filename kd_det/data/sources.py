"""Where a registered dataset's records come from, to name it in error messages."""

import os
from typing import List, Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog

__all__ = ["dataset_source", "image_dirs"]


def dataset_source(name: str) -> Optional[str]:
    """
    The annotation file of dataset ``name`` as "json <file>" (COCO format: ``json_file``
    metadata) or "split file <file>" (PASCAL VOC format: ``dirname`` and ``split``); None for
    other (custom) registrations.
    """
    meta = MetadataCatalog.get(name)
    if getattr(meta, "json_file", None):
        return "json {}".format(meta.json_file)
    dirname, split = getattr(meta, "dirname", None), getattr(meta, "split", None)
    if dirname and split:
        return "split file {}".format(os.path.join(dirname, "ImageSets", "Main", split + ".txt"))
    return None


def image_dirs(names: Sequence[str]) -> List[Tuple[str, str]]:
    """
    (directory, dataset name) for every dataset of ``names`` whose images live under a known
    directory (COCO: ``image_root``; VOC: ``dirname``), longest directory first, so that the
    first whose directory holds an image file names its dataset.
    """
    dirs = []
    for name in names:
        meta = MetadataCatalog.get(name)
        root = getattr(meta, "image_root", None) or getattr(meta, "dirname", None)
        if root:
            dirs.append((os.path.abspath(root), name))
    return sorted(dirs, key=lambda d: -len(d[0]))

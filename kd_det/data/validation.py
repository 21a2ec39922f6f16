"""
Checks of COCO-format detection datasets before training starts, so that bad data
fails at once with the file, the record and the fix, not hours in (or silently).
"""

import json
import os
from typing import Dict, Iterable, List

from detectron2.data import MetadataCatalog

__all__ = ["DatasetError", "validate_coco_json", "validate_registered_datasets"]


class DatasetError(ValueError):
    """A dataset file that cannot be trained on; the message names the file, the record and the fix."""


def _fail(json_file: str, what: str, fix: str):
    raise DatasetError("{}: {}. {}".format(json_file, what, fix))


def validate_coco_json(json_file: str, image_root: str, check_images: bool = True, tolerance: float = 1.0) -> Dict:
    """
    Validate a COCO instances file and its images.

    Checks: the file parses as JSON and has ``images``, ``annotations`` and
    ``categories`` lists; every image record has ``id``, ``file_name``, positive
    ``width``/``height``; image ids are unique; every annotation names an existing
    image and category and has a ``bbox`` [x, y, w, h] with w > 0, h > 0 inside the
    image (``tolerance`` pixels of slack, as annotation tools round); with
    ``check_images``, every image file exists and its header can be read.

    Returns:
        {"images": n, "annotations": n, "categories": n}
    Raises:
        DatasetError naming the file and the offending record.
    """
    if not os.path.isfile(json_file):
        _fail(json_file, "file not found", "Check the dataset path ($DETECTRON2_DATASETS) or the registration.")
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(json_file, "not valid JSON ({})".format(e), "Regenerate or re-download the annotation file.")
    if not isinstance(data, dict):
        _fail(json_file, "top level is a {}, not an object".format(type(data).__name__),
              "A COCO instances file is an object with 'images', 'annotations' and 'categories'.")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            _fail(json_file, "missing or non-list '{}'".format(key),
                  "A COCO instances file needs 'images', 'annotations' and 'categories' lists.")

    category_ids = {c.get("id") for c in data["categories"]}
    images = {}
    for i, img in enumerate(data["images"]):
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                _fail(json_file, "images[{}] has no '{}'".format(i, key), "Every image record needs id, file_name, "
                      "width and height.")
        if not (isinstance(img["width"], (int, float)) and isinstance(img["height"], (int, float))
                and img["width"] > 0 and img["height"] > 0):
            _fail(json_file, "image id {} ({}) has width/height {}x{}".format(
                img["id"], img["file_name"], img["width"], img["height"]), "Sizes must be positive numbers.")
        if img["id"] in images:
            _fail(json_file, "image id {} appears twice".format(img["id"]), "Image ids must be unique.")
        images[img["id"]] = img

    for i, ann in enumerate(data["annotations"]):
        ident = "annotation id {} (annotations[{}])".format(ann.get("id", "?"), i)
        if ann.get("image_id") not in images:
            _fail(json_file, "{} refers to image_id {!r}, which is not in 'images'".format(ident, ann.get("image_id")),
                  "Remove the annotation or add its image.")
        if ann.get("category_id") not in category_ids:
            _fail(json_file, "{} has category_id {!r}, not one of the categories {}".format(
                ident, ann.get("category_id"), sorted(category_ids)), "Fix the category id or the category list.")
        bbox = ann.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)):
            _fail(json_file, "{} has bbox {!r}".format(ident, bbox), "A COCO bbox is [x, y, width, height].")
        x, y, w, h = bbox
        img = images[ann["image_id"]]
        if w <= 0 or h <= 0:
            _fail(json_file, "{} in {} has a box of non-positive size {}x{}".format(ident, img["file_name"], w, h),
                  "Remove degenerate boxes (or mark them iscrowd/ignore).")
        if x < -tolerance or y < -tolerance or x + w > img["width"] + tolerance or y + h > img["height"] + tolerance:
            _fail(json_file, "{} in {} has box [{}, {}, {}, {}] outside the {}x{} image".format(
                ident, img["file_name"], x, y, w, h, img["width"], img["height"]),
                "Clip boxes to the image, or correct the image's width/height.")

    if check_images:
        from PIL import Image

        for img in images.values():
            path = os.path.join(image_root, img["file_name"])
            if not os.path.isfile(path):
                _fail(json_file, "image id {}: file {} not found".format(img["id"], path),
                      "Check the image root ({}) or remove the record.".format(image_root))
            try:
                with Image.open(path) as im:  # reads the header only
                    im.size
            except Exception as e:
                _fail(json_file, "image id {}: {} cannot be read ({}: {})".format(img["id"], path, type(e).__name__, e),
                      "Replace the corrupt file or remove the record.")
    return {k: len(data[k]) for k in ("images", "annotations", "categories")}


def validate_registered_datasets(names: Iterable[str], check_images: bool = True) -> List[str]:
    """
    Validate every COCO-format dataset among ``names`` (those whose metadata has
    ``json_file`` and ``image_root``); others (VOC, custom loaders) are skipped.
    Returns the names validated.
    """
    done = []
    for name in names:
        meta = MetadataCatalog.get(name)
        json_file, image_root = getattr(meta, "json_file", None), getattr(meta, "image_root", None)
        if json_file and image_root:
            validate_coco_json(json_file, image_root, check_images)
            done.append(name)
    return done

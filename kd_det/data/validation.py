"""
Checks of COCO- and PASCAL VOC-format detection datasets before training starts, so
that bad data fails at once with the file, the record and the fix, not hours in (in a
data-loader worker, or in the evaluator after the last iteration) or silently.
"""

import json
import logging
import os
import xml.etree.ElementTree as ET
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

from detectron2.data import MetadataCatalog

from . import image_check
from .empty import empty_dataset_message

__all__ = [
    "DatasetError",
    "validate_coco_json",
    "validate_voc_dataset",
    "validate_registered_datasets",
]

logger = logging.getLogger(__name__)
# problems listed in one error; the count says how many more there are
_MAX_LISTED = 20


class DatasetError(ValueError):
    """A dataset file that cannot be trained on; the message names the file, the record and the
    fix."""


def _fail(json_file: str, what: str, fix: str):
    raise DatasetError("{}: {}. {}".format(json_file, what, fix))


class _ImageRecord:
    """One image a dataset file refers to: how to name it, its path, the size the file states."""

    def __init__(self, label: str, path: str, size: Optional[Tuple[int, int]], source: str):
        self.label, self.path, self.size, self.source = label, path, size, source


def _check_image_files(
    source: str,
    records: List[_ImageRecord],
    fixes: Dict[str, str],
    size_field: str,
    cache_file: Optional[str],
    processes: Optional[int],
) -> None:
    """
    Decode every image of ``records`` completely (:func:`kd_det.data.image_check.check_images`:
    parallel, cached) and fail with all that cannot be used: missing, undecodable, or of another
    size than ``size_field`` states. Files that decode but are misnamed are logged as warnings.

    Args:
        source: the dataset file the error is about (the COCO json, the VOC split file).
        fixes: {"missing" | "unreadable" | "size": the fix for that kind of problem}.
    """
    results = image_check.check_images(
        [r.path for r in records],
        cache_file=cache_file,
        processes=processes,
        desc="decoding the images of {}".format(os.path.basename(source)),
    )
    problems: List[Tuple[str, str]] = []  # (kind, text)
    warnings = []
    for r in records:
        result = results[r.path]
        if result.error == "file not found":
            problems.append(("missing", "{}: file {} not found".format(r.label, r.path)))
        elif result.error is not None:
            problems.append(
                ("unreadable", "{}: {} cannot be read ({})".format(r.label, r.path, result.error))
            )
        elif r.size is not None and tuple(result.size) != tuple(r.size):
            problems.append(
                (
                    "size",
                    "{}: {} says {}x{} (width x height) but {} is {}x{}{}".format(
                        r.label,
                        size_field,
                        r.size[0],
                        r.size[1],
                        r.path,
                        result.size[0],
                        result.size[1],
                        " after its EXIF orientation" if result.transposed else "",
                    ),
                )
            )
        elif result.warning:
            warnings.append(result.warning)
    for w in warnings[:_MAX_LISTED]:
        logger.warning(w)
    if len(warnings) > _MAX_LISTED:
        logger.warning("... and {} more misnamed image files".format(len(warnings) - _MAX_LISTED))
    if not problems:
        return
    kinds = [k for k in ("missing", "unreadable", "size") if any(p[0] == k for p in problems)]
    fix = " ".join(fixes[k] + "." for k in kinds)
    if len(problems) == 1:
        raise DatasetError("{}: {}. {}".format(source, problems[0][1], fix))
    listed = "\n".join("  " + text for _, text in problems[:_MAX_LISTED])
    more = len(problems) - _MAX_LISTED
    raise DatasetError(
        "{}: {} of {} images cannot be used:\n{}{}\n{}".format(
            source,
            len(problems),
            len(records),
            listed,
            "\n  ... and {} more".format(more) if more > 0 else "",
            fix,
        )
    )


def validate_coco_json(
    json_file: str,
    image_root: str,
    check_images: bool = True,
    tolerance: float = 1.0,
    cache_file: Optional[str] = None,
    processes: Optional[int] = None,
) -> Dict:
    """
    Validate a COCO instances file and its images.

    Checks: the file parses as JSON and has ``images``, ``annotations`` and
    ``categories`` lists; every image record has ``id``, ``file_name``, positive
    ``width``/``height``; image ids are unique; every annotation names an existing
    image and category and has a ``bbox`` [x, y, w, h] with w > 0, h > 0 inside the
    image (``tolerance`` pixels of slack, as annotation tools round); with
    ``check_images``, every image file exists, decodes completely and has the record's
    width/height after EXIF orientation (:mod:`kd_det.data.image_check`, in ``processes``
    processes, with results cached in ``cache_file``; see ``check_images`` there).

    Returns:
        {"images": n, "annotations": n, "categories": n, "annotated_images": n}, the last
        the images with a non-crowd annotation (those Detectron2 trains on with
        ``DATALOADER.FILTER_EMPTY_ANNOTATIONS``).
    Raises:
        DatasetError naming the file and the offending record.
    """
    if not os.path.isfile(json_file):
        _fail(
            json_file,
            "file not found",
            "Check the dataset path ($DETECTRON2_DATASETS) or the registration.",
        )
    try:
        with open(json_file) as f:
            data = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        _fail(
            json_file,
            "not valid JSON ({})".format(e),
            "Regenerate or re-download the annotation file.",
        )
    if not isinstance(data, dict):
        _fail(
            json_file,
            "top level is a {}, not an object".format(type(data).__name__),
            "A COCO instances file is an object with 'images', 'annotations' and 'categories'.",
        )
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            _fail(
                json_file,
                "missing or non-list '{}'".format(key),
                "A COCO instances file needs 'images', 'annotations' and 'categories' lists.",
            )

    category_ids = {c.get("id") for c in data["categories"]}
    images = {}
    for i, img in enumerate(data["images"]):
        for key in ("id", "file_name", "width", "height"):
            if key not in img:
                _fail(
                    json_file,
                    "images[{}] has no '{}'".format(i, key),
                    "Every image record needs id, file_name, " "width and height.",
                )
        if not (
            isinstance(img["width"], (int, float))
            and isinstance(img["height"], (int, float))
            and img["width"] > 0
            and img["height"] > 0
        ):
            _fail(
                json_file,
                "image id {} ({}) has width/height {}x{}".format(
                    img["id"], img["file_name"], img["width"], img["height"]
                ),
                "Sizes must be positive numbers.",
            )
        if img["id"] in images:
            _fail(
                json_file,
                "image id {} appears twice".format(img["id"]),
                "Image ids must be unique.",
            )
        images[img["id"]] = img

    for i, ann in enumerate(data["annotations"]):
        ident = "annotation id {} (annotations[{}])".format(ann.get("id", "?"), i)
        if ann.get("image_id") not in images:
            _fail(
                json_file,
                "{} refers to image_id {!r}, which is not in 'images'".format(
                    ident, ann.get("image_id")
                ),
                "Remove the annotation or add its image.",
            )
        if ann.get("category_id") not in category_ids:
            _fail(
                json_file,
                "{} has category_id {!r}, not one of the categories {}".format(
                    ident, ann.get("category_id"), sorted(category_ids)
                ),
                "Fix the category id or the category list.",
            )
        bbox = ann.get("bbox")
        if not (
            isinstance(bbox, list)
            and len(bbox) == 4
            and all(isinstance(v, (int, float)) for v in bbox)
        ):
            _fail(
                json_file,
                "{} has bbox {!r}".format(ident, bbox),
                "A COCO bbox is [x, y, width, height].",
            )
        x, y, w, h = bbox
        img = images[ann["image_id"]]
        if w <= 0 or h <= 0:
            _fail(
                json_file,
                "{} in {} has a box of non-positive size {}x{}".format(
                    ident, img["file_name"], w, h
                ),
                "Remove degenerate boxes (or mark them iscrowd/ignore).",
            )
        if (
            x < -tolerance
            or y < -tolerance
            or x + w > img["width"] + tolerance
            or y + h > img["height"] + tolerance
        ):
            if check_images:  # the record's size may be the cause: say so first
                _fail_on_size_mismatch(
                    json_file,
                    "image id {}".format(img["id"]),
                    os.path.join(image_root, img["file_name"]),
                    (img["width"], img["height"]),
                    "the json",
                    "Correct the record's width/height (Detectron2 stops with a "
                    "SizeMismatchError at this image).",
                )
            _fail(
                json_file,
                "{} in {} has box [{}, {}, {}, {}] outside the {}x{} image".format(
                    ident, img["file_name"], x, y, w, h, img["width"], img["height"]
                ),
                "Clip boxes to the image, or correct the image's width/height.",
            )

    if check_images:
        records = [
            _ImageRecord(
                "image id {}".format(img["id"]),
                os.path.join(image_root, img["file_name"]),
                (img["width"], img["height"]),
                json_file,
            )
            for img in images.values()
        ]
        _check_image_files(
            json_file,
            records,
            {
                "missing": "Check the image root ({}) or remove the records".format(image_root),
                "unreadable": "Replace the unreadable files (re-download or re-export them) or "
                "remove their records",
                "size": "Correct the records' width/height (Detectron2 stops with a "
                "SizeMismatchError at such an image)",
            },
            "the json",
            cache_file,
            processes,
        )
    annotated = {
        a["image_id"] for a in data["annotations"] if not a.get("iscrowd", 0)
    }  # Detectron2's filter_images_with_only_crowd_annotations keeps these
    stats = {k: len(data[k]) for k in ("images", "annotations", "categories")}
    stats["annotated_images"] = len(annotated)
    return stats


def _fail_on_size_mismatch(
    source: str, label: str, path: str, size: Tuple[int, int], size_field: str, fix: str
) -> None:
    """Fail when the header of ``path`` gives another size than ``size`` (cheap: no decode)."""
    try:
        actual = image_check.image_size(path)
    except Exception:  # missing or unreadable: the image check reports it later
        return
    if tuple(actual) != tuple(size):
        _fail(
            source,
            "{}: {} says {}x{} (width x height) but {} is {}x{}, so its boxes fall outside "
            "the image".format(label, size_field, size[0], size[1], path, actual[0], actual[1]),
            fix,
        )


def _voc_text(xml_file: str, element, path: str, what: str, convert=str):
    """``element.find(path).text`` through ``convert``; a missing or malformed field fails naming
    ``what``."""
    node = element.find(path)
    if node is None or node.text is None:
        _fail(
            xml_file,
            "{} has no <{}>".format(what, path),
            "Add the field (PASCAL VOC annotation format).",
        )
    try:
        return convert(node.text.strip())
    except ValueError:
        _fail(
            xml_file,
            "{} has <{}> {!r}, not {}".format(
                what, path, node.text, "an integer" if convert is int else "a number"
            ),
            "Write {} there.".format(
                "an integer (the PASCAL VOC evaluator parses it with int())"
                if convert is int
                else "a number"
            ),
        )


def validate_voc_dataset(
    dirname: str,
    split: str,
    class_names: Sequence[str],
    check_images: bool = True,
    for_evaluation: bool = False,
    tolerance: float = 1.0,
    cache_file: Optional[str] = None,
    processes: Optional[int] = None,
) -> Dict:
    """
    Validate a PASCAL VOC-format split as Detectron2 reads it (``load_voc_instances``).

    Checks: ``ImageSets/Main/{split}.txt`` exists and lists one image id per line;
    every id has ``Annotations/{id}.xml`` that parses, with a positive integer
    ``<size>`` and objects whose ``<name>`` is one of ``class_names`` and whose
    ``<bndbox>`` (1-based, inclusive) has xmax > xmin, ymax > ymin and lies in the image
    (``tolerance`` pixels of slack). With ``for_evaluation`` (the split is evaluated by
    ``PascalVOCDetectionEvaluator``), also what that evaluator parses: ``<pose>``,
    integer ``<truncated>`` and ``<difficult>`` and integer box corners. With
    ``check_images``, ``JPEGImages/{id}.jpg`` exists, decodes completely, and its size
    (after EXIF orientation) is the annotated one, which Detectron2 otherwise checks
    only when a data-loader worker reaches the image (decoded as in
    :func:`validate_coco_json`, in ``processes`` processes, cached in ``cache_file``).

    Returns:
        {"images": n, "objects": n, "annotated_images": n}, the last the images with at
        least one object.
    Raises:
        DatasetError naming the file and the offending record.
    """
    split_file = os.path.join(dirname, "ImageSets", "Main", split + ".txt")
    if not os.path.isfile(split_file):
        _fail(
            split_file,
            "file not found",
            "Check the dataset path ($DETECTRON2_DATASETS holds VOC2007/, VOC2012/) "
            "or the registration's dirname and split.",
        )
    ids = []
    with open(split_file) as f:
        for line_number, line in enumerate(f, 1):
            fields = line.split()
            if len(fields) > 1:
                _fail(
                    split_file,
                    "line {} has {} fields ({!r})".format(line_number, len(fields), line.strip()),
                    "A split file lists one image id per line (the per-class files such as "
                    "aeroplane_train.txt are not split files).",
                )
            ids.extend(fields)
    if not ids:
        _fail(split_file, "lists no images", "Write one image id per line.")

    classes = set(class_names)
    objects = 0
    annotated = 0
    records = []
    for image_id in ids:
        xml_file = os.path.join(dirname, "Annotations", image_id + ".xml")
        if not os.path.isfile(xml_file):
            _fail(
                xml_file,
                "not found (image id {!r} is listed in {})".format(image_id, split_file),
                "Add the annotation file or remove the id from the split file.",
            )
        try:
            tree = ET.parse(xml_file)
        except ET.ParseError as e:
            _fail(
                xml_file,
                "not valid XML ({})".format(e),
                "Regenerate or re-download the annotation file.",
            )
        width = _voc_text(xml_file, tree, "size/width", "the annotation", int)
        height = _voc_text(xml_file, tree, "size/height", "the annotation", int)
        if width <= 0 or height <= 0:
            _fail(
                xml_file,
                "<size> is {}x{}".format(width, height),
                "Write the image's width and height in pixels.",
            )
        for k, obj in enumerate(tree.findall("object")):
            what = "object {}".format(k)
            name = _voc_text(xml_file, obj, "name", what)
            if name not in classes:
                _fail(
                    xml_file,
                    "object {} is named {!r}, not one of the {} classes {}".format(
                        k, name, len(class_names), list(class_names)
                    ),
                    "Fix the name, or register the dataset with its own class names "
                    "(detectron2.data.datasets.register_pascal_voc(..., class_names=...)).",
                )
            corner = int if for_evaluation else float
            x0, y0, x1, y1 = (
                _voc_text(xml_file, obj, "bndbox/" + c, what, corner)
                for c in ("xmin", "ymin", "xmax", "ymax")
            )
            if x1 <= x0 or y1 <= y0:
                _fail(
                    xml_file,
                    (
                        "object {} ({}) has box xmin={} ymin={} xmax={} ymax={} "
                        "of non-positive size"
                    ).format(k, name, x0, y0, x1, y1),
                    "Remove the degenerate box or fix its corners.",
                )
            # 1-based inclusive corners: the image spans 1..width, 1..height
            if (
                x0 < 1 - tolerance
                or y0 < 1 - tolerance
                or x1 > width + tolerance
                or y1 > height + tolerance
            ):
                if check_images:  # <size> may be the cause: say so first
                    _fail_on_size_mismatch(
                        xml_file,
                        "object {} ({})".format(k, name),
                        os.path.join(dirname, "JPEGImages", image_id + ".jpg"),
                        (width, height),
                        "<size>",
                        "Correct <size> (Detectron2 stops training at this image otherwise)",
                    )
                _fail(
                    xml_file,
                    "object {} ({}) has box xmin={} ymin={} xmax={} ymax={} outside the {}x{} "
                    "image".format(k, name, x0, y0, x1, y1, width, height),
                    "Clip the box to the image (VOC corners are 1-based), or correct <size>.",
                )
            if for_evaluation:
                _voc_text(xml_file, obj, "pose", what)
                _voc_text(xml_file, obj, "truncated", what, int)
                _voc_text(xml_file, obj, "difficult", what, int)
            objects += 1
        annotated += bool(tree.findall("object"))
        records.append(
            _ImageRecord(
                xml_file,
                os.path.join(dirname, "JPEGImages", image_id + ".jpg"),
                (width, height),
                split_file,
            )
        )
    if check_images:
        _check_image_files(
            split_file,
            records,
            {
                "missing": "Add the images or remove their ids from {}".format(split_file),
                "unreadable": "Replace the unreadable files (re-download or re-export them) or "
                "remove their ids from {}".format(split_file),
                "size": "Correct <size> (Detectron2 stops training at such an image otherwise)",
            },
            "<size>",
            cache_file,
            processes,
        )
    return {"images": len(ids), "objects": objects, "annotated_images": annotated}


def validate_registered_datasets(
    names: Iterable[str],
    check_images: bool = True,
    voc_evaluated: Iterable[str] = (),
    filter_empty: Iterable[str] = (),
    cache_file: Optional[str] = None,
    processes: Optional[int] = None,
    filter_key: str = "DATALOADER.FILTER_EMPTY_ANNOTATIONS",
) -> List[str]:
    """
    Validate every COCO-format dataset among ``names`` (those whose metadata has
    ``json_file`` and ``image_root``) and every PASCAL VOC-format one (``dirname``,
    ``split`` and ``thing_classes``, as ``register_pascal_voc`` sets); others (custom
    loaders) are skipped. Those in ``voc_evaluated`` are also checked for what
    ``PascalVOCDetectionEvaluator`` needs; those in ``filter_empty`` (training sets whose
    images without annotations are dropped, ``filter_key`` True) must keep at least one image.
    ``check_images``, ``cache_file`` and ``processes``: see :func:`validate_coco_json`.
    Returns the names validated.
    """
    voc_evaluated, filter_empty = set(voc_evaluated), set(filter_empty)
    done = []
    for name in names:
        meta = MetadataCatalog.get(name)
        json_file, image_root = getattr(meta, "json_file", None), getattr(meta, "image_root", None)
        dirname, split = getattr(meta, "dirname", None), getattr(meta, "split", None)
        if json_file and image_root:
            stats = validate_coco_json(
                json_file, image_root, check_images, cache_file=cache_file, processes=processes
            )
        elif dirname and split and getattr(meta, "thing_classes", None):
            if name in voc_evaluated and getattr(meta, "year", None) not in (2007, 2012):
                raise DatasetError(
                    "dataset {!r} is evaluated with PASCAL VOC AP but its metadata has year={!r}. "
                    "Register it with year=2007 (11-point AP) or 2012 (area under the curve), or "
                    "set TEST.EVALUATOR.".format(name, getattr(meta, "year", None))
                )
            stats = validate_voc_dataset(
                dirname,
                split,
                meta.thing_classes,
                check_images,
                for_evaluation=name in voc_evaluated,
                cache_file=cache_file,
                processes=processes,
            )
        else:
            continue
        if name in filter_empty and not stats["annotated_images"]:
            raise DatasetError(empty_dataset_message([name], bool(stats["images"]), filter_key))
        done.append(name)
    return done

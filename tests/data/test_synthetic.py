"""The generated default dataset."""

import filecmp
import json
import os

import numpy as np
from conftest import TINY_PREFIX, TINY_SPEC
from detectron2.data import DatasetCatalog, MetadataCatalog

from kd_det.data import (
    CLASS_NAMES,
    SyntheticSpec,
    ensure_synthetic_dataset,
    generate_synthetic_dataset,
)
from kd_det.data.synthetic import render_image


def test_generation_is_deterministic(tmp_path):
    spec = SyntheticSpec(num_train=5, num_val=3, image_size=48, seed=11)
    generate_synthetic_dataset(str(tmp_path / "a"), spec)
    generate_synthetic_dataset(str(tmp_path / "b"), spec)
    cmp = filecmp.dircmp(str(tmp_path / "a"), str(tmp_path / "b"))
    assert not cmp.diff_files and not cmp.left_only and not cmp.right_only
    for sub in ("JPEGImages", "Annotations", "annotations"):
        match, mismatch, errors = filecmp.cmpfiles(
            str(tmp_path / "a" / sub),
            str(tmp_path / "b" / sub),
            os.listdir(str(tmp_path / "a" / sub)),
            shallow=False,
        )
        assert match and not mismatch and not errors
    other = SyntheticSpec(num_train=5, num_val=3, image_size=48, seed=12)
    assert not np.array_equal(render_image(spec, 0, "train")[0], render_image(other, 0, "train")[0])


def test_ensure_does_not_regenerate(tmp_path):
    spec = SyntheticSpec(num_train=3, num_val=2, image_size=32)
    root = str(tmp_path / "d")
    ensure_synthetic_dataset(root, spec)
    stamp = os.stat(os.path.join(root, "SPEC.json")).st_mtime_ns
    ensure_synthetic_dataset(root, spec)
    assert os.stat(os.path.join(root, "SPEC.json")).st_mtime_ns == stamp
    ensure_synthetic_dataset(
        root, SyntheticSpec(num_train=4, num_val=2, image_size=32)
    )  # new spec: regenerated
    assert len(os.listdir(os.path.join(root, "JPEGImages"))) == 6


def test_coco_and_voc_views_agree(tiny_data_root):
    coco = DatasetCatalog.get(TINY_PREFIX + "_train")
    voc = DatasetCatalog.get(TINY_PREFIX + "_voc_train")
    assert len(coco) == len(voc) == TINY_SPEC.num_train
    assert MetadataCatalog.get(TINY_PREFIX + "_train").thing_classes == list(CLASS_NAMES)
    assert MetadataCatalog.get(TINY_PREFIX + "_voc_val").evaluator_type == "pascal_voc"
    for c, v in zip(coco, voc):
        assert os.path.basename(c["file_name"]) == os.path.basename(v["file_name"])
        cb = sorted((a["category_id"], *np.round(a["bbox"], 3)) for a in c["annotations"])
        # COCO stores XYWH, VOC XYXY; compare as XYXY
        cb = sorted((k, x, y, x + w, y + h) for k, x, y, w, h in cb)
        vb = sorted((a["category_id"], *np.round(a["bbox"], 3)) for a in v["annotations"])
        assert cb == vb


def test_annotations_are_valid_and_varied(tiny_data_root):
    with open(os.path.join(tiny_data_root, "annotations", "instances_train.json")) as f:
        data = json.load(f)
    size = TINY_SPEC.image_size
    boxes = np.array([a["bbox"] for a in data["annotations"]])
    assert (boxes[:, 2] > 0).all() and (boxes[:, 3] > 0).all()
    assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= size).all()
    assert (boxes[:, 1] + boxes[:, 3] <= size).all()
    assert len({a["category_id"] for a in data["annotations"]}) == len(CLASS_NAMES)


def test_default_dataset_has_small_medium_objects_and_occlusion():
    spec = SyntheticSpec()
    areas, overlaps = [], 0
    for i in range(60):
        _, objects = render_image(spec, i, "train")
        boxes = [o["bbox"] for o in objects]
        areas += [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
        for a in range(len(boxes)):
            for b in range(a + 1, len(boxes)):
                p, q = boxes[a], boxes[b]
                overlaps += min(p[2], q[2]) > max(p[0], q[0]) and min(p[3], q[3]) > max(p[1], q[1])
    areas = np.array(areas)
    assert (areas < 16**2).mean() > 0.2 and (
        areas > 32**2
    ).mean() > 0.05  # small and larger objects
    assert overlaps > 10  # occlusion happens

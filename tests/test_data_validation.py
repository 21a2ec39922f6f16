"""Bad dataset files fail before training, naming the file, the record and the fix."""

import copy
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, config_path
from PIL import Image

from kd_det.data import DatasetError, validate_coco_json


def _dataset(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in (1, 2):
        Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(root / "im{}.jpg".format(i))
    data = {
        "images": [{"id": 1, "file_name": "im1.jpg", "width": 40, "height": 30},
                   {"id": 2, "file_name": "im2.jpg", "width": 40, "height": 30}],
        "annotations": [{"id": 10, "image_id": 1, "category_id": 1, "bbox": [2, 3, 10, 12], "area": 120, "iscrowd": 0},
                        {"id": 11, "image_id": 2, "category_id": 2, "bbox": [20, 10, 19.5, 20], "area": 390,
                         "iscrowd": 0}],
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }
    return data, str(root)


def _write(tmp_path, data, name="instances.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return str(path)


def _broken(data, edit):
    data = copy.deepcopy(data)
    edit(data)
    return data


CASES = {
    "malformed json": ('{"images": [', r"not valid JSON"),
    "missing key": (lambda d: d.pop("annotations"), r"missing or non-list 'annotations'"),
    "unknown image": (lambda d: d["annotations"][0].update(image_id=99), r"annotation id 10 .*image_id 99"),
    "unknown category": (lambda d: d["annotations"][1].update(category_id=7), r"annotation id 11 .*category_id 7"),
    "zero width box": (lambda d: d["annotations"][0].update(bbox=[2, 3, 0, 12]), r"id 10 .* in im1.jpg .*non-positive"),
    "negative height box": (lambda d: d["annotations"][0].update(bbox=[2, 3, 4, -1]), r"non-positive size 4x-1"),
    "box outside image": (lambda d: d["annotations"][1].update(bbox=[30, 10, 15, 5]), r"id 11 .* in im2.jpg .*outside"),
    "bad bbox": (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"bbox \[1, 2, 3\]"),
    "missing image file": (lambda d: d["images"][1].update(file_name="gone.jpg"), r"gone.jpg not found"),
    "duplicate image id": (lambda d: d["images"][1].update(id=1), r"image id 1 appears twice"),
}


def test_valid_dataset_passes(tmp_path):
    data, root = _dataset(tmp_path)
    assert validate_coco_json(_write(tmp_path, data), root) == {"images": 2, "annotations": 2, "categories": 2}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_bad_input_is_named(case, tmp_path):
    data, root = _dataset(tmp_path)
    edit, pattern = CASES[case]
    path = _write(tmp_path, edit if isinstance(edit, str) else _broken(data, edit))
    with pytest.raises(DatasetError, match=pattern) as e:
        validate_coco_json(path, root)
    assert str(e.value).startswith(path)  # names the file


def test_unreadable_image(tmp_path):
    data, root = _dataset(tmp_path)
    with open(os.path.join(root, "im2.jpg"), "wb") as f:
        f.write(b"\x00not a jpeg")
    with pytest.raises(DatasetError, match=r"im2.jpg cannot be read"):
        validate_coco_json(_write(tmp_path, data), root)
    validate_coco_json(_write(tmp_path, data), root, check_images=False)  # annotation-only mode


def test_train_net_refuses_a_broken_dataset_before_training(tmp_path):
    data, root = _dataset(tmp_path)
    bad = _write(tmp_path, _broken(data, CASES["box outside image"][0]))
    register = tmp_path / "register_bad.py"
    # a user's own registration, then Detectron2-style training through kd_det's tool
    register.write_text(
        "import sys, runpy\n"
        "from detectron2.data.datasets import register_coco_instances\n"
        "register_coco_instances('bad_train', {{}}, {!r}, {!r})\n"
        "sys.argv = ['train_net.py'] + sys.argv[1:]\n"
        "runpy.run_path({!r}, run_name='__main__')\n".format(bad, root, os.path.join(REPO, "tools", "train_net.py")))
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(register), "--config-file",
                           config_path("synthetic/retinanet_R_18_FPN.yaml"), "DATASETS.TRAIN", "('bad_train',)",
                           "DATASETS.TEST", "()", "OUTPUT_DIR", str(out)], cwd=str(tmp_path), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode != 0
    assert "DatasetError" in proc.stderr and "annotation id 11 (annotations[1]) in im2.jpg" in proc.stderr and bad in proc.stderr
    assert not out.exists() or not any(p.suffix == ".pth" for p in out.iterdir())

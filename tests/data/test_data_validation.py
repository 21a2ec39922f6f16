"""Bad dataset files (COCO and PASCAL VOC format) fail before training, naming the file, the record
and the fix."""

import copy
import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, config_path
from detectron2.data import MetadataCatalog
from detectron2.data.datasets import load_voc_instances, register_pascal_voc
from detectron2.evaluation.pascal_voc_evaluation import parse_rec
from PIL import Image

from kd_det.data import (
    DatasetError,
    validate_coco_json,
    validate_registered_datasets,
    validate_voc_dataset,
)


def _dataset(tmp_path):
    root = tmp_path / "images"
    root.mkdir()
    for i in (1, 2):
        Image.new("RGB", (40, 30), (i * 50, 0, 0)).save(root / "im{}.jpg".format(i))
    data = {
        "images": [
            {"id": 1, "file_name": "im1.jpg", "width": 40, "height": 30},
            {"id": 2, "file_name": "im2.jpg", "width": 40, "height": 30},
        ],
        "annotations": [
            {
                "id": 10,
                "image_id": 1,
                "category_id": 1,
                "bbox": [2, 3, 10, 12],
                "area": 120,
                "iscrowd": 0,
            },
            {
                "id": 11,
                "image_id": 2,
                "category_id": 2,
                "bbox": [20, 10, 19.5, 20],
                "area": 390,
                "iscrowd": 0,
            },
        ],
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
    "unknown image": (
        lambda d: d["annotations"][0].update(image_id=99),
        r"annotation id 10 .*image_id 99",
    ),
    "unknown category": (
        lambda d: d["annotations"][1].update(category_id=7),
        r"annotation id 11 .*category_id 7",
    ),
    "zero width box": (
        lambda d: d["annotations"][0].update(bbox=[2, 3, 0, 12]),
        r"id 10 .* in im1.jpg .*non-positive",
    ),
    "negative height box": (
        lambda d: d["annotations"][0].update(bbox=[2, 3, 4, -1]),
        r"non-positive size 4x-1",
    ),
    "box outside image": (
        lambda d: d["annotations"][1].update(bbox=[30, 10, 15, 5]),
        r"id 11 .* in im2.jpg .*outside",
    ),
    "bad bbox": (lambda d: d["annotations"][1].update(bbox=[1, 2, 3]), r"bbox \[1, 2, 3\]"),
    "missing image file": (
        lambda d: d["images"][1].update(file_name="gone.jpg"),
        r"gone.jpg not found",
    ),
    "duplicate image id": (lambda d: d["images"][1].update(id=1), r"image id 1 appears twice"),
}


def test_valid_dataset_passes(tmp_path):
    data, root = _dataset(tmp_path)
    assert validate_coco_json(_write(tmp_path, data), root) == {
        "images": 2,
        "annotations": 2,
        "categories": 2,
        "annotated_images": 2,
    }


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


@pytest.mark.slow
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
        "runpy.run_path({!r}, run_name='__main__')\n".format(
            bad, root, os.path.join(REPO, "tools", "train_net.py")
        )
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(register),
            "--config-file",
            config_path("synthetic/retinanet_R_18_FPN.yaml"),
            "DATASETS.TRAIN",
            "('bad_train',)",
            "DATASETS.TEST",
            "()",
            "OUTPUT_DIR",
            str(out),
        ],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert (
        "DatasetError" in proc.stderr
        and "annotation id 11 (annotations[1]) in im2.jpg" in proc.stderr
        and bad in proc.stderr
    )
    assert not out.exists() or not any(p.suffix == ".pth" for p in out.iterdir())


# PASCAL VOC format: what Detectron2's loader and PascalVOCDetectionEvaluator read

VOC_CLASSES = ("cat", "dog")
VOC_OBJECT = (
    "<object><name>{name}</name><pose>Unspecified</pose><truncated>0</truncated>"
    "<difficult>0</difficult><bndbox><xmin>{x0}</xmin><ymin>{y0}</ymin><xmax>{x1}</xmax>"
    "<ymax>{y1}</ymax></bndbox></object>"
)


def _voc_xml(width=40, height=30, objects=(("cat", 2, 3, 12, 15),)):
    return (
        "<annotation><size><width>{}</width><height>{}</height><depth>3</depth></size>"
        "{}</annotation>"
    ).format(
        width,
        height,
        "".join(VOC_OBJECT.format(name=n, x0=a, y0=b, x1=c, y1=d) for n, a, b, c, d in objects),
    )


def _voc_dataset(tmp_path):
    root = tmp_path / "VOCtiny"
    for sub in ("Annotations", "JPEGImages", "ImageSets/Main"):
        (root / sub).mkdir(parents=True)
    for image_id in ("a1", "a2"):
        Image.new("RGB", (40, 30)).save(root / "JPEGImages" / (image_id + ".jpg"))
        (root / "Annotations" / (image_id + ".xml")).write_text(
            _voc_xml(objects=(("cat", 1, 1, 40, 30), ("dog", 20, 10, 35, 28)))
        )
    (root / "ImageSets/Main/train.txt").write_text("a1\na2\n")
    return root


def _edit_xml(image_id, text):
    return lambda root: (root / "Annotations" / (image_id + ".xml")).write_text(text)


def _remove_child(image_id, tag):
    def edit(root):
        path = root / "Annotations" / (image_id + ".xml")
        path.write_text(path.read_text().replace("<{0}>0</{0}>".format(tag), "", 1))

    return edit


# case -> (edit of the tiny VOC folder, error pattern, whether only evaluation needs the field)
VOC_CASES = {
    "missing split file": (
        lambda r: (r / "ImageSets/Main/train.txt").unlink(),
        r"train.txt: file not found",
        False,
    ),
    "per-class split file": (
        lambda r: (r / "ImageSets/Main/train.txt").write_text("a1  1\n"),
        r"train.txt: line 1 has 2 fields",
        False,
    ),
    "empty split file": (
        lambda r: (r / "ImageSets/Main/train.txt").write_text("\n"),
        r"lists no images",
        False,
    ),
    "missing annotation": (
        lambda r: (r / "Annotations/a2.xml").unlink(),
        r"a2.xml: not found \(image id 'a2'",
        False,
    ),
    "malformed xml": (_edit_xml("a2", "<annotation><size>"), r"a2.xml: not valid XML", False),
    "missing size": (
        _edit_xml("a1", "<annotation></annotation>"),
        r"a1.xml: the annotation has no <size/width>",
        False,
    ),
    "unknown class": (
        _edit_xml("a2", _voc_xml(objects=(("cat", 1, 1, 9, 9), ("horse", 2, 2, 8, 8)))),
        r"a2.xml: object 1 is named 'horse', not one of the 2 classes",
        False,
    ),
    "degenerate box": (
        _edit_xml("a1", _voc_xml(objects=(("dog", 5, 5, 5, 9),))),
        r"object 0 \(dog\).*non-positive",
        False,
    ),
    "box outside image": (
        _edit_xml("a1", _voc_xml(objects=(("cat", 30, 5, 45, 9),))),
        r"a1.xml: object 0 \(cat\) has box .*xmax=45.* outside the 40x30 image",
        False,
    ),
    "text corner": (
        _edit_xml("a1", _voc_xml(objects=(("cat", 1, 1, "ten", 9),))),
        r"object 0 has <bndbox/xmax> 'ten', not an integer",
        False,
    ),
    "image size mismatch": (
        _edit_xml("a2", _voc_xml(width=50)),
        r"a2.xml: <size> says 50x30 \(width x height\) but .*a2.jpg is 40x30",
        False,
    ),
    "missing image": (
        lambda r: (r / "JPEGImages/a1.jpg").unlink(),
        r"a1.xml: file .*a1.jpg not found",
        False,
    ),
    "fractional corner": (
        _edit_xml("a1", _voc_xml(objects=(("cat", 1.5, 1, 9, 9),))),
        r"object 0 has <bndbox/xmin> '1.5', not an integer",
        True,
    ),
    "missing difficult": (
        _remove_child("a2", "difficult"),
        r"a2.xml: object 0 has no <difficult>",
        True,
    ),
}


def test_valid_voc_dataset_passes(tmp_path):
    root = _voc_dataset(tmp_path)
    assert validate_voc_dataset(str(root), "train", VOC_CLASSES, for_evaluation=True) == {
        "images": 2,
        "objects": 4,
        "annotated_images": 2,
    }


@pytest.mark.parametrize("case", sorted(VOC_CASES))
def test_each_bad_voc_input_is_named(case, tmp_path):
    root = _voc_dataset(tmp_path)
    edit, pattern, evaluation_only = VOC_CASES[case]
    edit(root)
    with pytest.raises(DatasetError, match=pattern) as e:
        validate_voc_dataset(str(root), "train", VOC_CLASSES, for_evaluation=True)
    assert str(e.value).startswith(str(root))  # names the file
    if evaluation_only:  # Detectron2's training loader reads it; only the evaluator would fail
        validate_voc_dataset(str(root), "train", VOC_CLASSES, for_evaluation=False)
        load_voc_instances(str(root), "train", VOC_CLASSES)


def test_voc_checks_match_detectron2s_loader(tmp_path):
    """What the validator accepts, Detectron2 loads; what it rejects for the loader, the loader
    fails on too."""
    root = _voc_dataset(tmp_path)
    assert len(load_voc_instances(str(root), "train", VOC_CLASSES)) == 2
    for case in ("unknown class", "malformed xml", "missing size"):
        root = _voc_dataset(tmp_path / case.replace(" ", "_"))
        VOC_CASES[case][0](root)
        with pytest.raises(Exception):
            load_voc_instances(str(root), "train", VOC_CLASSES)
    for case, image_id in (("fractional corner", "a1"), ("missing difficult", "a2")):
        root = _voc_dataset(tmp_path / case.replace(" ", "_"))
        parse = parse_rec.__wrapped__  # the evaluator's parser, without its cache by file name
        parse(str(root / "Annotations" / (image_id + ".xml")))
        VOC_CASES[case][0](root)
        with pytest.raises(
            (ValueError, AttributeError)
        ):  # what the evaluator hits after the last iteration
            parse(str(root / "Annotations" / (image_id + ".xml")))


def test_unreadable_voc_image_and_annotation_only_mode(tmp_path):
    root = _voc_dataset(tmp_path)
    (root / "JPEGImages/a2.jpg").write_bytes(b"\x00not a jpeg")
    with pytest.raises(DatasetError, match=r"a2.jpg cannot be read"):
        validate_voc_dataset(str(root), "train", VOC_CLASSES)
    validate_voc_dataset(str(root), "train", VOC_CLASSES, check_images=False)


def test_registered_voc_dataset_is_checked_for_its_evaluator(tmp_path):
    root = _voc_dataset(tmp_path)
    _remove_child("a1", "truncated")(root)
    register_pascal_voc("kd_test_voc_tiny", str(root), "train", 2007, VOC_CLASSES)
    MetadataCatalog.get("kd_test_voc_tiny").evaluator_type = "pascal_voc"
    assert validate_registered_datasets(["kd_test_voc_tiny"]) == [
        "kd_test_voc_tiny"
    ]  # training reads no <truncated>
    with pytest.raises(DatasetError, match=r"a1.xml: object 0 has no <truncated>"):
        validate_registered_datasets(["kd_test_voc_tiny"], voc_evaluated=["kd_test_voc_tiny"])
    register_pascal_voc("kd_test_voc_year", str(root), "train", 2020, VOC_CLASSES)
    with pytest.raises(DatasetError, match=r"'kd_test_voc_year' .* year=2020"):
        validate_registered_datasets(["kd_test_voc_year"], voc_evaluated=["kd_test_voc_year"])


@pytest.mark.slow
def test_train_net_checks_an_evaluated_voc_dataset_for_its_evaluator(tmp_path):
    """The same VOC split trains (no <difficult> needed) but is refused as a VOC-evaluated test
    set."""
    root = _voc_dataset(tmp_path)
    _remove_child("a2", "difficult")(root)
    register = tmp_path / "register_voc.py"
    register.write_text(
        "import sys, runpy\n"
        "from detectron2.data import MetadataCatalog\n"
        "from detectron2.data.datasets import register_pascal_voc\n"
        "for name in ('tiny_voc_train', 'tiny_voc_test'):\n"
        "    register_pascal_voc(name, {!r}, 'train', 2007, {!r})\n"
        "    MetadataCatalog.get(name).evaluator_type = 'pascal_voc'\n"
        "sys.argv = ['train_net.py'] + sys.argv[1:]\n"
        "runpy.run_path({!r}, run_name='__main__')\n".format(
            str(root), VOC_CLASSES, os.path.join(REPO, "tools", "train_net.py")
        )
    )
    out = tmp_path / "out"
    proc = subprocess.run(
        [
            sys.executable,
            str(register),
            "--config-file",
            config_path("synthetic/retinanet_R_18_FPN.yaml"),
            "MODEL.RETINANET.NUM_CLASSES",
            "2",
            "DATASETS.TRAIN",
            "('tiny_voc_train',)",
            "DATASETS.TEST",
            "('tiny_voc_test',)",
            "OUTPUT_DIR",
            str(out),
        ],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert "DatasetError" in proc.stderr and str(root / "Annotations" / "a2.xml") in proc.stderr
    assert "object 0 has no <difficult>" in proc.stderr
    assert not out.exists() or not any(p.suffix == ".pth" for p in out.iterdir())

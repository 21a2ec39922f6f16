"""At training time a bad image is named with its dataset, or skipped and counted
(DATALOADER.SKIP_BAD_IMAGES); an empty training set is named with its file and the fixes."""

import argparse
import itertools
import json
import os

import numpy as np
import pytest
from conftest import REPO, tiny_cfg
from detectron2.data import (
    DatasetCatalog,
    DatasetMapper,
    MetadataCatalog,
    get_detection_dataset_dicts,
)
from detectron2.data.datasets import register_coco_instances
from PIL import Image

from kd_det.data import DatasetError, validate_registered_datasets
from kd_det.data.bad_images import SKIPPED_KEY, BadImageError, BadImageMapper, SkippedItemsHook
from kd_det.data.empty import EmptyDatasetError, empty_dataset_errors
from kd_det.engine import KDTrainer

RETINA = "synthetic/retinanet_R_18_FPN.yaml"


def _register(tmp_path, name, bad=(), annotated=True, n=4):
    """A registered COCO dataset of ``n`` 64x64 images; those in ``bad`` are truncated (the
    even ones of them) or empty files."""
    root = tmp_path / name
    root.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(1, n + 1):
        path = root / "im{}.jpg".format(i)
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
        if i in bad:
            data = path.read_bytes()
            path.write_bytes(data[: len(data) * 2 // 3] if i % 2 == 0 else b"")
        images.append({"id": i, "file_name": path.name, "width": 64, "height": 64})
        if annotated:
            annotations.append(
                {"id": i, "image_id": i, "category_id": 1, "bbox": [8, 8, 30, 30], "iscrowd": 0}
            )
    json_file = tmp_path / (name + ".json")
    json_file.write_text(
        json.dumps(
            {
                "images": images,
                "annotations": annotations,
                "categories": [{"id": 1, "name": "thing"}],
            }
        )
    )
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    register_coco_instances(name, {}, str(json_file), str(root))
    return str(json_file), root


def _cfg(tmp_path, name, *opts):
    return tiny_cfg(
        RETINA,
        tmp_path / "out",
        ["DATASETS.TRAIN", (name,), "DATASETS.TEST", (), "MODEL.RETINANET.NUM_CLASSES", 1]
        + list(opts),
    )


def test_training_error_names_the_file_and_dataset_across_worker_processes(tmp_path):
    json_file, root = _register(tmp_path, "kd_test_bad_only", bad=(2,), n=2)
    cfg = _cfg(tmp_path, "kd_test_bad_only", "DATALOADER.NUM_WORKERS", 1)
    # every batch holds im2.jpg (batch 2 of 2 images): the first one fails
    with pytest.raises(BadImageError) as e:
        next(iter(KDTrainer.build_train_loader(cfg)))
    message = str(e.value)
    assert str(root / "im2.jpg") in message and "image file is truncated" in message
    assert "dataset 'kd_test_bad_only' (json {})".format(json_file) in message
    assert "DATALOADER.SKIP_BAD_IMAGES True" in message and "DATASETS.VALIDATE full" in message


def test_mapper_errors_that_are_not_bad_images_stop_even_when_skipping(tmp_path):
    def broken(dataset_dict):
        raise KeyError("annotations")

    mapper = BadImageMapper(broken, ["kd_x"], skip=True)
    with pytest.raises(
        BadImageError, match=r"image a.jpg \(image_id 3\) of dataset 'kd_x'.*" r"KeyError"
    ) as e:
        mapper({"file_name": "a.jpg", "image_id": 3})
    assert "SKIP_BAD_IMAGES" not in str(e.value)  # skipping would not help


def test_a_skipped_item_is_replaced_by_an_item_mapped_before():
    def mapper(dataset_dict):
        if dataset_dict["file_name"].startswith("bad"):
            raise OSError("image file is truncated (6 bytes not processed)")
        return dict(dataset_dict, mapped=True)

    wrapped = BadImageMapper(mapper, skip=True)
    assert wrapped({"file_name": "good.jpg"}) == {"file_name": "good.jpg", "mapped": True}
    assert wrapped({"file_name": "bad.jpg"}) == {
        "file_name": "good.jpg",
        "mapped": True,
        SKIPPED_KEY: 1,
    }
    assert SKIPPED_KEY not in wrapped({"file_name": "good2.jpg"})  # reported once


def test_skipping_stops_when_everything_fails():
    works = [True]

    def mapper(dataset_dict):
        if not works[0]:
            raise FileNotFoundError(dataset_dict["file_name"])
        return dataset_dict

    wrapped = BadImageMapper(mapper, skip=True, max_consecutive=3)
    wrapped({"file_name": "a.jpg"})
    works[0] = False  # e.g. the image folder went away
    with pytest.raises(BadImageError, match=r"3 dataset items in a row failed .*wrong image root"):
        wrapped({"file_name": "b.jpg"})


def test_a_workers_first_bad_item_is_replaced_from_the_records(tmp_path):
    _register(tmp_path, "kd_test_first_bad", bad=(1,), n=3)
    cfg = _cfg(tmp_path, "kd_test_first_bad", "DATALOADER.SKIP_BAD_IMAGES", True)
    wrapped = BadImageMapper(DatasetMapper(cfg, True), ["kd_test_first_bad"], skip=True)
    first = DatasetCatalog.get("kd_test_first_bad")[0]
    assert first["file_name"].endswith("im1.jpg")
    data = wrapped(first)
    assert os.path.basename(data["file_name"]) in ("im2.jpg", "im3.jpg")
    assert data[SKIPPED_KEY] >= 1 and data["image"].shape == (3, 64, 64)


def test_skipped_items_are_counted_across_worker_processes(tmp_path):
    _register(tmp_path, "kd_test_some_bad", bad=(2, 3))
    cfg = _cfg(
        tmp_path,
        "kd_test_some_bad",
        "DATALOADER.NUM_WORKERS",
        1,
        "DATALOADER.SKIP_BAD_IMAGES",
        True,
    )
    hook = SkippedItemsHook()
    names = []
    for batch in itertools.islice(KDTrainer.build_train_loader(cfg), 6):
        hook._pop(None, (batch,))  # what the forward pre-hook does with the model's input
        assert all(SKIPPED_KEY not in d for d in batch)
        names += [os.path.basename(d["file_name"]) for d in batch]
    # 12 items = 3 shuffled passes over 4 images, each pass drawing the 2 bad ones once; every
    # skip's count arrives with the item drawn in its place
    assert hook._local >= 6  # more where a replacement drawn from the records was bad too
    assert set(names) == {"im1.jpg", "im4.jpg"}


def test_skipped_items_reach_metrics_json(tmp_path):
    _register(tmp_path, "kd_test_skip_train", bad=(2, 3))
    cfg = _cfg(
        tmp_path,
        "kd_test_skip_train",
        "DATALOADER.NUM_WORKERS",
        1,
        "DATALOADER.SKIP_BAD_IMAGES",
        True,
        "SOLVER.MAX_ITER",
        2,
    )
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    lines = [
        json.loads(line) for line in (tmp_path / "out" / "metrics.json").read_text().splitlines()
    ]
    # 2 iterations of 2 images = one pass over the 4 images, with both bad ones
    assert lines[-1]["data/skipped_items"] >= 2


def test_empty_json_is_named_before_training(tmp_path):
    json_file, _ = _register(tmp_path, "kd_test_no_annotations", annotated=False)
    names = ["kd_test_no_annotations"]
    assert validate_registered_datasets(names, check_images=False) == names  # a test set: fine
    with pytest.raises(DatasetError) as e:
        validate_registered_datasets(names, check_images=False, filter_empty=names)
    message = str(e.value)
    assert "dataset 'kd_test_no_annotations' (json {})".format(json_file) in message
    assert "no image has a non-crowd annotation" in message
    assert "(set DATALOADER.FILTER_EMPTY_ANNOTATIONS False)" in message
    assert "the training split's instances file" in message


def test_empty_json_is_named_when_the_loader_is_built(tmp_path):
    """With DATASETS.VALIDATE none, Detectron2's bare assertion becomes the same message."""
    json_file, _ = _register(tmp_path, "kd_test_no_annotations2", annotated=False)
    cfg = _cfg(tmp_path, "kd_test_no_annotations2")
    with pytest.raises(AssertionError, match=r"^No valid data found in kd_test_no_annotations2"):
        get_detection_dataset_dicts(["kd_test_no_annotations2"])
    with pytest.raises(EmptyDatasetError) as e:
        with empty_dataset_errors():
            KDTrainer.build_train_loader(cfg)
    message = str(e.value)
    assert "dataset 'kd_test_no_annotations2' (json {})".format(json_file) in message
    assert "DATALOADER.FILTER_EMPTY_ANNOTATIONS False" in message


def test_empty_dataset_with_no_images_is_named(tmp_path):
    json_file, _ = _register(tmp_path, "kd_test_no_images", n=0)
    with pytest.raises(EmptyDatasetError, match=r"'kd_test_no_images' \(json .*\) has no images"):
        with empty_dataset_errors():
            get_detection_dataset_dicts(["kd_test_no_images"])


def test_lazyconfig_train_net_decodes_the_images(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lazyconfig_train_net", os.path.join(REPO, "tools", "lazyconfig_train_net.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    _register(tmp_path, "kd_test_lazy_bad", bad=(2,))
    args = argparse.Namespace(
        config_file=os.path.join(
            REPO, "configs", "synthetic", "distill", "ssim_faster_rcnn_R50_to_R18_lazy.py"
        ),
        opts=[
            "dataloader.train.dataset.names=kd_test_lazy_bad",
            "dataloader.test.dataset.names=kd_test_lazy_bad",
        ],
        eval_only=False,
    )
    with pytest.raises(DatasetError, match=r"im2.jpg cannot be read .*truncated"):
        tool.prepare(args)
    tool.prepare(
        argparse.Namespace(**{**vars(args), "opts": args.opts + ["train.validate_datasets=none"]})
    )


# the issue's cases, through tools/train_net.py: (edit of a 4-image dataset, VALIDATE, message)
TRAIN_NET_CASES = {
    "truncated jpeg": (
        "truncate",
        "full",
        r"train.json: image id 2: .*im2.jpg cannot be read \(OSError: image file is truncated",
    ),
    "truncated jpeg, not validated": (
        "truncate",
        "none",
        r"BadImageError: .*im2.jpg \(image_id 2\) of dataset 'kd_user_train' \(json .*train.json\)"
        r": OSError: image file is truncated",
    ),
    "swapped width/height": (
        "swap",
        "full",
        r"train.json: image id 1: the json says 64x96 \(width x height\) but .*im1.jpg is 96x64",
    ),
    "no annotations": (
        "empty",
        "full",
        r"dataset 'kd_user_train' \(json .*train.json\): no image has a non-crowd annotation.*"
        r"set DATALOADER.FILTER_EMPTY_ANNOTATIONS False",
    ),
    "no annotations, not validated": (
        "empty",
        "none",
        r"EmptyDatasetError: dataset 'kd_user_train' \(json .*train.json\): no image has",
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(TRAIN_NET_CASES))
def test_train_net_names_the_issues_cases(case, tmp_path):
    import re
    import subprocess
    import sys

    edit, validate, pattern = TRAIN_NET_CASES[case]
    root = tmp_path / "images"
    root.mkdir()
    rng = np.random.default_rng(0)
    images, annotations = [], []
    for i in range(1, 5):
        Image.fromarray(rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(
            root / "im{}.jpg".format(i), quality=90
        )
        images.append({"id": i, "file_name": "im{}.jpg".format(i), "width": 96, "height": 64})
        annotations.append(
            {"id": i, "image_id": i, "category_id": 1, "bbox": [50, 5, 40, 20], "iscrowd": 0}
        )
    if edit == "truncate":  # a third of its bytes: the header still reads
        data = (root / "im2.jpg").read_bytes()
        (root / "im2.jpg").write_bytes(data[: len(data) // 3 + 400])
    elif edit == "swap":
        images[0].update(width=64, height=96)
    else:
        annotations = []
    json_file = tmp_path / "train.json"
    json_file.write_text(
        json.dumps(
            {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "a"}]}
        )
    )
    register = tmp_path / "register.py"
    register.write_text(
        "import sys, runpy\n"
        "from detectron2.data.datasets import register_coco_instances\n"
        "register_coco_instances('kd_user_train', {{}}, {!r}, {!r})\n"
        "sys.argv = ['train_net.py'] + sys.argv[1:]\n"
        "runpy.run_path({!r}, run_name='__main__')\n".format(
            str(json_file), str(root), os.path.join(REPO, "tools", "train_net.py")
        )
    )
    proc = subprocess.run(
        [sys.executable, str(register), "--config-file", os.path.join(REPO, "configs", RETINA)]
        + ["DATASETS.TRAIN", "('kd_user_train',)", "DATASETS.TEST", "()"]
        + ["MODEL.RETINANET.NUM_CLASSES", "1", "DATASETS.VALIDATE", validate]
        + ["DATALOADER.NUM_WORKERS", "1", "SOLVER.MAX_ITER", "2"]
        + ["OUTPUT_DIR", str(tmp_path / "out")],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode != 0
    assert re.search(pattern, proc.stderr), proc.stderr[-3000:]

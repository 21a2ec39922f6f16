"""
COCO-format datasets from the command line (``--dataset NAME=JSON:IMAGE_DIR``) and the config
key ``DATASETS.COCO_FORMAT``: registered in every process, validated, clear errors.
"""

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, config_path
from detectron2.data import DatasetCatalog, MetadataCatalog
from PIL import Image, ImageDraw

from kd_det import get_kd_cfg
from kd_det.data import DatasetError, register_coco_format_datasets, register_config_datasets
from kd_det.data.coco_format import parse_coco_format_spec


def _coco(tmp_path, num_images=4, name="instances.json", category_ids=(7, 3)):
    """A tiny COCO-format dataset: 64x64 images with one box of each category."""
    images = tmp_path / "images"
    images.mkdir(exist_ok=True)
    data = {"images": [], "annotations": [], "categories": []}
    for i in range(num_images):
        image = Image.new("RGB", (64, 64), (20, 20, 20))
        draw = ImageDraw.Draw(image)
        draw.rectangle([4 + i, 6, 30 + i, 40], fill=(200, 40, 40))
        draw.ellipse([34, 20 + i, 60, 50 + i], fill=(40, 200, 40))
        image.save(images / "im{}.jpg".format(i))
        data["images"].append({"id": i + 1, "file_name": "im{}.jpg".format(i), "width": 64})
        data["images"][-1]["height"] = 64
        for j, (cid, box) in enumerate(
            zip(category_ids, ([4 + i, 6, 26, 34], [34, 20 + i, 26, 30]))
        ):
            data["annotations"].append(
                {"id": 10 * i + j + 1, "image_id": i + 1, "category_id": cid, "bbox": box}
            )
            data["annotations"][-1].update(area=box[2] * box[3], iscrowd=0)
    # listed out of id order: classes come ordered by id, as load_coco_json orders them
    data["categories"] = [{"id": 7, "name": "zebra"}, {"id": 3, "name": "apple"}]
    json_file = tmp_path / name
    json_file.write_text(json.dumps(data))
    return str(json_file), str(images)


@pytest.mark.parametrize("spec", ["no_equals", "=a.json:dir", "name=a.json", "name=:dir"])
def test_malformed_spec_names_the_form(spec):
    with pytest.raises(ValueError, match="is not NAME=JSON:IMAGE_DIR"):
        parse_coco_format_spec(spec)


def test_missing_files_are_named(tmp_path):
    json_file, images = _coco(tmp_path)
    with pytest.raises(FileNotFoundError, match="annotation file .*nope.json not found"):
        parse_coco_format_spec("x={}:{}".format(tmp_path / "nope.json", images))
    with pytest.raises(FileNotFoundError, match="image directory .*nodir not found"):
        parse_coco_format_spec("x={}:{}".format(json_file, tmp_path / "nodir"))
    # split at ".json:" so that the directory may hold a colon
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert parse_coco_format_spec("x={}:{}".format(json_file, odd)).image_root == str(odd)


def test_registration_classes_and_conflicts(tmp_path):
    json_file, images = _coco(tmp_path)
    spec = "kd_test_cf_train={}:{}".format(json_file, images)
    assert register_coco_format_datasets([spec]) == ["kd_test_cf_train"]
    meta = MetadataCatalog.get("kd_test_cf_train")
    assert meta.thing_classes == ["apple", "zebra"]
    assert (meta.json_file, meta.image_root, meta.evaluator_type) == (json_file, images, "coco")
    records = DatasetCatalog.get("kd_test_cf_train")
    assert len(records) == 4 and {a["category_id"] for a in records[0]["annotations"]} == {0, 1}
    assert register_coco_format_datasets([spec]) == ["kd_test_cf_train"]  # same source: kept
    other_json, _ = _coco(tmp_path, name="other.json")
    with pytest.raises(ValueError, match="'kd_test_cf_train' is already registered with"):
        register_coco_format_datasets(["kd_test_cf_train={}:{}".format(other_json, images)])
    with pytest.raises(ValueError, match="'coco_2017_train' is already registered"):
        register_coco_format_datasets(["coco_2017_train={}:{}".format(json_file, images)])


def test_config_key_and_flag(tmp_path):
    json_file, images = _coco(tmp_path)
    cfg = get_kd_cfg()
    cfg.DATASETS.COCO_FORMAT = ["kd_test_cf_a={}:{}".format(json_file, images)]
    names = register_config_datasets(cfg, ["kd_test_cf_b={}:{}".format(json_file, images)])
    assert names == ["kd_test_cf_a", "kd_test_cf_b"]
    assert len(cfg.DATASETS.COCO_FORMAT) == 2  # the saved config.yaml names both
    bad = get_kd_cfg()
    bad.DATASETS.COCO_FORMAT = ["kd_test_cf_c={}".format(json_file)]
    with pytest.raises(ValueError, match=r"DATASETS.COCO_FORMAT \(or --dataset\) entry"):
        register_config_datasets(bad)


def _train_net(tmp_path, args, num_gpus=1, dataset=None):
    json_file, images = dataset or _coco(tmp_path)
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        os.path.join(REPO, "tools", "train_net.py"),
        "--config-file",
        config_path("synthetic/faster_rcnn_R_18_FPN.yaml"),
        "--num-gpus",
        str(num_gpus),
        "--dist-url",
        "auto",  # a free port: the default one is the same for every run of this user
        "--dataset",
        "my_train={}:{}".format(json_file, images),
        "--dataset",
        "my_val={}:{}".format(json_file, images),
    ] + args
    cmd += ["MODEL.ROI_HEADS.NUM_CLASSES", "2", "SOLVER.MAX_ITER", "2", "OUTPUT_DIR", str(out)]
    cmd += ["INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64", "SOLVER.IMS_PER_BATCH"]
    cmd += [str(2 * num_gpus), "SOLVER.WARMUP_ITERS", "1", "SOLVER.STEPS", "()"]
    cmd += ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), PYTHONUNBUFFERED="1")
    env["OMP_NUM_THREADS"] = "1"
    env["TORCH_HOME"] = str(tmp_path / "torch")  # torch.hub.get_dir(): $TORCH_HOME/hub
    return subprocess.run(
        cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize("num_gpus", [1, 2])
def test_train_net_trains_on_a_dataset_named_on_the_command_line(tmp_path, num_gpus):
    """--num-gpus 2 on the CPU spawns two gloo workers: each registers the datasets itself
    (Detectron2's catalogs are per process) and trains; the test set is evaluated. The student
    loads MODEL.WEIGHTS torchvision://resnet18 through the tool's own path."""
    # the student starts from "torchvision's ImageNet R-18" (random weights put in torch's hub
    # cache: no download), converted once while both workers load it
    import torch
    import torchvision

    hub = tmp_path / "torch" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), hub / "resnet18-f37072fd.pth")
    weights = ["MODEL.WEIGHTS", "torchvision://resnet18", "INPUT.FORMAT", "RGB"]
    weights += ["MODEL.PIXEL_MEAN", "[123.675, 116.28, 103.53]"]
    weights += ["MODEL.PIXEL_STD", "[58.395, 57.12, 57.375]"]
    proc = _train_net(
        tmp_path,
        ["DATASETS.TRAIN", "('my_train',)", "DATASETS.TEST", "('my_val',)"] + weights,
        num_gpus,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    assert len([p for p in os.listdir(hub) if ".d2v1-" in p]) == 1
    log = proc.stdout + proc.stderr
    assert "matched with submodule backbone.bottom_up" in log  # Detectron2's name matching
    assert (tmp_path / "out" / "model_final.pth").is_file()
    assert "copypaste: AP,AP50" in proc.stdout + proc.stderr  # COCO evaluation of my_val ran
    saved = (tmp_path / "out" / "config.yaml").read_text()
    assert "my_train=" in saved and "my_val=" in saved


@pytest.mark.slow
def test_train_net_validates_the_dataset_before_training(tmp_path):
    json_file, images = _coco(tmp_path)
    data = json.loads(open(json_file).read())
    data["annotations"][0]["bbox"] = [50, 50, 40, 40]  # outside the 64x64 image
    open(json_file, "w").write(json.dumps(data))
    proc = _train_net(
        tmp_path,
        ["DATASETS.TRAIN", "('my_train',)", "DATASETS.TEST", "()"],
        dataset=(json_file, images),
    )
    assert proc.returncode != 0
    assert DatasetError.__name__ in proc.stderr and "instances.json" in proc.stderr


def test_lazyconfig_tool_registers_and_validates(tmp_path):
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "lazyconfig_train_net", os.path.join(REPO, "tools", "lazyconfig_train_net.py")
    )
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    json_file, images = _coco(tmp_path)
    args = argparse.Namespace(
        config_file=config_path("synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py"),
        opts=[
            "dataloader.train.dataset.names=kd_test_cf_lazy",
            "dataloader.test.dataset.names=kd_test_cf_lazy",
        ],
        eval_only=False,
        dataset=["kd_test_cf_lazy={}:{}".format(json_file, images)],
    )
    cfg = tool.load_config(args)
    assert list(cfg.train.coco_format) == args.dataset
    assert MetadataCatalog.get("kd_test_cf_lazy").thing_classes == ["apple", "zebra"]
    tool.prepare(args)  # validated like the builtin datasets
    data = json.loads(open(json_file).read())
    data["annotations"][0]["bbox"] = [50, 50, 40, 40]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(data))
    args.dataset = ["kd_test_cf_lazy_bad={}:{}".format(bad, images)]
    args.opts = [o.replace("kd_test_cf_lazy", "kd_test_cf_lazy_bad") for o in args.opts]
    with pytest.raises(DatasetError, match="bad.json"):
        tool.prepare(args)


def test_snapshot_tools_register_the_dataset(tmp_path):
    """score_images and visualize_distillation read their images through load_snapshot, which
    registers the --dataset / DATASETS.COCO_FORMAT entries as train_net does."""
    import uuid

    from detectron2.checkpoint import DetectionCheckpointer

    from kd_det.config.detector import build_detector, load_detector_config
    from kd_det.utils.snapshot import load_snapshot

    json_file, images = _coco(tmp_path)
    name = "kd_snapshot_{}".format(uuid.uuid4().hex[:8])
    config = config_path("synthetic/faster_rcnn_R_18_FPN.yaml")
    opts = ["DATASETS.TEST", "('{}',)".format(name), "MODEL.ROI_HEADS.NUM_CLASSES", "2"]
    opts += ["INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64"]
    model = build_detector(load_detector_config(config, opts), device=None)
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("snapshot")
    _, loader, names = load_snapshot(
        config,
        opts,
        str(tmp_path / "snapshot.pth"),
        split="test",
        datasets=["{}={}:{}".format(name, json_file, images)],
    )
    assert names == [name]
    assert len(next(iter(loader))[0]["instances"]) == 2

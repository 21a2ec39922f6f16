"""Distillation maps (kd_det.utils.distill_maps) and tools/visualize_distillation.py."""

import json
import math
import os
import runpy

import pytest
import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from kd_det.utils.distill_maps import distillation_maps
from kd_det.utils.snapshot import load_snapshot

from conftest import REPO, TINY_PREFIX, config_path, tiny_cfg

TOOL = os.path.join(REPO, "tools", "visualize_distillation.py")


def _tiny_opts(teacher):
    """tiny_cfg's settings as command-line overrides (what the tool and load_snapshot take)."""
    return ["DATASETS.TRAIN", "('{}_train',)".format(TINY_PREFIX), "DATASETS.TEST", "('{}_val',)".format(TINY_PREFIX),
            "INPUT.MIN_SIZE_TEST", "64", "INPUT.MAX_SIZE_TEST", "64", "DATALOADER.NUM_WORKERS", "0",
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "KD.TEACHER.WEIGHTS", teacher]


def _checkpoint(config, teacher, path, opts=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cfg = tiny_cfg(config, os.path.dirname(path), ["KD.TEACHER.WEIGHTS", teacher] + list(opts))
    torch.manual_seed(1)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(os.path.splitext(os.path.basename(path))[0])
    return path


@pytest.mark.parametrize("config,teacher_fixture,loss_key", [
    ("synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml", "rcnn_teacher", "loss_kd_ssim"),
    ("synthetic/distill/pfi_ssim_retinanet_R50_to_R18.yaml", "retina_teacher", "loss_kd_ssim"),
], ids=["rcnn_ssim", "retina_pfi_ssim"])
def test_maps_add_up_to_the_training_loss(tiny_data_root, tmp_path, request, config, teacher_fixture, loss_key):
    """Per image, the maps' loss is the loss_kd_* that a training step on that image alone computes."""
    teacher = request.getfixturevalue(teacher_fixture)
    weights = _checkpoint(config, teacher, str(tmp_path / "student.pth"), ["KD.FEATURE.ADAPTER", "conv1x1"])
    model, loader, names = load_snapshot(config_path(config), _tiny_opts(teacher) + ["KD.FEATURE.ADAPTER", "conv1x1"],
                                         weights, split="test")
    assert names == [TINY_PREFIX + "_val"]
    record = next(iter(loader))[0]
    assert len(record["instances"]) > 0  # annotations kept, for the boxes drawn and for the loss below
    model.train()
    torch.manual_seed(0)
    with torch.no_grad(), EventStorage():
        expected = float(model([record])[loss_key])
    maps = distillation_maps(model, [record])[0]
    assert maps["loss"] == pytest.approx(expected, rel=1e-5)
    assert list(maps["levels"]) == model.kd_feature.levels
    pfi = "pfi" in config
    for name, level in maps["levels"].items():
        height, width = level["teacher"].shape
        assert level["student"].shape == level["loss"].shape == (height, width)
        valid = level["loss"][~torch.isnan(level["loss"])]
        assert valid.numel() > 0 and float(valid.mean()) == pytest.approx(level["loss_mean"], rel=1e-5)
        assert 0 <= float(valid.min()) and float(valid.max()) <= 1  # (1 - SSIM) / 2
        assert ("pfi" in level) == (pfi and name in model.head_in_features)
        if "pfi" in level:
            assert level["pfi"].shape == (height, width)
            assert float(level["pfi"].mean()) == pytest.approx(1.0, rel=1e-4)  # PFI weights average 1


def test_visualize_tool(tiny_data_root, rcnn_teacher, tmp_path):
    config = "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml"
    opts = _tiny_opts(rcnn_teacher) + ["KD.FEATURE.ADAPTER", "conv1x1"]
    weights = _checkpoint(config, rcnn_teacher, str(tmp_path / "train" / "model_final.pth"),
                          ["KD.FEATURE.ADAPTER", "conv1x1"])
    tool = runpy.run_path(TOOL)
    out = tmp_path / "vis"
    summary = tool["main"](["--config-file", config_path(config), "--weights", weights, "--num-images", "2",
                            "--output-dir", str(out)] + opts)
    written = json.loads((out / "summary.json").read_text())
    assert written == summary and written["dataset"] == TINY_PREFIX + "_val"
    assert written["feature_loss"] == "SSIMFeatureLoss" and len(written["images"]) == 2
    for image in written["images"]:
        assert (out / image["png"]).stat().st_size > 10000
        assert math.isfinite(image["loss"]) and image["loss"] > 0
        assert set(image["levels"]) == {"p2", "p3", "p4", "p5", "p6"}

    # a released student (no adapter weights) and a config without a teacher are refused, naming the fix
    state = torch.load(weights, map_location="cpu", weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("kd_feature.")}
    released = str(tmp_path / "released.pth")
    torch.save(state, released)
    with pytest.raises(SystemExit, match="training checkpoint"):
        tool["main"](["--config-file", config_path(config), "--weights", released, "--output-dir", str(out)] + opts)
    plain = "synthetic/faster_rcnn_R_18_FPN.yaml"
    with pytest.raises(SystemExit, match="Distill"):
        tool["main"](["--config-file", config_path(plain), "--weights", weights, "--output-dir", str(out)]
                     + _tiny_opts(rcnn_teacher)[:-2])
    with pytest.raises(SystemExit, match="no checkpoint"):
        tool["main"](["--config-file", config_path(config), "--weights", str(tmp_path / "none.pth"),
                      "--output-dir", str(out)] + opts)

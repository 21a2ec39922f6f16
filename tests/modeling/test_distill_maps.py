"""Distillation maps (kd_det.modeling.distill_maps) and tools/visualize_distillation.py."""

import json
import math
import os
import runpy

import pytest
import torch
from conftest import REPO, TINY_PREFIX, config_path, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tolerances import U32, U64, assert_within, gamma, mean_bound

from kd_det.modeling.distill_maps import distillation_maps
from kd_det.utils.snapshot import load_snapshot

TOOL = os.path.join(REPO, "tools", "visualize_distillation.py")


def _tiny_opts(teacher):
    """tiny_cfg's settings as command-line overrides (what the tool and load_snapshot take)."""
    return [
        "DATASETS.TRAIN",
        "('{}_train',)".format(TINY_PREFIX),
        "DATASETS.TEST",
        "('{}_val',)".format(TINY_PREFIX),
        "INPUT.MIN_SIZE_TEST",
        "64",
        "INPUT.MAX_SIZE_TEST",
        "64",
        "DATALOADER.NUM_WORKERS",
        "0",
        "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
        "32",
        "KD.TEACHER.WEIGHTS",
        teacher,
    ]


def _checkpoint(config, teacher, path, opts=()):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    cfg = tiny_cfg(config, os.path.dirname(path), ["KD.TEACHER.WEIGHTS", teacher] + list(opts))
    torch.manual_seed(1)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(
        os.path.splitext(os.path.basename(path))[0]
    )
    return path


def _f64(x):
    return torch.as_tensor(x, dtype=torch.float64)


@pytest.mark.numeric
@pytest.mark.slow
@pytest.mark.parametrize(
    "config,teacher_fixture,loss_key",
    [
        ("synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml", "rcnn_teacher", "loss_kd_ssim"),
        ("synthetic/distill/pfi_ssim_retinanet_R50_to_R18.yaml", "retina_teacher", "loss_kd_ssim"),
    ],
    ids=["rcnn_ssim", "retina_pfi_ssim"],
)
def test_maps_add_up_to_the_training_loss(
    tiny_data_root, tmp_path, request, config, teacher_fixture, loss_key
):
    """
    Per image, the maps' loss is the loss_kd_* that a training step on that image alone computes.

    Both run the same modules on the same image, so they share the float32 features, loss maps
    and PFI weights; they differ in how they reduce a level's map of C x P values (training:
    one mean; the maps: a mean over channels, then over positions) and in the level sum
    (float32 in training, Python floats in the maps).  The maps are (1 - SSIM) / 2 >= 0, so
    each reduction is within gamma(n + 1) of the exact mean of the shared values, relatively.
    """
    teacher = request.getfixturevalue(teacher_fixture)
    weights = _checkpoint(
        config, teacher, str(tmp_path / "student.pth"), ["KD.FEATURE.ADAPTER", "conv1x1"]
    )
    model, loader, names = load_snapshot(
        config_path(config),
        _tiny_opts(teacher) + ["KD.FEATURE.ADAPTER", "conv1x1"],
        weights,
        split="test",
    )
    assert names == [TINY_PREFIX + "_val"]
    record = next(iter(loader))[0]
    assert (
        len(record["instances"]) > 0
    )  # annotations kept, for the boxes drawn and for the loss below
    model.train()
    torch.manual_seed(0)
    with torch.no_grad(), EventStorage():
        expected = float(model([record])[loss_key])
    maps = distillation_maps(model, [record])[0]
    distiller = model.kd_feature
    assert list(maps["levels"]) == distiller.levels
    pfi = "pfi" in config
    bound = gamma(2 * len(distiller.levels) + 1) * abs(expected)  # training's level sum and weights
    for i, (name, level) in enumerate(maps["levels"].items()):
        height, width = level["teacher"].shape
        assert level["student"].shape == level["loss"].shape == (height, width)
        valid = level["loss"][~torch.isnan(level["loss"])]
        assert valid.numel() > 0
        # the same P values averaged twice (a flat and an (H', W') tensor): each within mean_bound
        assert_within(
            _f64(float(valid.mean())),
            _f64(level["loss_mean"]),
            2 * mean_bound(valid),
            "{}: mean of the map".format(name),
        )
        assert 0 <= float(valid.min()) and float(valid.max()) <= 1  # (1 - SSIM) / 2
        assert ("pfi" in level) == (pfi and name in model.head_in_features)
        if "pfi" in level:  # the training step's own level_loss on the same values: no difference
            assert level["pfi"].shape == (height, width)
            # PFI weights d / mean(d) average 1 for any d: the mean of d (d >= 0), the division,
            # and the mean of the weights here, over P positions
            p = level["pfi"].numel()
            assert_within(
                _f64(float(level["pfi"].mean())),
                _f64(1.0),
                2 * (gamma(p - 1) + 2 * U32) + U32,
                "{}: mean PFI weight".format(name),
            )
        else:
            n = model.teacher.output_shape()[name].channels * valid.numel()
            bound += (
                distiller.weight
                * distiller.level_weights[i]
                * level["loss_mean"]
                * (gamma(n + 1) + gamma(n // valid.numel() + valid.numel() + 2))
            )
    # the maps' own level sum in Python floats: 2 L + 1 roundings at u64
    bound += gamma(2 * len(distiller.levels) + 1, U64) * abs(maps["loss"])
    assert_within(_f64(maps["loss"]), _f64(expected), bound, "loss of the maps")


@pytest.mark.slow
def test_visualize_tool(tiny_data_root, rcnn_teacher, tmp_path):
    config = "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml"
    opts = _tiny_opts(rcnn_teacher) + ["KD.FEATURE.ADAPTER", "conv1x1"]
    weights = _checkpoint(
        config,
        rcnn_teacher,
        str(tmp_path / "train" / "model_final.pth"),
        ["KD.FEATURE.ADAPTER", "conv1x1"],
    )
    tool = runpy.run_path(TOOL)
    out = tmp_path / "vis"
    summary = tool["main"](
        [
            "--config-file",
            config_path(config),
            "--weights",
            weights,
            "--num-images",
            "2",
            "--output-dir",
            str(out),
        ]
        + opts
    )
    written = json.loads((out / "summary.json").read_text())
    assert written == summary and written["dataset"] == TINY_PREFIX + "_val"
    assert written["feature_loss"] == "SSIMFeatureLoss" and len(written["images"]) == 2
    for image in written["images"]:
        assert (out / image["png"]).stat().st_size > 10000
        assert math.isfinite(image["loss"]) and image["loss"] > 0
        assert set(image["levels"]) == {"p2", "p3", "p4", "p5", "p6"}

    # a released student (no adapter weights) and a config without a teacher are refused, naming the
    # fix
    state = torch.load(weights, map_location="cpu", weights_only=False)
    state["model"] = {k: v for k, v in state["model"].items() if not k.startswith("kd_feature.")}
    released = str(tmp_path / "released.pth")
    torch.save(state, released)
    with pytest.raises(SystemExit, match="training checkpoint"):
        tool["main"](
            ["--config-file", config_path(config), "--weights", released, "--output-dir", str(out)]
            + opts
        )
    plain = "synthetic/faster_rcnn_R_18_FPN.yaml"
    with pytest.raises(SystemExit, match="Distill"):
        tool["main"](
            ["--config-file", config_path(plain), "--weights", weights, "--output-dir", str(out)]
            + _tiny_opts(rcnn_teacher)[:-2]
        )
    with pytest.raises(SystemExit, match="no checkpoint"):
        tool["main"](
            [
                "--config-file",
                config_path(config),
                "--weights",
                str(tmp_path / "none.pth"),
                "--output-dir",
                str(out),
            ]
            + opts
        )

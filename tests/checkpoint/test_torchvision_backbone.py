"""
torchvision ImageNet ResNets as Detectron2 backbones (offline: randomly initialised torchvision
models saved where torch's hub cache would hold the downloads).
"""

import os

import pytest
import torch
from conftest import REPO, config_path, tiny_cfg
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.modeling.backbone import build_resnet_backbone
from tolerances import assert_within, gamma, unit_roundoff

from kd_det.checkpoint import SafeDetectionCheckpointer, read_checkpoint, torchvision_weights
from kd_det.checkpoint.torchvision_backbone import (
    convert_resnet_state_dict,
    torchvision_resnet_input,
)

U64 = unit_roundoff(torch.float64)
TV_RGB_INPUT = [
    "INPUT.FORMAT",
    "RGB",
    "MODEL.PIXEL_MEAN",
    [123.675, 116.28, 103.53],
    "MODEL.PIXEL_STD",
    [58.395, 57.12, 57.375],
]


def _random_torchvision_resnet(depth: int, seed: int = 0) -> torch.nn.Module:
    """A torchvision ResNet with random weights and random BatchNorm statistics (the defaults,
    mean 0 and var 1, would let a BN mapped to the wrong place go unnoticed)."""
    import torchvision

    torch.manual_seed(seed)
    model = getattr(torchvision.models, "resnet{}".format(depth))(weights=None)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.1)
            m.running_mean.normal_(0, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    return model.eval()


def _detectron2_resnet(depth: int, stride_in_1x1: bool = False) -> torch.nn.Module:
    cfg = get_cfg()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = stride_in_1x1
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    return build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()


def _torchvision_stages(model, x):
    x = model.maxpool(model.relu(model.bn1(model.conv1(x))))
    out = {}
    for i in range(1, 5):
        x = getattr(model, "layer{}".format(i))(x)
        out["res{}".format(i + 1)] = x
    return out


@pytest.mark.numeric
@pytest.mark.parametrize("depth", [18, 50])
def test_converted_stages_equal_torchvision_layers(depth):
    """
    res2..res5 of the converted Detectron2 ResNet (FrozenBN) are torchvision's layer1..layer4
    (eval-mode BN) on the same normalised image, in float64. The two compute the same sums in
    other orders and BN as x * scale + shift vs (x - mean) / sqrt(var) * w + b: each layer adds
    rounding errors of at most gamma(fan-in) relative to its terms, at most 4608 (3x3x512) terms
    over at most 50 layers; 1e3 * gamma(50 * 4608) in float64 (~2.6e-8) relative to the stage's
    largest magnitude leaves three orders of magnitude for the error's growth through the layers,
    while a weight in the wrong place changes outputs by O(1).
    """
    tv = _random_torchvision_resnet(depth).double()
    d2 = _detectron2_resnet(depth)
    converted = convert_resnet_state_dict(tv.state_dict())
    incompatible = d2.load_state_dict(converted, strict=True)
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    d2 = d2.double()
    torch.manual_seed(1)
    image = torch.rand(1, 3, 64, 64, dtype=torch.float64)  # RGB in [0, 1]
    mean = torch.tensor([0.485, 0.456, 0.406], dtype=torch.float64).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225], dtype=torch.float64).view(1, 3, 1, 1)
    x = (image - mean) / std
    with torch.no_grad():
        ours, theirs = d2(x), _torchvision_stages(tv, x)
    bound = 1e3 * gamma(50 * 4608, U64)
    for name in ("res2", "res3", "res4", "res5"):
        assert ours[name].shape == theirs[name].shape, name
        assert_within(ours[name], theirs[name], bound * theirs[name].abs().max(), name)


def test_unknown_keys_are_named():
    with pytest.raises(ValueError, match="'head.weight' is no key of a torchvision ResNet"):
        convert_resnet_state_dict({"conv1.weight": torch.zeros(1), "head.weight": torch.zeros(1)})


def test_torchvision_input_settings():
    s = torchvision_resnet_input("torchvision://resnet50")
    assert (s.depth, s.input_format, s.stride_in_1x1) == (50, "RGB", False)
    assert s.pixel_mean == (123.675, 116.28, 103.53)
    assert s.pixel_std == (58.395, 57.12, 57.375)
    assert torchvision_resnet_input("fasterrcnn_resnet50_fpn") is None


@pytest.fixture
def hub_dir(tmp_path, monkeypatch):
    """torch's hub cache in tmp, holding random "downloads" of resnet18 and resnet50."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for depth in (18, 50):
        url = torchvision_weights("resnet{}".format(depth)).url
        torch.save(_random_torchvision_resnet(depth).state_dict(), folder / os.path.basename(url))
    return folder


def _student(tmp_path, config="synthetic/faster_rcnn_R_18_FPN.yaml", opts=()):
    cfg = tiny_cfg(config, tmp_path / "out", ["MODEL.BACKBONE.FREEZE_AT", 2] + list(opts))
    return build_model(cfg)


def test_scheme_loads_resnet18_into_a_student(hub_dir, tmp_path):
    assert os.path.isfile(config_path("synthetic/faster_rcnn_R_18_FPN.yaml"))
    model = _student(tmp_path, opts=TV_RGB_INPUT)
    SafeDetectionCheckpointer(model).load("torchvision://resnet18")
    source = read_checkpoint(str(hub_dir / "resnet18-f37072fd.pth"))
    bottom_up = model.backbone.bottom_up.state_dict()
    for tv_key, d2_key in (
        ("conv1.weight", "stem.conv1.weight"),
        ("bn1.running_var", "stem.conv1.norm.running_var"),
        ("layer4.1.conv2.weight", "res5.1.conv2.weight"),
        ("layer2.0.downsample.1.bias", "res3.0.shortcut.norm.bias"),
    ):
        assert torch.equal(bottom_up[d2_key], source[tv_key]), d2_key
    # converted once, beside the download, named by the download's hash
    cached = [p for p in os.listdir(hub_dir) if ".d2v1-" in p]
    assert len(cached) == 1 and cached[0].startswith("resnet18-f37072fd.d2v1-")
    SafeDetectionCheckpointer(_student(tmp_path, opts=TV_RGB_INPUT)).load("torchvision://resnet18")
    assert [p for p in os.listdir(hub_dir) if ".d2v1-" in p] == cached


def test_mismatched_input_is_refused_with_the_keys_to_set(hub_dir, tmp_path):
    model = _student(tmp_path)  # Detectron2's BGR defaults
    with pytest.raises(ValueError) as e:
        SafeDetectionCheckpointer(model).load("torchvision://resnet18")
    message = str(e.value)
    assert "INPUT.FORMAT: 'RGB' (now 'BGR')" in message
    assert "MODEL.PIXEL_MEAN: [123.675, 116.28, 103.53]" in message
    assert "MODEL.PIXEL_STD: [58.395, 57.12, 57.375]" in message
    assert not [p for p in os.listdir(hub_dir) if ".d2v1-" in p]  # nothing converted


def test_stride_and_depth_are_checked(hub_dir, tmp_path):
    r50 = _student(
        tmp_path, "synthetic/faster_rcnn_R_50_FPN.yaml", TV_RGB_INPUT
    )  # STRIDE_IN_1X1 True (Detectron2's default, MSRA weights)
    with pytest.raises(ValueError, match="MODEL.RESNETS.STRIDE_IN_1X1: False"):
        SafeDetectionCheckpointer(r50).load("torchvision://resnet50")
    with pytest.raises(ValueError, match=r"MODEL.RESNETS.DEPTH: 50 \(now 18\)"):
        SafeDetectionCheckpointer(_student(tmp_path, opts=TV_RGB_INPUT)).load(
            "torchvision://resnet50"
        )
    r50 = _student(
        tmp_path,
        "synthetic/faster_rcnn_R_50_FPN.yaml",
        TV_RGB_INPUT + ["MODEL.RESNETS.STRIDE_IN_1X1", False],
    )
    SafeDetectionCheckpointer(r50).load("torchvision://resnet50")
    source = read_checkpoint(str(hub_dir / os.path.basename(torchvision_weights("resnet50").url)))
    assert torch.equal(r50.backbone.bottom_up.res4[5].conv3.weight, source["layer3.5.conv3.weight"])


def test_tool_writes_a_detectron2_checkpoint(hub_dir, tmp_path):
    import sys

    sys.path.insert(0, os.path.join(REPO, "tools"))
    from convert_torchvision_backbone import main

    out = tmp_path / "R-18.pth"
    main(["torchvision://resnet18", str(out)])
    data = torch.load(str(out), weights_only=True)
    assert data["matching_heuristics"] and data["__author__"] == "torchvision"
    assert "res5.1.conv2.norm.running_var" in data["model"]
    model = _student(tmp_path, opts=TV_RGB_INPUT)
    SafeDetectionCheckpointer(model).load(str(out))
    assert torch.equal(
        model.backbone.bottom_up.stem.conv1.weight, data["model"]["stem.conv1.weight"]
    )


def test_other_torchvision_weights_are_refused_for_a_detectron2_backbone(hub_dir, tmp_path):
    url = torchvision_weights("fasterrcnn_resnet50_fpn").url
    torch.save(
        {"backbone.body.conv1.weight": torch.zeros(1, 1, 1, 1)}, hub_dir / os.path.basename(url)
    )
    with pytest.raises(ValueError, match="is not torchvision's ImageNet ResNet"):
        SafeDetectionCheckpointer(_student(tmp_path, opts=TV_RGB_INPUT)).load(
            "torchvision://fasterrcnn_resnet50_fpn"
        )
    # a model without a Detectron2 ResNet (a torchvision teacher) takes the file as it is
    target = torch.nn.Module()
    target.backbone = torch.nn.Module()
    target.backbone.body = torch.nn.Module()
    target.backbone.body.conv1 = torch.nn.Conv2d(1, 1, 1, bias=False)
    SafeDetectionCheckpointer(target).load("torchvision://fasterrcnn_resnet50_fpn")
    assert target.backbone.body.conv1.weight.abs().sum() == 0

"""Teacher-free self-distillation (FRSKD): attention transfer, the BiFPN self-teacher, both
meta-architectures."""

import pytest
import torch
from conftest import one_step, tiny_cfg
from detectron2.data import build_detection_train_loader
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tolerances import Bounded, assert_bounded, feature_loss_bounded

from kd_det.config.student import vanilla_student_config
from kd_det.losses import AttentionTransferLoss
from kd_det.modeling import BiFPNSelfTeacher
from kd_det.modeling.meta_arch.self_teacher import FastNormalizedFusion
from kd_det.release.student import student_state_dict

CONFIGS = {
    "retina": ("synthetic/distill/self_frskd_retinanet_R18.yaml", "RetinaNet"),
    "rcnn": ("synthetic/distill/self_frskd_faster_rcnn_R18.yaml", "GeneralizedRCNN"),
}


def _attention_bounded(x: Bounded) -> Bounded:
    """AttentionTransferLoss.attention: the mean over channels of x^2 over its norm per image."""
    a = (x**2).mean(1, keepdim=True)
    norm = (a * a).map(lambda v: v.flatten(1)).sum(1).sqrt()
    return a / norm.map(lambda v: v[:, None, None, None])


def _attention_transfer_bounded(s: Bounded, t: Bounded) -> Bounded:
    """AttentionTransferLoss: H W times the mean of (Q_s - Q_t)^2, i.e. the sum over positions."""
    h, w = s.shape[-2:]
    return feature_loss_bounded([(_attention_bounded(s) - _attention_bounded(t)) ** 2 * (h * w)])


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_attention_transfer_equals_formula(dtype):
    """In float32 and float64 against the formula in float64."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g).to(dtype)
    t = torch.randn(2, 7, 4, 5, generator=g).to(dtype)  # channels may differ
    want = 0.0
    for i in range(2):
        qs = s[i].double().pow(2).mean(0).flatten()
        qt = t[i].double().pow(2).mean(0).flatten()
        want += ((qs / qs.norm() - qt / qt.norm()) ** 2).sum().item() / 2
    sb, tb = Bounded.exact(s), Bounded.exact(t)
    got = AttentionTransferLoss()([s], [t])
    assert_bounded(got, _attention_transfer_bounded(sb, tb), "attention transfer", reference=want)
    # scale-free: the attention of 3x the features is the same map (3 s rounded once)
    assert_bounded(
        AttentionTransferLoss()([3 * s], [t]),
        _attention_transfer_bounded(3.0 * sb, tb),
        "attention transfer of 3x features",
        reference=want,
    )
    # exact: the same operations on the same values give the same attention maps
    assert AttentionTransferLoss()([s], [s.clone()]).item() == 0.0


def test_attention_transfer_gradient_reaches_student_only():
    s = torch.randn(2, 4, 6, 6, requires_grad=True)
    t = torch.randn(2, 4, 6, 6, requires_grad=True)
    AttentionTransferLoss()([s], [t]).backward()
    assert s.grad.abs().sum() > 0
    assert t.grad is None


@pytest.mark.numeric
def test_fast_normalized_fusion():
    fuse = FastNormalizedFusion(2)
    with torch.no_grad():
        fuse.weight.copy_(torch.tensor([3.0, -1.0]))  # negative weights are clipped to 0
    a, b = torch.full((1, 1, 2, 2), 2.0), torch.full((1, 1, 2, 2), 5.0)
    # w / (sum(w) + eps), then 0 + w_0 a + w_1 b: a handful of roundings
    w = Bounded.exact(torch.tensor([3.0, 0.0]))
    w = w / (w.sum() + 1e-4)
    expected = 0.0 + w[0] * Bounded.exact(a) + w[1] * Bounded.exact(b)
    assert_bounded(fuse([a, b]), expected, "fused", reference=a.double() * 3 / (3 + 1e-4))


def test_bifpn_self_teacher_shapes_and_paths():
    shapes = {
        "p3": ShapeSpec(channels=8, stride=8),
        "p4": ShapeSpec(channels=8, stride=16),
        "p5": ShapeSpec(channels=8, stride=32),
    }
    net = BiFPNSelfTeacher(in_features=["p3", "p4", "p5"], input_shapes=shapes, width=12, norm="")
    # odd sizes, as FPN levels of padded images can have
    feats = {
        "p3": torch.randn(2, 8, 13, 11),
        "p4": torch.randn(2, 8, 7, 6),
        "p5": torch.randn(2, 8, 4, 3),
    }
    out = net(feats)
    assert {k: tuple(v.shape) for k, v in out.items()} == {
        "p3": (2, 12, 13, 11),
        "p4": (2, 12, 7, 6),
        "p5": (2, 12, 4, 3),
    }
    assert net.output_shape()["p4"] == ShapeSpec(channels=12, stride=16)
    # top-down and bottom-up: the finest output depends on the coarsest input and vice versa
    feats = {k: v.requires_grad_(True) for k, v in feats.items()}
    out = net(feats)
    out["p3"].sum().backward(retain_graph=True)
    assert feats["p5"].grad.abs().sum() > 0
    feats["p3"].grad = None
    out["p5"].sum().backward()
    assert feats["p3"].grad.abs().sum() > 0
    with pytest.raises(ValueError, match="fine to coarse"):
        BiFPNSelfTeacher(in_features=["p5", "p3"], input_shapes=shapes, width=4)


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_self_distillation_step_and_export(kind, tiny_data_root, tmp_path):
    config, vanilla = CONFIGS[kind]
    cfg = tiny_cfg(config, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    assert not hasattr(model, "teacher")  # no teacher checkpoint involved
    losses, _ = one_step(model, cfg)
    assert "loss_kd_at" in losses and any(k.startswith("loss_self_") for k in losses)
    assert all(torch.isfinite(v) for v in losses.values())
    if kind == "retina":
        assert set(losses) >= {"loss_self_cls", "loss_self_box_reg", "loss_kd_soft"}
    else:
        assert set(losses) >= {
            "loss_self_cls",
            "loss_self_box_reg",
            "loss_self_rpn_cls",
            "loss_self_rpn_loc",
        }
    # the student's parameters get gradients from the distillation loss alone; the self-teacher none
    model.zero_grad()
    with EventStorage(0):
        losses = model(next(iter(build_detection_train_loader(cfg))))
    losses["loss_kd_at"].backward()
    st = [p.grad for n, p in model.named_parameters() if n.startswith("kd_self_teacher.")]
    assert all(g is None or g.abs().sum() == 0 for g in st)
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if n.startswith("backbone.")
    )
    # export: every self-distillation parameter is under kd_ and dropped; the config is vanilla
    sd = model.state_dict()
    kept = student_state_dict(sd)
    assert len(kept) < len(sd) and not any("self" in k for k in kept)
    vcfg = vanilla_student_config(cfg)
    assert vcfg.MODEL.META_ARCHITECTURE == vanilla and "KD" not in vcfg
    from detectron2.config import get_cfg

    plain_cfg = get_cfg()
    plain_cfg.merge_from_other_cfg(vcfg)
    plain = build_model(plain_cfg)
    missing, unexpected = plain.load_state_dict(kept, strict=False)
    assert not missing and not unexpected


def test_self_distillation_errors(tiny_data_root, tmp_path):
    cfg = tiny_cfg(CONFIGS["retina"][0], tmp_path, ["KD.FEATURE.ENABLED", False])
    with pytest.raises(ValueError, match="KD.FEATURE.ENABLED is False"):
        build_model(cfg)
    cfg = tiny_cfg(CONFIGS["retina"][0], tmp_path, ["KD.SELF.IN_FEATURES", ["p3", "p4"]])
    with pytest.raises(ValueError, match="leaves out.*p5"):
        build_model(cfg)
    cfg = tiny_cfg(CONFIGS["retina"][0], tmp_path, ["KD.SELF.IN_FEATURES", ["p3", "p9"]])
    with pytest.raises(ValueError, match="p9"):
        build_model(cfg)

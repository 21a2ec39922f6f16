"""Rank Mimicking, Prediction-guided Feature Imitation and soft-label KD for RetinaNet."""

import math

import pytest
import torch
from conftest import config_path
from test_distill import _one_step, distill_cfg

from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage

from kd_det.losses import L2FeatureLoss
from kd_det.losses.prediction import prediction_difference_weights, rank_mimicking_loss, soft_label_kd_loss
from kd_det.modeling.distill_retinanet import match_anchors

RETINA_TEACHER = "synthetic/retinanet_R_50_FPN.yaml"


def _direct_rm(s_logits, t_logits, matched, gt_classes, temperature):
    """Rank mimicking written object by object, as the paper states it."""
    per_object = []
    for i, classes in enumerate(gt_classes):
        for g, c in enumerate(classes.tolist()):
            idx = [r for r in range(matched.shape[1]) if matched[i, r] == g]
            if not idx:
                continue
            ps = [math.exp(torch.sigmoid(s_logits[i, r, c]).item() / temperature) for r in idx]
            pt = [math.exp(torch.sigmoid(t_logits[i, r, c]).item() / temperature) for r in idx]
            ps = [p / sum(ps) for p in ps]
            pt = [p / sum(pt) for p in pt]
            per_object.append(sum(b * math.log(b / a) for a, b in zip(ps, pt)))
    return sum(per_object) / len(per_object)


def _rm_case():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 12, 3, generator=g, dtype=torch.float64) * 2
    t = torch.randn(2, 12, 3, generator=g, dtype=torch.float64) * 2
    matched = torch.full((2, 12), -1, dtype=torch.long)
    matched[0, [0, 3, 5]] = 0        # object 0 of image 0: three anchors
    matched[0, [7]] = 1              # object 1: a single anchor
    matched[1, [1, 2, 8, 11]] = 1    # image 1: object 0 has none, object 1 four anchors
    gt_classes = [torch.tensor([2, 0]), torch.tensor([1, 2])]
    return s, t, matched, gt_classes


@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_rank_mimicking_equals_direct_computation(temperature):
    s, t, matched, gt_classes = _rm_case()
    got = rank_mimicking_loss(s, t, matched, gt_classes, temperature)
    want = _direct_rm(s, t, matched, gt_classes, temperature)
    assert got.item() == pytest.approx(want, rel=1e-6)
    assert got.item() > 0


def test_rank_mimicking_zero_when_student_equals_teacher():
    s, _, matched, gt_classes = _rm_case()
    s.requires_grad_(True)
    loss = rank_mimicking_loss(s, s.detach().clone(), matched, gt_classes)
    assert abs(loss.item()) < 1e-12
    loss.backward()
    assert torch.all(s.grad.abs() < 1e-12)


def test_rank_mimicking_gradient_and_no_nan_without_objects():
    s, t, matched, gt_classes = _rm_case()
    s.requires_grad_(True)
    rank_mimicking_loss(s, t, matched, gt_classes).backward()
    assert torch.isfinite(s.grad).all()
    # gradients only on the positive anchors at their object's class
    nz = s.grad.abs() > 0
    assert nz[0, 0, 2] and nz[1, 2, 2] and not nz[0, 1].any() and not nz[0, 7].any()  # single anchor: zero
    # images without objects / with only ignored anchors
    s2 = torch.randn(2, 12, 3, requires_grad=True)
    empty = rank_mimicking_loss(s2, torch.randn(2, 12, 3), torch.full((2, 12), -1), [torch.zeros(0, dtype=torch.long)] * 2)
    assert empty.item() == 0.0
    empty.backward()
    assert torch.equal(s2.grad, torch.zeros_like(s2))


def test_soft_label_kd():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 10, 4, generator=g, requires_grad=True)
    t = torch.randn(2, 10, 4, generator=g)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, :3] = False  # ignored anchors do not count
    assert soft_label_kd_loss(t.clone().requires_grad_(), t, valid).abs().item() < 1e-6
    kl = soft_label_kd_loss(s, t, valid, temperature=2.0, mode="kl")
    pt, ps = torch.sigmoid(t / 2), torch.sigmoid(s / 2)
    direct = (pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()).sum(-1)[valid].mean() * 4
    assert kl.item() == pytest.approx(direct.item(), rel=1e-5)
    bce = soft_label_kd_loss(s, t, valid, temperature=2.0, mode="bce")
    assert bce.item() > kl.item()  # differs by the teacher's entropy
    kl.backward()
    assert torch.equal(s.grad[0, :3], torch.zeros(3, 4))
    assert soft_label_kd_loss(s, t, torch.zeros(2, 10, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="MODE"):
        soft_label_kd_loss(s, t, valid, mode="mse")


def test_pfi_weights_follow_prediction_difference():
    t = torch.zeros(2, 6, 4, 5)
    s = t.clone()
    s[0, :, 1, 2] = 3.0  # predictions differ strongly at one position
    s[0, :, 3, 4] = 1.0  # and mildly at another
    s[1] += 0.5          # image 1: the same difference everywhere
    (w,) = prediction_difference_weights([s], [t])
    assert w.shape == (2, 4, 5)
    assert w[0, 1, 2] > w[0, 3, 4] > w[0, 0, 0] == 0
    assert torch.allclose(w.mean(dim=(1, 2)), torch.ones(2))
    assert torch.allclose(w[1], torch.ones(4, 5))
    # weighted L2 imitation concentrates on the high-weight positions
    fs, ft = torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)
    fs[:, :, 1, 2] = 1.0
    loss = L2FeatureLoss()
    assert loss([fs], [ft], position_weights=[w]).item() > loss([fs], [ft]).item()
    # no NaN for a level where student equals teacher (all-zero difference)
    (w0,) = prediction_difference_weights([t], [t])
    assert torch.isfinite(w0).all()


def test_match_anchors():
    anchors = [Boxes(torch.tensor([[0.0, 0, 10, 10], [0, 0, 20, 20], [50, 50, 60, 60], [0, 0, 11, 10]]))]
    gt = Instances((64, 64))
    gt.gt_boxes = Boxes(torch.tensor([[0.0, 0, 10, 10], [50, 50, 60, 61]]))
    empty = Instances((64, 64))
    empty.gt_boxes = Boxes(torch.zeros(0, 4))
    from detectron2.modeling.matcher import Matcher

    m = match_anchors(anchors, [gt, empty], Matcher([0.4, 0.5], [0, -1, 1], allow_low_quality_matches=True))
    assert m.tolist() == [[0, -1, 1, 0], [-1, -1, -1, -1]]


ALL_TERMS = ["KD.RM.ENABLED", True, "KD.PFI.ENABLED", True, "KD.SOFT_LABEL.ENABLED", True]


@pytest.mark.parametrize("feature_loss", ["L2FeatureLoss", "SSIMFeatureLoss"])
def test_training_step_with_every_term(feature_loss, tiny_data_root, tmp_path, retina_teacher):
    cfg = distill_cfg("synthetic/distill/rm_pfi_retinanet_R50_to_R18.yaml", RETINA_TEACHER, retina_teacher, tmp_path,
                      ALL_TERMS + ["KD.FEATURE.LOSS", feature_loss])
    model = build_model(cfg)
    teacher_before = {k: v.clone() for k, v in model.teacher.model.state_dict().items()}
    losses, _ = _one_step(model, cfg)
    short = {"L2FeatureLoss": "l2", "SSIMFeatureLoss": "ssim"}[feature_loss]
    assert {"loss_cls", "loss_box_reg", "loss_kd_rm", "loss_kd_soft", "loss_kd_" + short} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is None for p in model.teacher.model.parameters())
    assert all(torch.equal(v, teacher_before[k]) for k, v in model.teacher.model.state_dict().items())
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


def test_prediction_kd_configs_build(tiny_data_root, tmp_path, retina_teacher):
    for name, expect in [("rm", {"loss_kd_rm"}), ("pfi", {"loss_kd_l2"}), ("soft_label", {"loss_kd_soft"}),
                         ("pfi_ssim", {"loss_kd_ssim"})]:
        cfg = distill_cfg("synthetic/distill/{}_retinanet_R50_to_R18.yaml".format(name), RETINA_TEACHER,
                          retina_teacher, tmp_path)
        losses, _ = _one_step(build_model(cfg), cfg)
        kd = {k for k in losses if k.startswith("loss_kd")}
        assert kd == expect, (name, kd)


def test_prediction_kd_errors(tiny_data_root, tmp_path, retina_teacher, rcnn_teacher):
    with pytest.raises(ValueError, match="one-stage.*GeneralizedRCNN"):
        build_model(distill_cfg("synthetic/distill/rm_retinanet_R50_to_R18.yaml", "synthetic/faster_rcnn_R_50_FPN.yaml",
                                rcnn_teacher, tmp_path))
    with pytest.raises(ValueError, match="anchors per position"):
        build_model(distill_cfg("synthetic/distill/rm_retinanet_R50_to_R18.yaml", RETINA_TEACHER, retina_teacher,
                                tmp_path, ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0]]]))
    with pytest.raises(ValueError, match="KD.FEATURE.LOSS is empty"):
        build_model(distill_cfg("synthetic/distill/rm_retinanet_R50_to_R18.yaml", RETINA_TEACHER, retina_teacher,
                                tmp_path, ["KD.PFI.ENABLED", True]))
    assert config_path("synthetic/distill/rm_retinanet_R50_to_R18.yaml")


RCNN_TEACHER = "synthetic/faster_rcnn_R_50_FPN.yaml"
RCNN_SOFT = "synthetic/distill/soft_label_faster_rcnn_R50_to_R18.yaml"


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_softmax_kd_loss(temperature):
    from kd_det.losses.prediction import softmax_kd_loss

    g = torch.Generator().manual_seed(2)
    s = torch.randn(7, 6, generator=g, requires_grad=True)
    t = torch.randn(7, 6, generator=g)
    assert softmax_kd_loss(t.clone().requires_grad_(), t, temperature).abs().item() < 1e-6
    kl = softmax_kd_loss(s, t, temperature)
    pt, ps = torch.softmax(t / temperature, 1), torch.softmax(s / temperature, 1)
    direct = (pt * (pt / ps).log()).sum(1).mean() * temperature**2
    assert kl.item() == pytest.approx(direct.item(), rel=1e-5)
    kl.backward()
    # d/ds of T^2 KL(p_t || softmax(s / T)) = T (p_s - p_t) / R
    assert torch.allclose(s.grad, temperature * (ps - pt).detach() / 7, atol=1e-6)
    bce = softmax_kd_loss(s, t, temperature, mode="bce")
    entropy = -(pt * pt.log()).sum(1).mean() * temperature**2
    assert bce.item() == pytest.approx(kl.item() + entropy.item(), rel=1e-5)
    empty = softmax_kd_loss(s[:0], t[:0])
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="MODE"):
        softmax_kd_loss(s, t, mode="mse")


def test_roi_soft_label_step(tiny_data_root, tmp_path, rcnn_teacher):
    """Faster R-CNN student: the teacher's box head scores exactly the RoIs the student's box head was trained on."""
    from kd_det.losses.prediction import softmax_kd_loss

    cfg = distill_cfg(RCNN_SOFT, RCNN_TEACHER, rcnn_teacher, tmp_path, ["KD.SOFT_LABEL.TEMPERATURE", 2.0])
    model = build_model(cfg)
    seen = {}
    heads = model.roi_heads
    heads.box_predictor.register_forward_hook(lambda m, i, o: seen.update(features=i[0], logits=o[0]))
    losses, _ = _one_step(model, cfg)
    assert {k for k in losses if k.startswith("loss_kd")} == {"loss_kd_soft"} and torch.isfinite(losses["loss_kd_soft"])
    assert seen["logits"].shape[0] == 2 * cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE  # the sampled RoIs of 2 images
    assert model._roi_recorder._boxes is None and model._roi_recorder._logits is None  # popped: no graph kept
    # recompute independently: the same RoI sampling (same seed), the teacher's head on those boxes
    data = next(iter(build_detection_train_loader(cfg)))
    model.train()
    with EventStorage(0):
        torch.manual_seed(5)
        losses = model(data)
        torch.manual_seed(5)
        images = model.preprocess_image(data)
        features = model.backbone(images.tensor)
        proposals, _ = model.proposal_generator(images, features, [x["instances"] for x in data])
        sampled = heads.label_and_sample_proposals(proposals, [x["instances"] for x in data])
    t_feats = model.teacher.backbone_features(model.teacher_images(data, images))
    t_logits = model.teacher.roi_class_logits(t_feats, [p.proposal_boxes for p in sampled])
    th = model.teacher.model.roi_heads
    box_feats = th.box_pooler([t_feats[f] for f in th.box_in_features], [p.proposal_boxes for p in sampled])
    assert torch.allclose(t_logits, th.box_predictor(th.box_head(box_feats))[0], atol=1e-6)
    expected = cfg.KD.SOFT_LABEL.WEIGHT * softmax_kd_loss(seen["logits"], t_logits, 2.0)
    assert losses["loss_kd_soft"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_roi_soft_label_errors(tiny_data_root, tmp_path, retina_teacher, rcnn_teacher):
    with pytest.raises(ValueError, match="needs a Faster R-CNN teacher with one box head, but the teacher is a RetinaNet"):
        build_model(distill_cfg(RCNN_SOFT, RETINA_TEACHER, retina_teacher, tmp_path))
    for key in ("KD.RM.ENABLED", "KD.PFI.ENABLED"):
        with pytest.raises(ValueError, match="{} distil per-anchor predictions.*DistillGeneralizedRCNN".format(
                key.rsplit(".", 1)[0])):
            build_model(distill_cfg(RCNN_SOFT, RCNN_TEACHER, rcnn_teacher, tmp_path, [key, True]))
    # the config builds and every other distillation loss stays off
    cfg = distill_cfg(RCNN_SOFT, RCNN_TEACHER, rcnn_teacher, tmp_path, ["KD.SOFT_LABEL.ENABLED", False])
    losses, _ = _one_step(build_model(cfg), cfg)
    assert not [k for k in losses if k.startswith("loss_kd")]

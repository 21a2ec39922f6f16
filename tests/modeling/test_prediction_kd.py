"""Rank Mimicking, Prediction-guided Feature Imitation and soft-label KD for RetinaNet."""

import math

import pytest
import torch
from conftest import config_path, distill_cfg, one_step
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tolerances import ELEMENTARY, Bounded, assert_bounded, assert_within, gamma, unit_roundoff

from kd_det.losses import L2FeatureLoss
from kd_det.losses.prediction import (
    prediction_difference_weights,
    rank_mimicking_loss,
    soft_label_kd_loss,
)

RETINA_TEACHER = "synthetic/retinanet_R_50_FPN.yaml"
DTYPES = [torch.float32, torch.float64]


def _direct_rm(s_logits, t_logits, matched, gt_classes, temperature):
    """Rank mimicking written object by object, as the paper states it (Python floats: float64)."""
    per_object = []
    for i, classes in enumerate(gt_classes):
        for g, c in enumerate(classes.tolist()):
            idx = [r for r in range(matched.shape[1]) if matched[i, r] == g]
            if not idx:
                continue
            ps, pt = (
                [math.exp(torch.sigmoid(x[i, r, c].double()).item() / temperature) for r in idx]
                for x in (s_logits, t_logits)
            )
            ps = [p / sum(ps) for p in ps]
            pt = [p / sum(pt) for p in pt]
            per_object.append(sum(b * math.log(b / a) for a, b in zip(ps, pt)))
    return sum(per_object) / len(per_object)


def _log_softmax_bounded(x: Bounded, dim=-1) -> Bounded:
    """x - max - log(sum(exp(x - max))): the max-shifted log-sum-exp of log_softmax."""
    shifted = x - x.amax(dim, keepdim=True)
    return shifted - shifted.exp().sum(dim, keepdim=True).log()


def _rm_bounded(s_logits, t_logits, matched, gt_classes, temperature, dtype) -> Bounded:
    """rank_mimicking_loss's operations: per object, KL of the log-softmaxes of sigmoid / T."""
    per_object = []
    for i, classes in enumerate(gt_classes):
        for g, c in enumerate(classes.tolist()):
            idx = (matched[i] == g).nonzero().flatten()
            if len(idx):
                ls, lt = (
                    _log_softmax_bounded(Bounded.exact(x[i, idx, c], dtype).sigmoid() / temperature)
                    for x in (s_logits, t_logits)
                )
                per_object.append((lt.exp() * (lt - ls)).sum())
    return Bounded.stack(per_object).mean()


def _rm_case(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    s = (torch.randn(2, 12, 3, generator=g) * 2).to(dtype)
    t = (torch.randn(2, 12, 3, generator=g) * 2).to(dtype)
    matched = torch.full((2, 12), -1, dtype=torch.long)
    matched[0, [0, 3, 5]] = 0  # object 0 of image 0: three anchors
    matched[0, [7]] = 1  # object 1: a single anchor
    matched[1, [1, 2, 8, 11]] = 1  # image 1: object 0 has none, object 1 four anchors
    gt_classes = [torch.tensor([2, 0]), torch.tensor([1, 2])]
    return s, t, matched, gt_classes


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("temperature", [1.0, 0.25])
def test_rank_mimicking_equals_direct_computation(temperature, dtype):
    """Against the paper's formula in float64: within the bound of its log-sum-exps and sums."""
    s, t, matched, gt_classes = _rm_case(dtype)
    got = rank_mimicking_loss(s, t, matched, gt_classes, temperature)
    want = _direct_rm(s, t, matched, gt_classes, temperature)
    bound = _rm_bounded(s, t, matched, gt_classes, temperature, dtype)
    assert_bounded(got, bound, "RM", reference=want)
    assert got.item() > 0


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", DTYPES)
def test_rank_mimicking_zero_when_student_equals_teacher(dtype):
    s, _, matched, gt_classes = _rm_case(dtype)
    s.requires_grad_(True)
    loss = rank_mimicking_loss(s, s.detach().clone(), matched, gt_classes)
    # exact: the same operations on the same values, the same log-softmaxes: log p_t - log p_s = 0
    assert loss.item() == 0.0
    loss.backward()
    # The gradient, (sum(p_t) p_s - p_t) sigmoid'(s) / (T n), n = 3 objects with anchors, is 0 in
    # exact arithmetic.  Student and teacher share every rounded value (the same operations on the
    # same numbers) but p_t = exp(shifted - lse) and the backward's p_s = exp(shifted) / sum: each
    # within gamma(2 ELEMENTARY + 3) (1 + |shifted| + |lse|) of p, and sum(p_t) within that plus
    # gamma(anchors - 1) of 1; the products and the difference add a few roundings (T = 1).
    u = unit_roundoff(dtype)
    for i, classes in enumerate(gt_classes):
        for g, c in enumerate(classes.tolist()):
            idx = (matched[i] == g).nonzero().flatten()
            if len(idx):
                z = s[i, idx, c].detach().double().sigmoid()
                shifted = z - z.max()
                lse = shifted.exp().sum().log()
                p = (shifted - lse).exp()
                rel = gamma(2 * ELEMENTARY + 3, u) * (1 + shifted.abs() + lse.abs())
                bound = p * (2 * rel + rel.max() + gamma(len(idx) + 3, u)) * z * (1 - z) / 3
                assert_within(s.grad[i, idx, c], torch.zeros_like(bound), bound, "gradient, s = t")
    unmatched = torch.ones_like(s.grad, dtype=torch.bool)
    unmatched[matched >= 0] = False
    assert not s.grad[unmatched].any()  # masked out: exact zeros


@pytest.mark.numeric
def test_rank_mimicking_gradient_and_no_nan_without_objects():
    s, t, matched, gt_classes = _rm_case()
    s.requires_grad_(True)
    rank_mimicking_loss(s, t, matched, gt_classes).backward()
    assert torch.isfinite(s.grad).all()
    # gradients only on the positive anchors at their object's class; a single anchor's is
    # exactly 0 (shifted = 0, sum = exp(0) = 1: g - 1 * g)
    nz = s.grad.abs() > 0
    assert (
        nz[0, 0, 2] and nz[1, 2, 2] and not nz[0, 1].any() and not nz[0, 7].any()
    )  # single anchor: zero
    # images without objects / with only ignored anchors
    s2 = torch.randn(2, 12, 3, requires_grad=True)
    empty = rank_mimicking_loss(
        s2, torch.randn(2, 12, 3), torch.full((2, 12), -1), [torch.zeros(0, dtype=torch.long)] * 2
    )
    assert empty.item() == 0.0
    empty.backward()
    assert torch.equal(s2.grad, torch.zeros_like(s2))


def _binary_kl_bounded(s_logits, t_logits, temperature, mode="kl") -> Bounded:
    """soft_label_kd_loss: BCE with logits, (1 - p) x - logsigmoid(x), less the teacher's own."""
    s, t = (Bounded.exact(x) / temperature for x in (s_logits, t_logits))
    p_t = t.sigmoid()
    loss = (1 - p_t) * s - s.logsigmoid()
    if mode == "kl":
        loss = loss - ((1 - p_t) * t - t.logsigmoid())
    return loss.sum(1).mean() * temperature**2


@pytest.mark.numeric
def test_soft_label_kd():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 10, 4, generator=g, requires_grad=True)
    t = torch.randn(2, 10, 4, generator=g)
    valid = torch.ones(2, 10, dtype=torch.bool)
    valid[0, :3] = False  # ignored anchors do not count
    # exact: a student equal to the teacher makes the two BCE terms the same numbers
    assert soft_label_kd_loss(t.clone().requires_grad_(), t, valid).item() == 0.0
    kl = soft_label_kd_loss(s, t, valid, temperature=2.0, mode="kl")
    pt, ps = torch.sigmoid(t.double() / 2), torch.sigmoid(s.detach().double() / 2)
    direct = (pt * (pt / ps).log() + (1 - pt) * ((1 - pt) / (1 - ps)).log()).sum(-1)[
        valid
    ].mean() * 4
    assert_bounded(kl, _binary_kl_bounded(s[valid], t[valid], 2.0), "binary KL", reference=direct)
    bce = soft_label_kd_loss(s, t, valid, temperature=2.0, mode="bce")
    assert bce.item() > kl.item()  # differs by the teacher's entropy
    kl.backward()
    assert torch.equal(s.grad[0, :3], torch.zeros(3, 4))  # masked out: exact zeros
    assert soft_label_kd_loss(s, t, torch.zeros(2, 10, dtype=torch.bool)).item() == 0.0
    with pytest.raises(ValueError, match="MODE"):
        soft_label_kd_loss(s, t, valid, mode="mse")


@pytest.mark.numeric
def test_pfi_weights_follow_prediction_difference():
    t = torch.zeros(2, 6, 4, 5)
    s = t.clone()
    s[0, :, 1, 2] = 3.0  # predictions differ strongly at one position
    s[0, :, 3, 4] = 1.0  # and mildly at another
    s[1] += 0.5  # image 1: the same difference everywhere
    (w,) = prediction_difference_weights([s], [t])
    assert w.shape == (2, 4, 5)
    assert w[0, 1, 2] > w[0, 3, 4] > w[0, 0, 0] == 0
    # every image's weights average 1 (d / mean(d)), image 1's are all 1: within the bound of
    # the squared differences' means over channels, the division and the mean over positions
    d = ((Bounded.exact(t) - Bounded.exact(s)) ** 2).mean(1)
    weights = d / d.mean((1, 2), keepdim=True)
    assert_bounded(w.mean(dim=(1, 2)), weights.mean((1, 2)), "mean PFI weight")
    assert_bounded(w[1], weights[1], "uniform PFI weights")
    # weighted L2 imitation concentrates on the high-weight positions
    fs, ft = torch.zeros(2, 3, 4, 5), torch.zeros(2, 3, 4, 5)
    fs[:, :, 1, 2] = 1.0
    loss = L2FeatureLoss()
    assert loss([fs], [ft], position_weights=[w]).item() > loss([fs], [ft]).item()
    # no NaN for a level where student equals teacher (all-zero difference)
    (w0,) = prediction_difference_weights([t], [t])
    assert torch.isfinite(w0).all()


ALL_TERMS = ["KD.RM.ENABLED", True, "KD.PFI.ENABLED", True, "KD.SOFT_LABEL.ENABLED", True]


@pytest.mark.slow
@pytest.mark.parametrize("feature_loss", ["L2FeatureLoss", "SSIMFeatureLoss"])
def test_training_step_with_every_term(feature_loss, tiny_data_root, tmp_path, retina_teacher):
    cfg = distill_cfg(
        "synthetic/distill/rm_pfi_retinanet_R50_to_R18.yaml",
        RETINA_TEACHER,
        retina_teacher,
        tmp_path,
        ALL_TERMS + ["KD.FEATURE.LOSS", feature_loss],
    )
    model = build_model(cfg)
    teacher_before = {k: v.clone() for k, v in model.teacher.model.state_dict().items()}
    losses, _ = one_step(model, cfg)
    short = {"L2FeatureLoss": "l2", "SSIMFeatureLoss": "ssim"}[feature_loss]
    assert {"loss_cls", "loss_box_reg", "loss_kd_rm", "loss_kd_soft", "loss_kd_" + short} <= set(
        losses
    )
    assert all(torch.isfinite(v) for v in losses.values())
    assert all(p.grad is None for p in model.teacher.model.parameters())
    assert all(
        torch.equal(v, teacher_before[k]) for k, v in model.teacher.model.state_dict().items()
    )
    grads = [p.grad for p in model.head.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.slow
def test_prediction_kd_configs_build(tiny_data_root, tmp_path, retina_teacher):
    for name, expect in [
        ("rm", {"loss_kd_rm"}),
        ("pfi", {"loss_kd_l2"}),
        ("soft_label", {"loss_kd_soft"}),
        ("pfi_ssim", {"loss_kd_ssim"}),
    ]:
        cfg = distill_cfg(
            "synthetic/distill/{}_retinanet_R50_to_R18.yaml".format(name),
            RETINA_TEACHER,
            retina_teacher,
            tmp_path,
        )
        losses, _ = one_step(build_model(cfg), cfg)
        kd = {k for k in losses if k.startswith("loss_kd")}
        assert kd == expect, (name, kd)


def test_prediction_kd_errors(tiny_data_root, tmp_path, retina_teacher, rcnn_teacher):
    with pytest.raises(ValueError, match="one-stage.*GeneralizedRCNN"):
        build_model(
            distill_cfg(
                "synthetic/distill/rm_retinanet_R50_to_R18.yaml",
                "synthetic/faster_rcnn_R_50_FPN.yaml",
                rcnn_teacher,
                tmp_path,
            )
        )
    with pytest.raises(ValueError, match="anchors per position"):
        build_model(
            distill_cfg(
                "synthetic/distill/rm_retinanet_R50_to_R18.yaml",
                RETINA_TEACHER,
                retina_teacher,
                tmp_path,
                ["MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", [[1.0]]],
            )
        )
    with pytest.raises(ValueError, match="KD.FEATURE.ENABLED is False"):
        build_model(
            distill_cfg(
                "synthetic/distill/rm_retinanet_R50_to_R18.yaml",
                RETINA_TEACHER,
                retina_teacher,
                tmp_path,
                ["KD.PFI.ENABLED", True],
            )
        )
    assert config_path("synthetic/distill/rm_retinanet_R50_to_R18.yaml")


RCNN_TEACHER = "synthetic/faster_rcnn_R_50_FPN.yaml"
RCNN_SOFT = "synthetic/distill/soft_label_faster_rcnn_R50_to_R18.yaml"


def _softmax_kd_bounded(s_logits, t_logits, temperature, mode="kl") -> Bounded:
    """softmax_kd_loss's operations: -sum(p_t log p_s) (+ sum(p_t log p_t)), mean, times T^2."""
    log_p_s, log_p_t = (
        _log_softmax_bounded(Bounded.exact(x) / temperature, 1) for x in (s_logits, t_logits)
    )
    p_t = log_p_t.exp()
    loss = -(p_t * log_p_s).sum(1)
    if mode == "kl":
        loss = loss + (p_t * log_p_t).sum(1)
    return loss.mean() * temperature**2


@pytest.mark.numeric
@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_softmax_kd_loss(temperature):
    from kd_det.losses.prediction import softmax_kd_loss

    g = torch.Generator().manual_seed(2)
    s = torch.randn(7, 6, generator=g, requires_grad=True)
    t = torch.randn(7, 6, generator=g)
    # exact: a student equal to the teacher gives -(sum p_t log p_t) + (the same sum) = 0
    assert softmax_kd_loss(t.clone().requires_grad_(), t, temperature).item() == 0.0
    kl = softmax_kd_loss(s, t, temperature)
    pt, ps = (torch.softmax(x.detach().double() / temperature, 1) for x in (t, s))
    direct = (pt * (pt / ps).log()).sum(1).mean() * temperature**2
    assert_bounded(kl, _softmax_kd_bounded(s, t, temperature), "softmax KL", reference=direct)
    kl.backward()
    # d/ds of T^2 KL(p_t || softmax(s / T)) = T (p_s - p_t) / R; autograd's chain: the mean's
    # T^2 / R, times -p_t, log_softmax's backward g - p_s sum(g), divided by T
    log_p_s, log_p_t = (_log_softmax_bounded(Bounded.exact(x) / temperature, 1) for x in (s, t))
    grad = -(log_p_t.exp() * (temperature**2 / 7))
    grad = (grad - log_p_s.exp() * grad.sum(1, keepdim=True)) / temperature
    assert_bounded(s.grad, grad, "gradient", reference=temperature * (ps - pt) / 7)
    bce = softmax_kd_loss(s, t, temperature, mode="bce")
    cross_entropy = -(pt * ps.log()).sum(1).mean() * temperature**2  # KL plus the teacher's entropy
    assert_bounded(
        bce, _softmax_kd_bounded(s, t, temperature, "bce"), "cross-entropy", reference=cross_entropy
    )
    empty = softmax_kd_loss(s[:0], t[:0])
    assert empty.item() == 0.0 and empty.requires_grad
    with pytest.raises(ValueError, match="MODE"):
        softmax_kd_loss(s, t, mode="mse")


@pytest.mark.numeric
@pytest.mark.slow
def test_roi_soft_label_step(tiny_data_root, tmp_path, rcnn_teacher):
    """Faster R-CNN student: the teacher's box head scores exactly the RoIs the student's box head
    was trained on."""
    from kd_det.losses.prediction import softmax_kd_loss

    cfg = distill_cfg(
        RCNN_SOFT, RCNN_TEACHER, rcnn_teacher, tmp_path, ["KD.SOFT_LABEL.TEMPERATURE", 2.0]
    )
    model = build_model(cfg)
    seen = {}
    heads = model.roi_heads
    heads.box_predictor.register_forward_hook(
        lambda m, i, o: seen.update(features=i[0], logits=o[0])
    )
    losses, _ = one_step(model, cfg)
    assert {k for k in losses if k.startswith("loss_kd")} == {"loss_kd_soft"} and torch.isfinite(
        losses["loss_kd_soft"]
    )
    assert (
        seen["logits"].shape[0] == 2 * cfg.MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE
    )  # the sampled RoIs of 2 images
    # popped: no graph kept
    assert "roi_boxes" not in model._kd_recorder and "roi_logits" not in model._kd_recorder
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
    box_feats = th.box_pooler(
        [t_feats[f] for f in th.box_in_features], [p.proposal_boxes for p in sampled]
    )
    # exact: the same modules on the same features and boxes, and the same loss on the same logits
    assert torch.equal(t_logits, th.box_predictor(th.box_head(box_feats))[0])
    expected = cfg.KD.SOFT_LABEL.WEIGHT * softmax_kd_loss(seen["logits"], t_logits, 2.0)
    assert torch.equal(losses["loss_kd_soft"], expected)


@pytest.mark.slow
def test_roi_soft_label_errors(tiny_data_root, tmp_path, retina_teacher, rcnn_teacher):
    with pytest.raises(
        ValueError,
        match="needs a Faster R-CNN teacher with one box head, but the teacher is a RetinaNet",
    ):
        build_model(distill_cfg(RCNN_SOFT, RETINA_TEACHER, retina_teacher, tmp_path))
    for key in ("KD.RM.ENABLED", "KD.PFI.ENABLED"):
        with pytest.raises(
            ValueError,
            match="{} distil per-anchor predictions.*DistillGeneralizedRCNN".format(
                key.rsplit(".", 1)[0]
            ),
        ):
            build_model(distill_cfg(RCNN_SOFT, RCNN_TEACHER, rcnn_teacher, tmp_path, [key, True]))
    # the config builds and every other distillation loss stays off
    cfg = distill_cfg(
        RCNN_SOFT, RCNN_TEACHER, rcnn_teacher, tmp_path, ["KD.SOFT_LABEL.ENABLED", False]
    )
    losses, _ = one_step(build_model(cfg), cfg)
    assert not [k for k in losses if k.startswith("loss_kd")]

"""
CWD, MGD and PKD feature losses (issue 33): each against a direct float64 computation of its
paper's formula, within the rounding bounds of tests/tolerances.py; their defining properties;
MGD's masked generation block.
"""

import math

import pytest
import torch
from tolerances import U32, Bounded, assert_bounded, feature_loss_bounded

from kd_det import get_kd_cfg
from kd_det.losses import (
    CWDFeatureLoss,
    L2FeatureLoss,
    MGDFeatureLoss,
    PKDFeatureLoss,
    build_feature_loss,
)
from kd_det.modeling.distillers import FeatureDistiller, MaskedGenerator


def _features(shape, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(shape, generator=g) * scale
    # teacher correlated with the student, so no loss is near its extreme
    t = 0.7 * s + 0.5 * torch.randn(shape, generator=g) * scale
    return s, t


# ---------------------------------------------------------------------------------------------
# CWD


def _log_softmax_bounded(z: Bounded, dim: int) -> Bounded:
    """
    log_softmax as ATen computes it: m = max, S = sum exp(z - m), then z - m - log S or
    z - (m + log S) (the vectorised kernel's order): the larger of the two paths' bounds.
    """
    m = z.amax(dim, keepdim=True)
    log_s = (z - m).exp().sum(dim, keepdim=True).log()
    a = (z - m) - log_s
    b = z - (m + log_s)
    return Bounded(a.value, torch.maximum(a.err, b.err), z.dtype)


def _cwd_map_bounded(s, t, temperature):
    """CWDFeatureLoss.loss_map: p_t (log p_t - log p_s) * T^2 H W, p = softmax(x / T) over H W."""
    n, c, h, w = s.shape

    def flat(a):
        return a.reshape(n, c, h * w)

    log_s = _log_softmax_bounded(Bounded.exact(s).map(flat) / temperature, 2)
    log_t = _log_softmax_bounded(Bounded.exact(t).map(flat) / temperature, 2)
    kl = log_t.exp() * (log_t - log_s)
    return (kl * float(temperature * temperature * h * w)).map(lambda a: a.reshape(n, c, h, w))


def _cwd64(s, t, temperature):
    """The paper's (and mmrazor's) formula in float64: T^2 / (N C) sum p_t log(p_t / p_s)."""
    n, c = s.shape[:2]
    p_t = torch.softmax(t.double().flatten(2) / temperature, dim=2)
    p_s = torch.softmax(s.double().flatten(2) / temperature, dim=2)
    return temperature**2 * (p_t * (p_t.log() - p_s.log())).sum() / (n * c)


@pytest.mark.numeric
@pytest.mark.parametrize("temperature", [1.0, 4.0, 0.7])
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (1, 4, 1, 9)])
def test_cwd_equals_the_float64_formula(shape, temperature):
    s, t = _features(shape, 1, scale=2.0)
    got = CWDFeatureLoss(temperature=temperature)([s], [t])
    bound = feature_loss_bounded([_cwd_map_bounded(s, t, temperature)])
    assert_bounded(got, bound, "CWD", reference=_cwd64(s, t, temperature))
    # two levels, summed with weights (LEVEL_REDUCTION "sum")
    s2, t2 = _features((2, 3, 2, 3), 2)
    got = CWDFeatureLoss(temperature=temperature)([s, s2], [t, t2], level_weights=[1.0, 1.0])
    bound = feature_loss_bounded(
        [_cwd_map_bounded(s, t, temperature), _cwd_map_bounded(s2, t2, temperature)], [1.0, 1.0]
    )
    ref = _cwd64(s, t, temperature) + _cwd64(s2, t2, temperature)
    assert_bounded(got, bound, "CWD, two levels", reference=ref)


def test_cwd_properties():
    s, t = _features((2, 3, 4, 4), 3)
    loss = CWDFeatureLoss(temperature=2.0)
    # a per-map offset changes no softmax: the same value within both evaluations' bounds
    offset = torch.randn(2, 3, 1, 1) * 0.5
    shifted = loss([s + offset], [t])
    bound = feature_loss_bounded([_cwd_map_bounded(s + offset, t, 2.0)])
    assert_bounded(shifted, bound, "CWD of shifted maps", reference=_cwd64(s, t, 2.0))
    # KL is not symmetric: swapping student and teacher changes the value
    assert abs(_cwd64(t, s, 2.0) - _cwd64(s, t, 2.0)) > 1e-3
    with pytest.raises(ValueError, match="KD.CWD.TEMPERATURE"):
        CWDFeatureLoss(temperature=0.0)


@pytest.mark.numeric
def test_cwd_of_identical_features_is_zero_with_zero_gradient():
    n, c, h, w, temperature = 2, 3, 5, 6, 2.0
    t, _ = _features((n, c, h, w), 4, scale=3.0)
    s = t.clone().requires_grad_()
    teacher = t.clone().requires_grad_()
    out = CWDFeatureLoss(temperature=temperature)([s], [teacher])
    # exact: log_softmax of the same values by the same kernel is bitwise the same, so every
    # term p_t (log p_t - log p_s) is 0 * p_t
    assert torch.equal(out, torch.zeros(()))
    out.backward()
    assert teacher.grad is None
    # The exact gradient is T / (N C) (p_s sum(p_t) - p_t) = 0; in float32 it is what the
    # roundings of p and of sum(p) = 1 leave.  Bounded follows the backward's operations:
    # g = -p_t * c (c = T^2 H W / numel, kl_div's backward), then log_softmax's backward
    # g - exp(log p_s) * sum(g), then the division by T.
    log_p = _log_softmax_bounded(Bounded.exact(t).map(lambda a: a.reshape(n, c, h * w)) / 2.0, 2)
    p = log_p.exp()
    coef = Bounded(torch.tensor(1.0 / (n * c * h * w)), U32 / (n * c * h * w)) * float(
        temperature**2 * h * w
    )
    g = p * coef
    grad = (p * g.sum(2, keepdim=True) - g) / temperature
    # grad.value is its float64 evaluation; the exact gradient is 0
    got = s.grad.reshape(n, c, h * w)
    zero = torch.zeros_like(grad.value)
    assert_bounded(got, grad, "CWD gradient at s = t", reference=zero)


# ---------------------------------------------------------------------------------------------
# PKD


def _pkd_map_bounded(s, t, eps=1e-6):
    """PKDFeatureLoss.loss_map: 0.5 * (z(s) - z(t))^2, z standardising over (N, H, W)."""

    def z(x):
        x = Bounded.exact(x)
        mean = x.mean((0, 2, 3), keepdim=True)
        return (x - mean) / x.var((0, 2, 3), keepdim=True).clamp_min(eps * eps).sqrt()

    diff = z(s) - z(t)
    return 0.5 * diff * diff


def _pearson_per_channel64(s, t, dims):
    """Pearson r of student and teacher values per channel (and image, for dims (2, 3))."""
    sc = s.double() - s.double().mean(dim=dims, keepdim=True)
    tc = t.double() - t.double().mean(dim=dims, keepdim=True)
    num = (sc * tc).sum(dim=dims)
    return num / ((sc * sc).sum(dim=dims) * (tc * tc).sum(dim=dims)).sqrt()


@pytest.mark.numeric
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (2, 2, 1, 1)])
def test_pkd_equals_one_minus_pearson_over_the_batch(shape):
    s, t = _features(shape, 5)
    s = s * 4.0 + 1.5  # PKD is scale-free: the loss of 1 - r is unchanged
    got = PKDFeatureLoss()([s], [t])
    # the paper's definition: 1 - r of each channel's N * H * W values, averaged over channels
    ref = (1 - _pearson_per_channel64(s, t, (0, 2, 3))).mean()
    assert_bounded(got, feature_loss_bounded([_pkd_map_bounded(s, t)]), "PKD", reference=ref)


@pytest.mark.numeric
def test_pkd_differs_from_per_image_channel_standardisation():
    """
    PKD standardises each channel over the batch; ``KD.FEATURE.NORMALIZE "channel"`` each
    image's map.  With one image the two are the same (up to PKD's halving); with images whose
    scale differs they are not.
    """
    s, t = _features((1, 3, 6, 5), 6)
    pkd = PKDFeatureLoss()([s], [t])
    per_image = L2FeatureLoss(normalize="channel")([s], [t])
    ref = (1 - _pearson_per_channel64(s, t, (2, 3))).mean()  # for a batch of one: both
    assert_bounded(pkd, feature_loss_bounded([_pkd_map_bounded(s, t)]), "PKD, N = 1", reference=ref)
    assert_bounded(per_image, _l2_channel_bounded(s, t), "L2 channel, N = 1", reference=2 * ref)
    # two images: the second student image is the first one at 5 times the scale, the teacher's
    # are the same; per-image standardisation removes the scale (the loss stays the N = 1
    # value), batch standardisation does not (the student's values spread unlike the teacher's)
    s2, t2 = torch.cat([s, 5 * s]), torch.cat([t, t])
    pkd2 = PKDFeatureLoss()([s2], [t2])
    per_image2 = L2FeatureLoss(normalize="channel")([s2], [t2])
    ref_pkd2 = (1 - _pearson_per_channel64(s2, t2, (0, 2, 3))).mean()
    bound = feature_loss_bounded([_pkd_map_bounded(s2, t2)])
    assert_bounded(pkd2, bound, "PKD, N = 2", reference=ref_pkd2)
    assert_bounded(per_image2, _l2_channel_bounded(s2, t2), "L2 channel", reference=2 * ref)
    assert ref_pkd2 - ref > 0.05, (ref_pkd2, ref)  # the exact values differ, by far more
    assert pkd2 - pkd > 0.05


def _l2_channel_bounded(s, t, eps=1e-6):
    """L2FeatureLoss(normalize="channel").loss_map: (z(s) - z(t))^2, z per (image, channel)."""

    def z(x):
        x = Bounded.exact(x)
        mean = x.mean((2, 3), keepdim=True)
        return (x - mean) / x.var((2, 3), keepdim=True).clamp_min(eps * eps).sqrt()

    diff = z(s) - z(t)
    return feature_loss_bounded([diff * diff])


# ---------------------------------------------------------------------------------------------
# MGD


@pytest.mark.numeric
def test_mgd_loss_equals_the_float64_formula():
    s, t = _features((2, 3, 4, 5), 7, scale=3.0)
    got = MGDFeatureLoss()([s], [t])
    diff = Bounded.exact(s) - Bounded.exact(t)
    bound = feature_loss_bounded([diff * diff * float(3 * 4 * 5)])
    ref = (s.double() - t.double()).pow(2).sum() / 2  # sum of squared errors / N (mmrazor)
    assert_bounded(got, bound, "MGD", reference=ref)


def test_mgd_mask_ratio_and_channels():
    gen = MaskedGenerator({"p3": 3}, ["p3"], mask_ratio=0.65)
    x = torch.rand(4, 3, 64, 64) + 1.0  # no zeros of its own
    g = torch.Generator().manual_seed(0)
    mask = gen.mask(x, g)
    assert mask.shape == (4, 1, 64, 64) and set(mask.unique().tolist()) == {0.0, 1.0}
    masked = 1 - mask.mean().item()
    # binomial: n = 16384 positions, p = 0.65; 5 standard deviations (a 6e-7 chance to fail)
    sigma = math.sqrt(0.65 * 0.35 / mask.numel())
    assert abs(masked - 0.65) < 5 * sigma, masked
    # the same positions in every channel
    zeroed = (x * mask) == 0
    assert torch.equal(zeroed.all(dim=1), zeroed.any(dim=1))
    # reproducible with a seeded generator, different with another seed
    assert torch.equal(gen.mask(x, torch.Generator().manual_seed(0)), mask)
    assert not torch.equal(gen.mask(x, torch.Generator().manual_seed(1)), mask)
    assert torch.equal(MaskedGenerator({"p3": 3}, ["p3"], 0.0).mask(x, g), torch.ones_like(mask))
    for kwargs, key in [
        ({"mask_ratio": 1.0}, "MASK_RATIO"),
        ({"kernel_size": 2}, "KERNEL_SIZE"),
        ({"hidden_channels": -1}, "HIDDEN_CHANNELS"),
    ]:
        with pytest.raises(ValueError, match=key):
            MaskedGenerator({"p3": 3}, ["p3"], **kwargs)
    block = MaskedGenerator({"p3": 3}, ["p3"], kernel_size=5, hidden_channels=7)["p3"]
    assert block[0].weight.shape == (7, 3, 5, 5) and block[2].weight.shape == (3, 7, 5, 5)


def _mgd_distiller(**kwargs):
    return FeatureDistiller(
        levels=["p3"],
        student_channels=4,
        teacher_channels=6,
        loss=MGDFeatureLoss(),
        weight=2e-5,
        generator=MaskedGenerator({"p3": 6}, ["p3"], **kwargs),
    )


def test_mgd_gradients_reach_generator_and_student_not_teacher():
    torch.manual_seed(0)
    distiller = _mgd_distiller()
    student = torch.randn(2, 4, 8, 8, requires_grad=True)
    teacher = torch.randn(2, 6, 8, 8, requires_grad=True)
    torch.manual_seed(5)
    losses = distiller({"p3": student}, {"p3": teacher})
    assert set(losses) == {"loss_kd_mgd"} and torch.isfinite(losses["loss_kd_mgd"])
    losses["loss_kd_mgd"].backward()
    assert teacher.grad is None
    for name, p in distiller.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert {n.split(".")[0] for n, _ in distiller.named_parameters()} == {"adapters", "generator"}
    # masked positions reach the student through nothing: their gradient is exactly 0 (the
    # mask's 0 multiplies it); the others get one
    torch.manual_seed(5)
    mask = distiller.generator.mask(distiller.adapters({"p3": student}, ["p3"])[0])[:, 0]
    position_grad = student.grad.abs().sum(dim=1)
    assert torch.equal(position_grad[mask == 0], torch.zeros(int((mask == 0).sum())))
    assert (position_grad[mask == 1] > 0).all()


def test_mgd_needs_a_generator_of_the_teacher_channels():
    with pytest.raises(ValueError, match="generator"):
        FeatureDistiller(
            levels=["p3"], student_channels=4, teacher_channels=6, loss=MGDFeatureLoss(), weight=1
        )
    with pytest.raises(ValueError, match="'p3' with the teacher's 6 channels"):
        FeatureDistiller(
            levels=["p3"],
            student_channels=4,
            teacher_channels=6,
            loss=MGDFeatureLoss(),
            weight=1,
            generator=MaskedGenerator({"p3": 4}, ["p3"]),
        )


def test_config_keys_build_the_losses():
    cfg = get_kd_cfg()
    assert (cfg.KD.CWD.TEMPERATURE, cfg.KD.MGD.MASK_RATIO) == (1.0, 0.65)
    cfg.KD.FEATURE.LOSS, cfg.KD.CWD.TEMPERATURE = "CWDFeatureLoss", 4.0
    assert build_feature_loss(cfg).temperature == 4.0
    for name, cls in [("MGDFeatureLoss", MGDFeatureLoss), ("PKDFeatureLoss", PKDFeatureLoss)]:
        cfg.KD.FEATURE.LOSS = name
        assert type(build_feature_loss(cfg)) is cls
    cfg.KD.FEATURE.NORMALIZE = "channel"  # the lp losses' option, not PKD's
    with pytest.raises(ValueError, match="NORMALIZE"):
        build_feature_loss(cfg)

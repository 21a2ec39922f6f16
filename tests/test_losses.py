import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as reference_ssim

from kd_det import get_kd_cfg
from kd_det.losses import (
    AttentionTransferLoss,
    L1FeatureLoss,
    L2FeatureLoss,
    SSIMFeatureLoss,
    build_feature_loss,
    minmax_normalize,
    ssim_feature_loss,
    channel_statistics_loss,
    ssim_map,
    standardize_channels,
)


def _pair(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype)
    # y correlated with x, so SSIM is neither ~0 nor ~1
    y = (0.6 * x + 0.4 * torch.rand(shape, generator=g, dtype=dtype)).clamp(0, 1)
    return x, y


@pytest.mark.parametrize("shape", [(2, 3, 32, 40), (1, 8, 11, 17), (3, 1, 64, 64)])
def test_ssim_map_matches_pytorch_msssim(shape):
    x, y = _pair(shape, 0)
    ours = ssim_map(x, y, 11, 1.5, 0.01**2, 0.03**2).flatten(2).mean(-1)  # (N, C)
    ref = reference_ssim(x, y, data_range=1.0, size_average=False, win_size=11, win_sigma=1.5, K=(0.01, 0.03))
    assert torch.allclose(ours.mean(1), ref, atol=1e-5, rtol=0)


def test_ssim_loss_minmax_equals_reference_on_normalised_inputs():
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 24, 30, generator=g) * 3 + 1
    t = s + torch.randn(2, 4, 24, 30, generator=g)
    loss = SSIMFeatureLoss(normalize="minmax")([s], [t])
    ref = reference_ssim(minmax_normalize(s), minmax_normalize(t), data_range=1.0, size_average=True)
    assert abs(loss.item() - (1 - ref.item()) / 2) < 1e-5


def test_ssim_of_identical_features_is_perfect_at_every_size():
    g = torch.Generator().manual_seed(2)
    levels = [torch.randn(2, 5, s, s + 1, generator=g) for s in (40, 11, 7, 4, 2, 1)]
    for normalize in ("minmax", "none"):
        loss = SSIMFeatureLoss(normalize=normalize)(levels, [f.clone() for f in levels])
        assert loss.abs().item() < 1e-5


def test_ssim_maps_smaller_than_window_use_a_fitting_window():
    x, y = _pair((1, 2, 5, 8), 3)
    out = ssim_map(x, y, window_size=11)
    assert out.shape == (1, 2, 1, 2)  # a 5x7 window: one row, two columns of positions
    assert torch.isfinite(out).all()


@pytest.mark.parametrize("normalize", ["minmax", "none"])
def test_ssim_loss_gradcheck(normalize):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(1, 2, 13, 14, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 2, 13, 14, generator=g, dtype=torch.float64)
    loss = SSIMFeatureLoss(window_size=5, sigma=1.0, normalize=normalize)
    assert torch.autograd.gradcheck(lambda a: loss([a], [t]), (s,), eps=1e-6, atol=1e-5)


def test_level_weights_and_mean():
    x1, y1 = _pair((1, 2, 20, 20), 5)
    x2, y2 = _pair((1, 2, 16, 16), 6)
    loss = SSIMFeatureLoss()
    l1, l2 = loss([x1], [y1]), loss([x2], [y2])
    assert torch.allclose(loss([x1, x2], [y1, y2]), (l1 + l2) / 2)
    assert torch.allclose(loss([x1, x2], [y1, y2], level_weights=[1.0, 3.0]), l1 + 3 * l2)
    assert torch.allclose(ssim_feature_loss([x1, x2], [y1, y2], [1.0, 3.0]), l1 + 3 * l2)


def test_feature_distiller_level_reduction():
    from kd_det.modeling import FeatureDistiller

    x1, y1 = _pair((1, 2, 20, 20), 5)
    x2, y2 = _pair((1, 2, 16, 16), 6)
    student, teacher = {"p2": x1, "p3": x2}, {"p2": y1, "p3": y2}
    per_level = [SSIMFeatureLoss()([x1], [y1]), SSIMFeatureLoss()([x2], [y2])]

    def distiller(**kwargs):
        channels = {"p2": 2, "p3": 2}
        return FeatureDistiller(levels=["p2", "p3"], student_channels=channels, teacher_channels=channels,
                                loss=SSIMFeatureLoss(), weight=2.0, **kwargs)

    # "sum" is SSIM-KD's convention: lambda times the sum over levels
    summed = distiller(level_reduction="sum")(student, teacher)["loss_kd_ssim"]
    assert torch.allclose(summed, 2.0 * (per_level[0] + per_level[1]))
    mean = distiller()(student, teacher)["loss_kd_ssim"]
    assert torch.allclose(mean, (per_level[0] + per_level[1]))
    weighted = distiller(level_reduction="sum", level_weights=[0.0, 1.0])(student, teacher)["loss_kd_ssim"]
    assert torch.allclose(weighted, 2.0 * per_level[1])  # explicit weights win
    with pytest.raises(ValueError, match="LEVEL_REDUCTION must be one of"):
        distiller(level_reduction="max")
    with pytest.raises(ValueError, match="LEVEL_WEIGHTS has 1 entries for the 2 imitated levels"):
        distiller(level_weights=[1.0])


def test_position_weights_focus_the_loss():
    x, y = _pair((1, 3, 20, 20), 7)
    y[..., :10] = x[..., :10]  # left half identical
    left = torch.zeros(1, 20, 20)
    left[..., :8] = 1
    loss = L2FeatureLoss()
    assert loss([x], [y], position_weights=[left]).item() == 0.0
    assert loss([x], [y], position_weights=[1 - left]).item() > 0.0
    # uniform weights give the unweighted mean
    assert torch.allclose(loss([x], [y], position_weights=[torch.ones(1, 20, 20)]), loss([x], [y]))


def test_lp_losses_and_teacher_is_constant():
    s = torch.randn(2, 3, 8, 8, requires_grad=True)
    t = torch.randn(2, 3, 8, 8, requires_grad=True)
    assert torch.allclose(L2FeatureLoss()([s], [t]), F.mse_loss(s, t))
    out = L1FeatureLoss()([s], [t])
    assert torch.allclose(out, F.l1_loss(s, t))
    out.backward()
    assert t.grad is None and s.grad is not None


def test_normalised_lp_losses_are_scale_free():
    s, t = _pair((2, 3, 12, 10), 3)
    for normalize in ("minmax", "channel"):
        base = L2FeatureLoss(normalize=normalize)([s], [t])
        # a per-map affine change of either side's scale leaves the loss unchanged
        scaled = L2FeatureLoss(normalize=normalize)([s * 50.0 + 3.0], [t * 0.02 - 1.0])
        assert torch.allclose(base, scaled, rtol=1e-4), normalize
        assert not torch.allclose(base, L2FeatureLoss()([s], [t]))
    # "minmax" is SSIM-KD's [0, 1] rescaling; "channel" makes MSE = 2 (1 - Pearson r) per map
    ref = F.mse_loss(minmax_normalize(s), minmax_normalize(t))
    assert torch.allclose(L2FeatureLoss(normalize="minmax")([s], [t]), ref)
    sc, tc = s - s.mean(dim=(2, 3), keepdim=True), t - t.mean(dim=(2, 3), keepdim=True)
    r = (sc * tc).sum(dim=(2, 3)) / (sc.flatten(2).norm(dim=2) * tc.flatten(2).norm(dim=2))
    assert torch.allclose(L2FeatureLoss(normalize="channel")([s], [t]), (2 * (1 - r)).mean(), atol=1e-4)
    assert torch.allclose(L1FeatureLoss(normalize="channel")([s], [t]),
                          F.l1_loss(standardize_channels(s), standardize_channels(t)))
    # one-pixel and constant maps (small top levels) give finite values and gradients
    for shape in [(2, 3, 1, 1), (1, 2, 4, 4)]:
        s1 = torch.full(shape, 0.7, requires_grad=True)
        for normalize in ("minmax", "channel"):
            out = L2FeatureLoss(normalize=normalize)([s1], [torch.ones(shape)])
            out.backward()
            assert torch.isfinite(out) and torch.isfinite(s1.grad).all(), (shape, normalize)
            s1.grad = None


def test_feature_normalize_config_and_errors():
    cfg = get_kd_cfg()
    cfg.KD.FEATURE.LOSS = "L2FeatureLoss"
    cfg.KD.FEATURE.NORMALIZE = "channel"
    assert build_feature_loss(cfg).normalize == "channel"
    cfg.KD.FEATURE.NORMALIZE = "zscore"
    with pytest.raises(ValueError, match="KD.FEATURE.NORMALIZE.*zscore"):
        build_feature_loss(cfg)
    cfg.KD.FEATURE.LOSS, cfg.KD.FEATURE.NORMALIZE = "SSIMFeatureLoss", "minmax"
    with pytest.raises(ValueError, match="KD.SSIM.NORMALIZE"):
        build_feature_loss(cfg)


def test_build_feature_loss_by_name_and_unknown_name():
    cfg = get_kd_cfg()
    for name, cls in [("SSIMFeatureLoss", SSIMFeatureLoss), ("L2FeatureLoss", L2FeatureLoss)]:
        cfg.KD.FEATURE.LOSS = name
        assert isinstance(build_feature_loss(cfg), cls)
    cfg.KD.FEATURE.LOSS = "SSIM_typo"
    with pytest.raises(KeyError, match="SSIM_typo.*SSIMFeatureLoss"):
        build_feature_loss(cfg)


def test_shape_mismatch_is_explained():
    with pytest.raises(ValueError, match="adapter"):
        L2FeatureLoss()([torch.zeros(1, 4, 8, 8)], [torch.zeros(1, 8, 8, 8)])


def _channel_stats(student, teacher):
    return channel_statistics_loss(student, teacher)


def _ssim_on_positions(student, teacher):
    weights = [torch.linspace(0, 1, s.shape[-1]).expand(s.shape[0], s.shape[-2], -1).contiguous() for s in student]
    return SSIMFeatureLoss(impl="torch")(student, teacher, position_weights=weights)


@pytest.mark.parametrize("name, loss", [
    ("ssim minmax", SSIMFeatureLoss(impl="torch")),
    ("ssim raw", SSIMFeatureLoss(impl="torch", normalize="none")),
    ("ssim with position weights (PFI)", _ssim_on_positions),
    ("l2", L2FeatureLoss()),
    ("l1 channel-standardised", L1FeatureLoss(normalize="channel")),
    ("attention transfer", AttentionTransferLoss()),
    ("channel statistics", _channel_stats),
])
def test_losses_keep_full_precision_under_autocast(name, loss):
    """SOLVER.AMP: a float16 student under autocast gets the float32 loss and gradient of its values."""
    torch.manual_seed(0)
    student = [(torch.randn(2, 8, 30, 36) * 3).half(), torch.randn(2, 8, 8, 9).half()]
    teacher = [s.float() + 0.5 * torch.randn(s.shape) for s in student]
    scale = 2.0**16  # GradScaler's initial loss scale: keeps float16 gradients out of the subnormal range
    exact = [s.float().requires_grad_() for s in student]
    expected = loss(exact, teacher)
    (expected * scale).backward()
    half = [s.clone().requires_grad_() for s in student]
    with torch.autocast("cpu", dtype=torch.float16):
        value = loss(half, teacher)
    (value * scale).backward()
    assert value.dtype == torch.float32, name
    assert abs(value.item() - expected.item()) <= 1e-5 * abs(expected.item()), (name, value.item(), expected.item())
    for h, e in zip(half, exact):
        assert h.grad.dtype == torch.float16
        assert ((h.grad.float() - e.grad).norm() / e.grad.norm()).item() < 5e-3, name


def _windowed_moments(x, y, window_size=11, sigma=1.5):
    """Local Gaussian-weighted moments by unfolding every full window: an independent route to SSIM's terms."""
    from kd_det.losses.ssim import gaussian_window_1d

    g = gaussian_window_1d(window_size, sigma, dtype=x.dtype)
    w2 = (g[:, None] * g[None, :]).flatten()  # (k*k,)
    n, c, h, w = x.shape
    out_h, out_w = h - window_size + 1, w - window_size + 1

    def local(z):  # (N, C, H, W) -> (N, C, out_h, out_w) weighted window means
        cols = F.unfold(z.reshape(n * c, 1, h, w), window_size)  # (N*C, k*k, L)
        return (cols * w2[None, :, None]).sum(1).reshape(n, c, out_h, out_w)

    mx, my = local(x), local(y)
    vx, vy, cxy = local(x * x) - mx**2, local(y * y) - my**2, local(x * y) - mx * my
    return mx, my, vx, vy, cxy


def test_ssim_component_exponents_match_wang_et_al():
    """l^a c^b s^g against the terms computed from unfolded windows; the three terms multiply to SSIM."""
    x, y = _pair((2, 3, 20, 23), 11, dtype=torch.float64)
    y = y.clone()
    y[..., 12:] = 1 - x[..., 12:] + 0.2 * y[..., 12:]  # anti-correlated on the right: negative structure values
    c1, c2 = 0.01**2, 0.03**2
    c3 = c2 / 2
    mx, my, vx, vy, cxy = _windowed_moments(x, y)
    sxy = (vx.clamp_min(0) * vy.clamp_min(0)).sqrt()
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    con = (2 * sxy + c2) / (vx + vy + c2)
    struct = (cxy + c3) / (sxy + c3)
    assert (struct < 0).any()

    def ours(exponents):
        return ssim_map(x, y, 11, 1.5, c1, c2, exponents=exponents)

    assert torch.allclose(ours((1, 0, 0)), lum, atol=1e-10)
    assert torch.allclose(ours((0, 1, 0)), con, atol=1e-10)
    assert torch.allclose(ours((0, 0, 1)), struct, atol=1e-10)
    assert torch.allclose(ours((0, 2, 2)), (con * struct) ** 2, atol=1e-10)
    signed = lum**2 * con.sign() * con.abs() ** 0.5 * struct.sign() * struct.abs() ** 1.5
    assert torch.allclose(ours((2, 0.5, 1.5)), signed, atol=1e-10)
    # C3 = C2 / 2 makes the product of the three terms the usual SSIM
    assert torch.allclose(lum * con * struct, ours((1, 1, 1)), atol=1e-10)
    assert torch.allclose(ours((1, 1, 1)), ours((1.0, 1.0 + 1e-12, 1.0)), atol=1e-9)  # component path


@pytest.mark.parametrize("exponents", [(0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)])
def test_ssim_component_gradients(exponents):
    x, y = _pair((1, 2, 13, 14), 12, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a: SSIMFeatureLoss(normalize="none", exponents=exponents, impl="torch")([a], [y]), (x,))
    # identical features: no loss, whatever the terms imitated
    same = SSIMFeatureLoss(exponents=exponents)([y.clone()], [y])
    assert abs(same.item()) < 1e-9


def test_ssim_structure_term_gradient_is_finite_on_flat_maps():
    """A flat student window (sigma_x = 0) under a structured teacher: sqrt's gradient at 0 is capped."""
    teacher = torch.rand(1, 2, 16, 16, generator=torch.Generator().manual_seed(5))
    student = torch.zeros(1, 2, 16, 16)
    student[..., :, 8:] = 1.0  # flat halves: zero variance in most windows
    student.requires_grad_(True)
    for exponents in ((0, 0, 1), (0, 1, 0), (1, 0, 1)):
        loss = SSIMFeatureLoss(exponents=exponents)([student], [teacher])
        (grad,) = torch.autograd.grad(loss, student)
        assert torch.isfinite(loss) and torch.isfinite(grad).all() and grad.abs().max() < 1e3


def test_ssim_exponents_config_and_errors():
    cfg = get_kd_cfg()
    cfg.KD.SSIM.EXPONENTS = [0.0, 0.0, 1.0]
    loss = build_feature_loss(cfg)
    assert loss.exponents == (0.0, 0.0, 1.0)
    for bad in ([0, 0, 0], [1, -1, 1], [1, 1]):
        with pytest.raises(ValueError, match="KD.SSIM.EXPONENTS must be three non-negative"):
            SSIMFeatureLoss(exponents=bad)
    with pytest.raises(ValueError, match="computes the full SSIM only.*'auto' or 'torch'"):
        SSIMFeatureLoss(exponents=(0, 0, 1), impl="triton")

import pytest
import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as reference_ssim
from tolerances import Bounded, assert_bounded, assert_within, feature_loss_bounded, gamma

from kd_det import get_kd_cfg
from kd_det.losses import (
    AttentionTransferLoss,
    CWDFeatureLoss,
    L1FeatureLoss,
    L2FeatureLoss,
    MGDFeatureLoss,
    PKDFeatureLoss,
    SSIMFeatureLoss,
    build_feature_loss,
    channel_statistics_loss,
    minmax_normalize,
    ssim_feature_loss,
    ssim_map,
)
from kd_det.losses.ssim import FULL_SSIM, effective_window_sizes, gaussian_window_1d

# ---------------------------------------------------------------------------------------------
# SSIM's rounding bound, following ssim_map's operations


def _blur64(a, kh, kw, sigma):
    """ssim_map's valid separable Gaussian blur, in float64 (exact taps)."""
    wh = gaussian_window_1d(kh, sigma, dtype=torch.float64)
    ww = gaussian_window_1d(kw, sigma, dtype=torch.float64)
    c = a.shape[1]
    a = F.conv2d(a, ww.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(a, wh.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def _blur(z: Bounded, kh, kw, sigma, roundings=None) -> Bounded:
    """
    The blur: a kw-tap and then a kh-tap dot product, each off by gamma(taps) times the dot
    product of absolute values (Higham eq. 3.5), with taps rounded once to the working
    precision: gamma(kw + kh + 2) times the blur of |z|.  Another blur of the same window
    passes ``roundings`` (unfolded windows, one kh*kw-tap product: kh * kw + 1).
    """
    k = kh + kw + 2 if roundings is None else roundings
    err = _blur64(z.err, kh, kw, sigma) + gamma(k, z.u) * _blur64(z.value.abs(), kh, kw, sigma)
    return Bounded(_blur64(z.value, kh, kw, sigma), err, z.dtype)


def _ssim_moments(x: Bounded, y: Bounded, window_size=11, sigma=1.5, roundings=None):
    """Bounded mu_x^2, mu_y^2, mu_x mu_y and local (co)variances, as ssim_map computes them."""
    kh, kw = effective_window_sizes(x.shape[-2], x.shape[-1], window_size)
    mu_x, mu_y, e_xx, e_yy, e_xy = (
        _blur(m, kh, kw, sigma, roundings) for m in (x, y, x * x, y * y, x * y)
    )
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    return mu_xx, mu_yy, mu_xy, e_xx - mu_xx, e_yy - mu_yy, e_xy - mu_xy


def _ssim_full(moments, c1, c2) -> Bounded:
    """SSIM as ssim_map's num / den."""
    mu_xx, mu_yy, mu_xy, s_xx, s_yy, s_xy = moments
    return ((2 * mu_xy + c1) * (2 * s_xy + c2)) / ((mu_xx + mu_yy + c1) * (s_xx + s_yy + c2))


def _ssim_components(moments, c1, c2):
    """Luminance, contrast, structure (through sigma_x sigma_y) and c * s without the root."""
    mu_xx, mu_yy, mu_xy, s_xx, s_yy, s_xy = moments
    c3 = c2 / 2
    sxsy = (s_xx.clamp_min(0) * s_yy.clamp_min(0)).sqrt()
    return {
        "lum": (2 * mu_xy + c1) / (mu_xx + mu_yy + c1),
        "con": (2 * sxsy + c2) / (s_xx + s_yy + c2),
        "struct": (s_xy + c3) / (sxsy + c3),
        "cs": (2 * s_xy + c2) / (s_xx + s_yy + c2),
    }


def _ssim_bounded(x, y, window_size=11, sigma=1.5, c1=0.01**2, c2=0.03**2, exponents=FULL_SSIM):
    """ssim_map(x, y, ...) and its bound; exponents' products formed as ssim._components does."""
    moments = _ssim_moments(x, y, window_size, sigma)
    if tuple(exponents) == FULL_SSIM:
        return _ssim_full(moments, c1, c2)
    terms, (a, b, g) = _ssim_components(moments, c1, c2), exponents
    factors = ([terms["lum"] ** a] if a else []) + (
        ([terms["cs"] ** b] if b else [])
        if b == g
        else ([terms["con"] ** b] if b else []) + ([terms["struct"] ** g] if g else [])
    )
    out = factors[0]
    for f in factors[1:]:
        out = out * f
    return out


def _minmax_bounded(x: Bounded) -> Bounded:
    """minmax_normalize: (x - min) / (max - min) per map."""
    flat = x.map(lambda a: a.flatten(2))
    lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    return ((flat - lo) / (hi - lo).clamp_min(1e-6)).map(lambda a: a.view(x.shape))


def _standardize_bounded(x: Bounded, eps=1e-6) -> Bounded:
    """standardize_channels: (x - mean) / max(std, eps) per map."""
    mean = x.mean((2, 3), keepdim=True)
    return (x - mean) / x.var((2, 3), keepdim=True).clamp_min(eps * eps).sqrt()


def _ssim_loss_map_bounded(
    s: Bounded,
    t: Bounded,
    normalize="minmax",
    window_size=11,
    sigma=1.5,
    k1=0.01,
    k2=0.03,
    exponents=FULL_SSIM,
) -> Bounded:
    """SSIMFeatureLoss.loss_map: (1 - SSIM) / 2 of minmax-normalised maps, or per-map C1, C2."""
    if normalize == "minmax":
        s, t = _minmax_bounded(s), _minmax_bounded(t)
        c1, c2 = k1**2, k2**2
    else:
        flat = t.map(lambda a: a.flatten(2))
        value_range = (flat.amax(2) - flat.amin(2)).clamp_min(1e-6)
        value_range = value_range.map(lambda a: a[..., None, None])
        c1, c2 = (k1 * value_range) ** 2, (k2 * value_range) ** 2
    return (1.0 - _ssim_bounded(s, t, window_size, sigma, c1, c2, exponents)) / 2.0


def _msssim64(x, y, window_size=11, sigma=1.5, size_average=False):
    """pytorch_msssim in float64, with the exact float64 window (its own is computed in float32)."""
    win = gaussian_window_1d(window_size, sigma, dtype=torch.float64).view(1, 1, 1, -1)
    return reference_ssim(
        x.double(),
        y.double(),
        data_range=1.0,
        size_average=size_average,
        win=win.repeat(x.shape[1], 1, 1, 1),
        K=(0.01, 0.03),
    )


def _pair(shape, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(shape, generator=g, dtype=dtype)
    # y correlated with x, so SSIM is neither ~0 nor ~1
    y = (0.6 * x + 0.4 * torch.rand(shape, generator=g, dtype=dtype)).clamp(0, 1)
    return x, y


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 3, 32, 40), (1, 8, 11, 17), (3, 1, 64, 64)])
def test_ssim_map_matches_pytorch_msssim(shape, dtype):
    """Per image mean SSIM against pytorch_msssim in float64: within ssim_map's rounding bound."""
    x, y = _pair(shape, 0)
    ours = ssim_map(x.to(dtype), y.to(dtype), 11, 1.5, 0.01**2, 0.03**2).flatten(2).mean(-1).mean(1)
    expected = _ssim_bounded(Bounded.exact(x, dtype), Bounded.exact(y, dtype))
    expected = expected.map(lambda a: a.flatten(2)).mean(-1).mean(1)
    assert_bounded(ours, expected, "mean SSIM per image", reference=_msssim64(x, y))


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_ssim_loss_minmax_equals_reference_on_normalised_inputs(dtype):
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 4, 24, 30, generator=g) * 3 + 1
    t = s + torch.randn(2, 4, 24, 30, generator=g)
    loss = SSIMFeatureLoss(normalize="minmax")([s.to(dtype)], [t.to(dtype)])
    ref = _msssim64(minmax_normalize(s.double()), minmax_normalize(t.double()), size_average=True)
    lmap = _ssim_loss_map_bounded(Bounded.exact(s, dtype), Bounded.exact(t, dtype))
    assert_bounded(loss, feature_loss_bounded([lmap]), "SSIM loss", reference=(1 - ref) / 2)


@pytest.mark.numeric
def test_ssim_of_identical_features_is_perfect_at_every_size():
    """
    Exactly 0: x and its copy go through the same operations, so mu_x = mu_y, mu_x^2 =
    mu_x mu_y and the variances equal the covariance bit for bit; 2 a + C and a + a + C are
    then the same number, num = den, SSIM = 1 and 1 - SSIM = 0 on any kernel.
    """
    g = torch.Generator().manual_seed(2)
    levels = [torch.randn(2, 5, s, s + 1, generator=g) for s in (40, 11, 7, 4, 2, 1)]
    for normalize in ("minmax", "none"):
        loss = SSIMFeatureLoss(normalize=normalize)(levels, [f.clone() for f in levels])
        assert loss.item() == 0.0, normalize


def test_ssim_maps_smaller_than_window_use_a_fitting_window():
    x, y = _pair((1, 2, 5, 8), 3)
    out = ssim_map(x, y, window_size=11)
    assert out.shape == (1, 2, 1, 2)  # a 5x7 window: one row, two columns of positions
    assert torch.isfinite(out).all()


def _assert_gradcheck_tolerance_covers_rounding(loss: Bounded, eps=1e-6, atol=1e-5):
    """
    gradcheck's central differences (f(x + eps) - f(x - eps)) / (2 eps) of a float64 loss move
    with the kernels by at most 2 err(f) / (2 eps): far below ``atol``, which is left to the
    differences' truncation error, eps^2 |f'''| / 6, the same on every machine.
    """
    assert float(loss.err) / eps < atol / 100, float(loss.err) / eps


@pytest.mark.numeric
@pytest.mark.parametrize("normalize", ["minmax", "none"])
def test_ssim_loss_gradcheck(normalize):
    g = torch.Generator().manual_seed(4)
    s = torch.randn(1, 2, 13, 14, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(1, 2, 13, 14, generator=g, dtype=torch.float64)
    loss = SSIMFeatureLoss(window_size=5, sigma=1.0, normalize=normalize)
    assert torch.autograd.gradcheck(lambda a: loss([a], [t]), (s,), eps=1e-6, atol=1e-5)
    lmap = _ssim_loss_map_bounded(
        Bounded.exact(s), Bounded.exact(t), normalize, window_size=5, sigma=1.0
    )
    _assert_gradcheck_tolerance_covers_rounding(feature_loss_bounded([lmap]), eps=1e-6, atol=1e-5)


@pytest.mark.numeric
def test_level_weights_and_mean():
    """
    Exact: each level's loss is the same code on the same inputs as l1 and l2, and the weights
    are exact (0.5 a + 0.5 b rounds like (a + b) / 2: halving is exact in binary; 1 l1 + 3 l2
    is the same two float32 operations as the loss's in the same order).
    """
    x1, y1 = _pair((1, 2, 20, 20), 5)
    x2, y2 = _pair((1, 2, 16, 16), 6)
    loss = SSIMFeatureLoss()
    l1, l2 = loss([x1], [y1]), loss([x2], [y2])
    assert torch.equal(loss([x1, x2], [y1, y2]), (l1 + l2) / 2)
    assert torch.equal(loss([x1, x2], [y1, y2], level_weights=[1.0, 3.0]), l1 + 3 * l2)
    assert torch.equal(ssim_feature_loss([x1, x2], [y1, y2], [1.0, 3.0]), l1 + 3 * l2)


@pytest.mark.numeric
def test_feature_distiller_level_reduction():
    """Exact, as in test_level_weights_and_mean: weights 1, 1/2 and 2 scale by powers of two."""
    from kd_det.modeling import FeatureDistiller

    x1, y1 = _pair((1, 2, 20, 20), 5)
    x2, y2 = _pair((1, 2, 16, 16), 6)
    student, teacher = {"p2": x1, "p3": x2}, {"p2": y1, "p3": y2}
    per_level = [SSIMFeatureLoss()([x1], [y1]), SSIMFeatureLoss()([x2], [y2])]

    def distiller(**kwargs):
        channels = {"p2": 2, "p3": 2}
        return FeatureDistiller(
            levels=["p2", "p3"],
            student_channels=channels,
            teacher_channels=channels,
            loss=SSIMFeatureLoss(),
            weight=2.0,
            **kwargs
        )

    # "sum" is SSIM-KD's convention: lambda times the sum over levels
    summed = distiller(level_reduction="sum")(student, teacher)["loss_kd_ssim"]
    assert torch.equal(summed, 2.0 * (per_level[0] + per_level[1]))
    mean = distiller()(student, teacher)["loss_kd_ssim"]
    assert torch.equal(mean, (per_level[0] + per_level[1]))
    weighted = distiller(level_reduction="sum", level_weights=[0.0, 1.0])(student, teacher)[
        "loss_kd_ssim"
    ]
    assert torch.equal(weighted, 2.0 * per_level[1])  # explicit weights win
    with pytest.raises(ValueError, match="LEVEL_REDUCTION must be one of"):
        distiller(level_reduction="max")
    with pytest.raises(ValueError, match="LEVEL_WEIGHTS has 1 entries for the 2 imitated levels"):
        distiller(level_weights=[1.0])


@pytest.mark.numeric
def test_position_weights_focus_the_loss():
    x, y = _pair((1, 3, 20, 20), 7)
    y[..., :10] = x[..., :10]  # left half identical
    left = torch.zeros(1, 20, 20)
    left[..., :8] = 1
    loss = L2FeatureLoss()
    # exact: every weighted term is 0 (x - y = 0, or a weight of 0)
    assert loss([x], [y], position_weights=[left]).item() == 0.0
    assert loss([x], [y], position_weights=[1 - left]).item() > 0.0
    # uniform weights give the unweighted mean: 0 + 1 * sum(w l) / (sum(w) C), sum(w) C = 1200
    # exactly, against the mean's bound
    lmap = (Bounded.exact(x) - Bounded.exact(y)) ** 2
    uniform = loss([x], [y], position_weights=[torch.ones(1, 20, 20)])
    assert_bounded(uniform, 0.0 + 1.0 * (lmap.sum() / 1200.0), "uniformly weighted L2")
    assert_bounded(loss([x], [y]), feature_loss_bounded([lmap]), "L2")


@pytest.mark.numeric
def test_lp_losses_and_teacher_is_constant():
    g = torch.Generator().manual_seed(8)
    s = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    t = torch.randn(2, 3, 8, 8, generator=g, requires_grad=True)
    diff = Bounded.exact(s) - Bounded.exact(t)
    assert_bounded(L2FeatureLoss()([s], [t]), feature_loss_bounded([diff**2]), "L2")
    out = L1FeatureLoss()([s], [t])
    assert_bounded(out, feature_loss_bounded([diff.abs()]), "L1")
    out.backward()
    assert t.grad is None and s.grad is not None


def _standardize64(x):
    x = x.double()
    centred = x - x.mean(dim=(2, 3), keepdim=True)
    return centred / centred.pow(2).mean(dim=(2, 3), keepdim=True).sqrt()


def _minmax64(x):
    flat = x.double().flatten(2)
    lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
    return ((flat - lo) / (hi - lo)).view(x.shape)


@pytest.mark.numeric
def test_normalised_lp_losses_are_scale_free():
    s, t = _pair((2, 3, 12, 10), 3)
    # float64 references, from the definitions: MSE of [0, 1]-rescaled maps (SSIM-KD's
    # "minmax"); for "channel" (zero mean, unit variance per map) MSE = 2 (1 - Pearson r)
    sc, tc = (x.double() - x.double().mean(dim=(2, 3), keepdim=True) for x in (s, t))
    r = (sc * tc).sum(dim=(2, 3)) / (sc.flatten(2).norm(dim=2) * tc.flatten(2).norm(dim=2))
    refs = {"minmax": (_minmax64(s) - _minmax64(t)).pow(2).mean(), "channel": (2 * (1 - r)).mean()}
    norms = {"minmax": _minmax_bounded, "channel": _standardize_bounded}
    # A per-map affine change of either side's scale leaves the exact loss unchanged; the
    # float32 inputs s * 50 + 3 and t * 0.02 - 0.01 carry the roundings of their two operations.
    # The offset stays within the maps' spread: with t * 0.02 - 1 (170 times the spread) float32
    # resolves neither the inputs (one rounding of 1 is 1e-5 of the spread) nor, in the worst
    # case, the per-map variance (Bounded.var's bound: twice the variance itself).
    scaled = (Bounded.exact(s) * 50.0 + 3.0, Bounded.exact(t) * 0.02 - 0.01)
    for normalize, ref in refs.items():
        base = L2FeatureLoss(normalize=normalize)([s], [t])
        norm = norms[normalize]
        bound = feature_loss_bounded([(norm(Bounded.exact(s)) - norm(Bounded.exact(t))) ** 2])
        assert_bounded(base, bound, normalize, reference=ref)
        got = L2FeatureLoss(normalize=normalize)([s * 50.0 + 3.0], [t * 0.02 - 0.01])
        bound = feature_loss_bounded([(norm(scaled[0]) - norm(scaled[1])) ** 2])
        assert_bounded(got, bound, normalize + " of rescaled features", reference=ref)
        assert not torch.allclose(base, L2FeatureLoss()([s], [t]))
    zs, zt = _standardize_bounded(Bounded.exact(s)), _standardize_bounded(Bounded.exact(t))
    ref = (_standardize64(s) - _standardize64(t)).abs().mean()
    got = L1FeatureLoss(normalize="channel")([s], [t])
    assert_bounded(got, feature_loss_bounded([(zs - zt).abs()]), "L1, standardised", reference=ref)
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
    weights = [
        torch.linspace(0, 1, s.shape[-1]).expand(s.shape[0], s.shape[-2], -1).contiguous()
        for s in student
    ]
    return SSIMFeatureLoss(impl="torch")(student, teacher, position_weights=weights)


@pytest.mark.numeric
@pytest.mark.parametrize(
    "name, loss",
    [
        ("ssim minmax", SSIMFeatureLoss(impl="torch")),
        ("ssim raw", SSIMFeatureLoss(impl="torch", normalize="none")),
        ("ssim with position weights (PFI)", _ssim_on_positions),
        ("l2", L2FeatureLoss()),
        ("l1 channel-standardised", L1FeatureLoss(normalize="channel")),
        ("attention transfer", AttentionTransferLoss()),
        ("channel-wise distillation", CWDFeatureLoss(temperature=2.0)),
        ("masked generative distillation (generated student)", MGDFeatureLoss()),
        ("PKD", PKDFeatureLoss()),
        ("channel statistics", _channel_stats),
    ],
)
def test_losses_keep_full_precision_under_autocast(name, loss):
    """
    SOLVER.AMP: a float16 student under autocast gets the float32 loss and gradient of its values.
    Exactly: float16 -> float32 is exact and the loss runs in float32 with autocast off, so the
    forward and backward are the float32 computation's, on the same values; the float16
    gradient is the float32 one rounded once, by the cast's backward.
    """
    torch.manual_seed(0)
    student = [(torch.randn(2, 8, 30, 36) * 3).half(), torch.randn(2, 8, 8, 9).half()]
    teacher = [s.float() + 0.5 * torch.randn(s.shape) for s in student]
    scale = (
        2.0**16
    )  # GradScaler's initial loss scale: keeps float16 gradients out of the subnormal range
    exact = [s.float().requires_grad_() for s in student]
    expected = loss(exact, teacher)
    (expected * scale).backward()
    half = [s.clone().requires_grad_() for s in student]
    with torch.autocast("cpu", dtype=torch.float16):
        value = loss(half, teacher)
    (value * scale).backward()
    assert value.dtype == torch.float32, name
    assert torch.equal(value, expected), (name, value.item(), expected.item())
    for h, e in zip(half, exact):
        assert h.grad.dtype == torch.float16
        assert torch.equal(h.grad, e.grad.half()), name


def _windowed_moments(x, y, window_size=11, sigma=1.5):
    """Local Gaussian-weighted moments by unfolding every full window: an independent route to
    SSIM's terms."""
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


@pytest.mark.numeric
def test_ssim_component_exponents_match_wang_et_al():
    """
    l^a c^b s^g against the terms computed from unfolded windows; the three terms multiply to
    SSIM.  Both in float64: within the sum of both routes' bounds at u64 (the unfolded window
    is one 121-tap product per moment, ssim_map's two products of 11 taps).
    """
    x, y = _pair((2, 3, 20, 23), 11, dtype=torch.float64)
    y = y.clone()
    y[..., 12:] = (
        1 - x[..., 12:] + 0.2 * y[..., 12:]
    )  # anti-correlated on the right: negative structure values
    c1, c2 = 0.01**2, 0.03**2
    c3 = c2 / 2
    mx, my, vx, vy, cxy = _windowed_moments(x, y)
    sxy = (vx.clamp_min(0) * vy.clamp_min(0)).sqrt()
    lum = (2 * mx * my + c1) / (mx**2 + my**2 + c1)
    con = (2 * sxy + c2) / (vx + vy + c2)
    struct = (cxy + c3) / (sxy + c3)
    assert (struct < 0).any()
    xb, yb = Bounded.exact(x), Bounded.exact(y)
    ref = _ssim_components(_ssim_moments(xb, yb, roundings=11 * 11 + 1), c1, c2)

    def check(exponents, expected, expected_bound, slack=0.0):
        got = ssim_map(x, y, 11, 1.5, c1, c2, exponents=exponents)
        bound = _ssim_bounded(xb, yb, c1=c1, c2=c2, exponents=exponents).err
        bound = bound + expected_bound.err + slack
        assert_within(got, expected, bound, "exponents {}".format(exponents))

    check((1, 0, 0), lum, ref["lum"])
    check((0, 1, 0), con, ref["con"])
    check((0, 0, 1), struct, ref["struct"])
    check((0, 2, 2), (con * struct) ** 2, (ref["con"] * ref["struct"]) ** 2)
    signed = lum**2 * con.sign() * con.abs() ** 0.5 * struct.sign() * struct.abs() ** 1.5
    check((2, 0.5, 1.5), signed, ref["lum"] ** 2 * ref["con"] ** 0.5 * ref["struct"] ** 1.5)
    # C3 = C2 / 2 makes the product of the three terms the usual SSIM
    product = ref["lum"] * ref["con"] * ref["struct"]
    check((1, 1, 1), lum * con * struct, product)
    # the component path: c^(1 + 1e-12) = c (1 + 1e-12 ln c) to first order
    full = ssim_map(x, y, 11, 1.5, c1, c2)
    shift = (full * con.log()).abs() * 1e-12
    check((1.0, 1.0 + 1e-12, 1.0), full, _ssim_bounded(xb, yb, c1=c1, c2=c2), slack=shift)


@pytest.mark.numeric
@pytest.mark.parametrize("exponents", [(0, 0, 1), (0, 1, 0), (1, 0, 1), (1, 1, 1)])
def test_ssim_component_gradients(exponents):
    x, y = _pair((1, 2, 13, 14), 12, dtype=torch.float64)
    x.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda a: SSIMFeatureLoss(normalize="none", exponents=exponents, impl="torch")([a], [y]),
        (x,),
    )
    xb, yb = Bounded.exact(x), Bounded.exact(y)
    _assert_gradcheck_tolerance_covers_rounding(
        feature_loss_bounded([_ssim_loss_map_bounded(xb, yb, "none", exponents=exponents)])
    )
    # identical features: no loss, whatever the terms imitated (0 up to rounding, at u64)
    same = SSIMFeatureLoss(exponents=exponents)([y.clone()], [y])
    bound = feature_loss_bounded([_ssim_loss_map_bounded(yb, yb, exponents=exponents)])
    assert_within(same, 0.0, bound.err, "loss of identical features")


def test_ssim_structure_term_gradient_is_finite_on_flat_maps():
    """A flat student window (sigma_x = 0) under a structured teacher: sqrt's gradient at 0 is
    capped."""
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


def test_one_registry_for_every_distillation_loss():
    """Every loss is a DistillLoss of DISTILL_LOSS_REGISTRY; the classes are the functions."""
    from kd_det.losses import (
        DISTILL_LOSS_REGISTRY,
        FEATURE_LOSS_REGISTRY,
        AdaINHeadLoss,
        ChannelStatisticsLoss,
        DistillLoss,
        RankMimickingLoss,
        SoftLabelKDLoss,
        SoftmaxKDLoss,
        adain,
        build_distill_loss,
        channel_statistics,
        head_output_loss,
        loss_names,
        rank_mimicking_loss,
        soft_label_kd_loss,
        softmax_kd_loss,
    )

    cfg = get_kd_cfg()
    names = loss_names()
    assert {
        "SSIMFeatureLoss",
        "L2FeatureLoss",
        "L1FeatureLoss",
        "AttentionTransferLoss",
        "CWDFeatureLoss",
        "MGDFeatureLoss",
        "PKDFeatureLoss",
        "RankMimickingLoss",
        "SoftLabelKDLoss",
        "SoftmaxKDLoss",
        "ChannelStatisticsLoss",
        "AdaINHeadLoss",
    } <= set(names)
    short = {}
    for name in names:
        loss = build_distill_loss(name, cfg)  # every one builds from a config ...
        assert isinstance(loss, DistillLoss) and DISTILL_LOSS_REGISTRY.get(name) is type(loss)
        short.setdefault(loss.short_name, []).append(name)
    assert short["rm"] == ["RankMimickingLoss"] and short["stats"] == ["ChannelStatisticsLoss"]
    # ... or from explicit arguments; the classes compute what the functions do, bit for bit
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(2, 6, 3, generator=g), torch.randn(2, 6, 3, generator=g)
    matched = torch.tensor([[0, 0, -1, 1, 1, -1], [-1, 0, 0, 0, -1, -1]])
    classes = [torch.tensor([2, 0]), torch.tensor([1])]
    rm = RankMimickingLoss(temperature=0.5)(s, t, matched_gt=matched, gt_classes=classes)
    assert torch.equal(rm, rank_mimicking_loss(s, t, matched, classes, 0.5))
    valid = matched >= 0
    assert torch.equal(
        SoftLabelKDLoss(temperature=2.0, mode="bce")(s, t, valid_mask=valid),
        soft_label_kd_loss(s, t, valid, 2.0, "bce"),
    )
    assert torch.equal(SoftmaxKDLoss(temperature=3.0)(s[0], t[0]), softmax_kd_loss(s[0], t[0], 3.0))
    fs, ft = [torch.randn(2, 3, 4, 4, generator=g)], [torch.randn(2, 3, 4, 4, generator=g)]
    assert torch.equal(ChannelStatisticsLoss()(fs, ft), channel_statistics_loss(fs, ft))
    conv = torch.nn.Conv2d(3, 2, 1)

    def head(features, grad):
        with torch.set_grad_enabled(grad):
            return [conv(x) for x in features]

    mean, std = channel_statistics(fs[0])
    want = head_output_loss([conv(adain(ft[0], mean, std))], [conv(ft[0])])
    assert torch.equal(AdaINHeadLoss()(fs, ft, head=head), want)
    # KD.FEATURE.LOSS takes feature losses only, and says which
    cfg.KD.FEATURE.LOSS = "RankMimickingLoss"
    with pytest.raises(
        ValueError,
        match="'RankMimickingLoss' is a prediction loss, but "
        "KD.FEATURE.LOSS takes a feature loss: one of "
        ".*'SSIMFeatureLoss'",
    ):
        build_feature_loss(cfg)
    assert "SSIMFeatureLoss" in FEATURE_LOSS_REGISTRY
    assert "RankMimickingLoss" not in FEATURE_LOSS_REGISTRY
    assert FEATURE_LOSS_REGISTRY.get("L1FeatureLoss") is L1FeatureLoss
    with pytest.raises(TypeError, match="FEATURE_LOSS_REGISTRY holds feature losses"):
        FEATURE_LOSS_REGISTRY.register(SoftmaxKDLoss)
    with pytest.raises(ValueError, match="MODE"):
        SoftLabelKDLoss(mode="mse")


def test_connector_one_initialisation_and_modes():
    from kd_det.modeling import Connector

    channels_s, channels_t = {"p3": 4, "p4": 8}, {"p3": 8, "p4": 8}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        auto = Connector(channels_s, channels_t, ["p3", "p4"])
        torch.manual_seed(3)
        conv = torch.nn.Conv2d(4, 8, 1)  # PyTorch's draws first, then the one initialisation
        torch.nn.init.kaiming_uniform_(conv.weight, a=1)
    assert list(auto.keys()) == ["p3"] and torch.equal(auto["p3"].weight, conv.weight)
    assert not auto["p3"].bias.any()
    assert sorted(auto.state_dict()) == ["p3.bias", "p3.weight"]  # kd_feature.adapters.p3.weight
    assert list(Connector(channels_s, channels_t, ["p3", "p4"], "conv1x1").keys()) == ["p3", "p4"]
    assert len(Connector(channels_t, channels_t, ["p3"], "none")) == 0
    assert len(Connector(channels_s, channels_t, ["p3"], "auto", needs_equal_channels=False)) == 0
    x = {"p3": torch.randn(1, 4, 2, 2), "p4": torch.randn(1, 8, 2, 2)}
    out = auto(x, ["p4", "p3"])
    assert out[0] is x["p4"] and out[1].shape == (1, 8, 2, 2)
    with pytest.raises(
        ValueError, match="student has 4 channels, teacher 8; set " "KD.FEATURE.ADAPTER"
    ):
        Connector(channels_s, channels_t, ["p3"], "none")
    with pytest.raises(ValueError, match="KD.FEATURE.ADAPTER must be"):
        Connector(channels_s, channels_t, ["p3"], "conv3x3")

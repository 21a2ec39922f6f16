"""
The fused SSIM loss equals the PyTorch path, in value and gradient: both, in float32, lie
within bounds derived from float32's unit roundoff of the PyTorch path in float64
(:class:`_Reference`).

The kernel tests run on CUDA where there is a GPU, and on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``, which must be set before Triton compiles
anything): on a CPU-only machine ``test_kernels_in_triton_interpreter`` reruns this
file that way in a subprocess, with small shapes and small blocks so that they still
span several column strips and row chunks.

They test kd_det's vertical pass ("unrolled").  With ``--ssim-variants`` the kernel tests
run with the ring and band passes of ``benchmarks/ssim_vertical_variants.py`` too, and
those passes are compiled for sm_90 (``test_kernels_compile_for_h100``): GPU sessions
(``benchmarks/gpu/run_suite.sh tests``) pass it, ``make test`` does not.
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import REPO
from interpreter_bounds import checked_accesses
from tolerances import U16, U32, assert_within, gamma

from kd_det.losses import SSIMFeatureLoss, ssim_map, ssim_triton
from kd_det.losses.ssim import effective_window_sizes, gaussian_window_1d, minmax_normalize
from kd_det.losses.ssim_triton import MINMAX_EPS

if ssim_triton.is_available():
    DEVICE = "cuda"
elif ssim_triton.is_interpreted():
    DEVICE = "cpu"
else:
    DEVICE = None
INTERPRETED = DEVICE == "cpu"


def _interpreter_broken():
    """
    Why Triton's interpreter cannot run the kernels here, or "".  Before Triton 3.7 it
    converts program-id scalars to Python ints with ``int()`` of a one-element array,
    which NumPy 2 refuses ("only 0-dimensional arrays can be converted to Python
    scalars"), and every kernel fails in its row loop.
    """
    if ssim_triton.triton is None:
        return "Triton is not installed"
    import numpy

    triton_version = tuple(int(v) for v in ssim_triton.triton.__version__.split(".")[:2])
    if triton_version < (3, 7) and int(numpy.__version__.split(".")[0]) >= 2:
        return "Triton {}'s interpreter fails with NumPy {} (fixed in Triton 3.7)".format(
            ssim_triton.triton.__version__, numpy.__version__
        )
    return ""


INTERPRETER_BROKEN = _interpreter_broken()
if INTERPRETED and INTERPRETER_BROKEN:
    DEVICE, INTERPRETED = None, False
needs_kernel = pytest.mark.skipif(
    DEVICE is None,
    reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)"
    + ("; " + INTERPRETER_BROKEN if INTERPRETER_BROKEN else ""),
)
needs_gpu = pytest.mark.skipif(not ssim_triton.is_available(), reason="needs CUDA and Triton")

# FPN-like pyramids with levels smaller than the 11x11 window
if INTERPRETED:
    LEVEL_SHAPES = [
        (1, 1, 30, 28),
        (1, 1, 14, 22),
        (1, 2, 6, 10),
        (1, 1, 3, 5),
        (1, 2, 1, 1),
        (1, 1, 12, 3),
    ]
else:
    LEVEL_SHAPES = [
        (2, 8, 96, 160),
        (2, 8, 48, 80),
        (2, 8, 24, 40),
        (2, 8, 12, 20),
        (2, 8, 6, 10),
        (2, 8, 3, 5),
        (2, 8, 1, 1),
    ]


@pytest.fixture(autouse=True)
def small_blocks(monkeypatch):
    """Under the interpreter: blocks small enough that small maps cover several of them."""
    if INTERPRETED:
        # 16: the smallest tile tl.dot takes on a GPU (the "band" vertical pass)
        monkeypatch.setattr(ssim_triton, "BLOCK_W", 16)
        monkeypatch.setattr(ssim_triton, "ROWS_PER_PROGRAM", 16)
        monkeypatch.setattr(ssim_triton, "FIXUP_BLOCK", 64)


@pytest.fixture(autouse=True)
def bounds_checked():
    """Under the interpreter: every load and store stays inside the kernel's tensor arguments."""
    if not INTERPRETED:
        yield None
        return
    with checked_accesses() as checker:
        yield checker


@pytest.fixture(autouse=True)
def poisoned_allocations(monkeypatch):
    """
    Floating-point ``torch.empty``/``empty_like`` tensors start as NaN, as memory reused
    from the caching allocator holds garbage on a GPU (fresh CPU pages are zero, which
    would hide a kernel that uses an element it never wrote): any such use shows as NaN.
    """
    if DEVICE is None:
        return
    empty, empty_like = torch.empty, torch.empty_like

    def poisoned(allocate):
        def allocate_nan(*args, **kwargs):
            t = allocate(*args, **kwargs)
            return t.fill_(float("nan")) if t.is_floating_point() else t

        return allocate_nan

    monkeypatch.setattr(torch, "empty", poisoned(empty))
    monkeypatch.setattr(torch, "empty_like", poisoned(empty_like))


DEFAULT_PASS = "unrolled"  # kd_det's own
VARIANT_PASSES = ("ring", "band")  # benchmarks/ssim_vertical_variants.py
needs_variants = pytest.mark.skipif(
    "not config.getoption('--ssim-variants')",
    reason="tests the ring and band passes of the benchmarks " "(pytest --ssim-variants)",
)


def pytest_generate_tests(metafunc):
    """The kernel tests take kd_det's vertical pass; with --ssim-variants, the benchmarks' too."""
    if "vertical_pass" in metafunc.fixturenames:
        variants = VARIANT_PASSES if metafunc.config.getoption("--ssim-variants") else ()
        metafunc.parametrize("vertical_pass", (DEFAULT_PASS,) + variants, indirect=True)


def _variants_module(monkeypatch):
    """benchmarks/ssim_vertical_variants.py, imported as the benchmarks import it."""
    monkeypatch.syspath_prepend(os.path.join(REPO, "benchmarks"))
    import ssim_vertical_variants

    return ssim_vertical_variants


@pytest.fixture
def vertical_pass(request, monkeypatch):
    """The vertical pass the test's kernels launch: kd_det's, or one of the benchmarks'."""
    if request.param == DEFAULT_PASS:
        yield request.param
        return
    with _variants_module(monkeypatch).vertical_pass(request.param):
        yield request.param


# Roundings of a float32 evaluation, counted per term of a sum for whichever implementation has
# more, the fused kernel (ssim_triton.py) or the PyTorch path (ssim_map and autograd); a sum of
# such terms in any order is then off by at most gamma(count) times the sum of their magnitudes
# (tests/tolerances.py).  Triton's fp32 "/" is div.full.f32 on NVIDIA GPUs, within 2 ulp: 4.
#
# Window sums, per term w_i w_j x'^2 of E[x'^2] (E[x'y'] has as many, mu_x fewer): the kernel's
# x - lo (1, squared 2), w * x * x (2), the taps rounded to fp32 (2), the vertical tap product
# (1), the scaling by inv^2 (inv = 1 / range: 2, squared: 5, applied: 6) and the sums
# (kw - 1) + (kh - 1); PyTorch's x' = (x - lo) / range (3, squared 6 + 1) has 2 fewer.
K_STATS_EXTRA = 11
# SSIM = N1 N2 / (D1 D2) from v = (mu_x, mu_y, N1, N2, D1, D2): the kernel's 1 / (D1 D2) (1 + 4)
# and two products
K_VALUE = 7
# Gradient, per term (o, p) of sum_o w(o, p) [G_mu(o) + 2 x'_p G_xx(o) + y'_p G_xy(o)]:
# G_mu from v (the kernel's: S 7, D2 - D1 1, two products, the difference 1, times 1 / (D1 D2)
# 5 + 1: 17; PyTorch's chain rule at most 10), the transposed window (taps 2, products 2, sums
# (kw - 1) + (kh - 1)), times x'_p or y'_p and the sum of the three (3), the loss's scale
# (1 / levels, 1 / count, their product: 3), min-max: times inv (3), the min/max share added (1)
K_GRAD_EXTRA = 29
# Min-max: the sums over a plane of g' x' and g' (HW - 1 additions), per term at most 10 more:
# PyTorch's g' * ((x - lo) / range) / range (6), the two sums added, divided by the count of
# extreme positions, and added to the gradient
K_PLANE_SUM_EXTRA = 9
# C1, C2 = (k * range)^2 in fp32: range 1, k 1, product 1, squared: 7 (a plain constant: 1)
K_CONSTANT = 7


def _per_plane(c, n, channels, device):
    """A scalar or one value per (image, channel) plane as (n, channels, 1, 1) float64."""
    c = torch.as_tensor(c, dtype=torch.float64, device=device).reshape(-1)
    return c.expand(n * channels).reshape(n, channels, 1, 1)


class _Reference:
    """
    The float64 reference of ``mean(ssim_map(x', y'))`` and of its gradient with respect
    to ``x``: the PyTorch path on the float32 inputs converted to float64 (exactly), x', y'
    being x, y or, with ``normalize``, their min-max rescaling.  And bounds on the error of
    any float32 evaluation of them, the fused kernel's or the PyTorch path's, derived from
    the arithmetic (u = 2**-24, gamma(k) = k u / (1 - k u), W the Gaussian window, every
    magnitude computed in float64 from the data; the counts k are the K_* above):

    1. Window sums: mu_x = W[x'], E[x'^2] = W[x'^2], E[x'y'] (and y's) are sums of kh * kw
       terms of at most k_s = kh + kw + 11 roundings each: in any order of summation off by
       at most gamma(k_s) W[|term|].
    2. Both implementations compute v = (mu_x, mu_y, N1, N2, D1, D2), N1 = 2 mu_x mu_y + C1,
       N2 = 2 sigma_xy + C2, D1 = mu_x^2 + mu_y^2 + C1, D2 = sigma_x^2 + sigma_y^2 + C2, then
       everything else from v.  v's errors ``beta`` follow from 1 to first order.  sigma^2 =
       E[x'^2] - mu^2 cancels: beta(D2) ~ gamma(k_s) (E[x'^2] + E[y'^2]), the size of its
       terms, not of D2 (relative to D2 that is gamma(k_s) kappa, kappa = (mu_x^2 + mu_y^2 +
       sigma_x^2 + sigma_y^2) / D2, up to ~2e3 here); and likewise for N2, N1, D1.
    3. Value: S from v with 7 roundings, so per position |dS| <= sum_v |dS/dv| beta(v)
       + gamma(7) |S| (partial derivatives by float64 autograd), and the mean over the M
       positions adds gamma(M + 1) mean |S|.
    4. Gradient: both compute, per position o, G_mu = dS/dmu_x, G_xx = dS/dE[x^2] = -S / D2
       and G_xy = dS/dE[xy] from v, then g'_p = (1/M) sum_o w(o, p) [G_mu(o) + 2 x'_p G_xx(o)
       + y'_p G_xy(o)] (the kernel's transposed window, PyTorch's convolution backward).  The
       gradient is O(1/sigma) but these terms are O(mu/sigma^2) and cancel, so its error is
       (a) the change of each term when v moves by beta: sum_v |dG_mu/dv + 2 x'_p dG_xx/dv +
       y'_p dG_xy/dv| beta(v), summed pair by pair (o, p).  An error of D2 moves G_mu and
       2 x'_p G_xx together, and cancels in their sum as they do: bounding each derivative
       map's error on its own would lose that (a factor sqrt(kappa) looser);
       (b) the roundings of evaluating the sum: gamma(kh + kw + 29) times the magnitudes of
       its terms, T_mu + 2 |x'_p| |G_xx| + |y'_p| |G_xy| window-summed (T_mu: those of G_mu's
       four terms); (c) with min-max, x'_p's and y'_p's own errors, gamma(4) relative.
       The bound is per element, made of the magnitudes of that element's own terms: a small
       gradient element with large terms gets a bound as large as those terms, as it must;
       a relative bound per element would fail there, and a norm-wise one (max |g| per plane)
       only approximates the terms' size.
    5. Min-max: grad_x = g' / range, plus, at the positions holding the plane's minimum or
       maximum, shares of the plane's sums of g' x' and of g', which cancel: gamma(HW + 9)
       times the sums of |g' x'| and |g'|, plus the sum of 4's bounds times (1 + |x'_p|).

    First order (tolerances.py): the dropped terms are smaller than the kept ones by about
    the relative perturbation of D1 and D2, ``first_order``, asserted below 1e-2 (observed up
    to 5e-3, on 1x1 windows).  The bounds hold for any order of summation, vector width and
    thread count.  The float64 reference's own error (~1e-16 kappa) is negligible.
    """

    def __init__(self, x, y, c1=0.01**2, c2=0.03**2, normalize=False, window_size=11, sigma=1.5):
        n, c, h, w = x.shape
        self.normalize = normalize
        x64 = x.detach().double().requires_grad_()
        y64 = y.detach().double()
        c1, c2 = _per_plane(c1, n, c, x.device), _per_plane(c2, n, c, x.device)
        xn = minmax_normalize(x64) if normalize else x64
        yn = minmax_normalize(y64) if normalize else y64
        mean = ssim_map(xn, yn, window_size, sigma, c1, c2).mean()
        grads = torch.autograd.grad(mean, [x64, xn] if normalize else [x64])
        self.mean, self.grad, grad_n = mean.detach(), grads[0], grads[-1]  # grad_n: w.r.t. x'
        xn, yn = xn.detach(), yn.detach()

        kh, kw = effective_window_sizes(h, w, window_size)
        ho, wo = h - kh + 1, w - kw + 1
        wv, wh = (gaussian_window_1d(k, sigma, x.device, torch.float64) for k in (kh, kw))
        wv4 = wv.view(1, 1, -1, 1).expand(c, 1, -1, 1)
        wh4 = wh.view(1, 1, 1, -1).expand(c, 1, 1, -1)

        def window(t):
            return F.conv2d(F.conv2d(t, wh4, groups=c), wv4, groups=c)

        def window_t(t):  # the transposed window, output positions -> input positions
            return F.conv_transpose2d(F.conv_transpose2d(t, wv4, groups=c), wh4, groups=c)

        # 1, 2: the statistics, v and its errors beta
        g_s = gamma(kh + kw + K_STATS_EXTRA)
        mu_x, mu_y, e_xx, e_yy = window(xn), window(yn), window(xn * xn), window(yn * yn)
        s_xx, s_yy, s_xy = e_xx - mu_x**2, e_yy - mu_y**2, window(xn * yn) - mu_x * mu_y
        b_mx, b_my = g_s * window(xn.abs()), g_s * window(yn.abs())
        b_sxx = g_s * e_xx + 2 * mu_x.abs() * b_mx + U32 * (mu_x**2 + s_xx.abs())
        b_syy = g_s * e_yy + 2 * mu_y.abs() * b_my + U32 * (mu_y**2 + s_yy.abs())
        b_sxy = (
            g_s * window((xn * yn).abs())
            + mu_y.abs() * b_mx
            + mu_x.abs() * b_my
            + U32 * ((mu_x * mu_y).abs() + s_xy.abs())
        )
        b_c1, b_c2 = gamma(K_CONSTANT) * c1, gamma(K_CONSTANT) * c2
        n1, n2 = 2 * mu_x * mu_y + c1, 2 * s_xy + c2
        d1, d2 = mu_x**2 + mu_y**2 + c1, s_xx + s_yy + c2
        b_mu = 2 * mu_y.abs() * b_mx + 2 * mu_x.abs() * b_my  # of 2 mu_x mu_y, mu_x^2 + mu_y^2
        beta = torch.stack(
            [
                b_mx,
                b_my,
                b_mu + gamma(2) * (2 * (mu_x * mu_y).abs() + c1) + b_c1,
                2 * b_sxy + U32 * (2 * s_xy.abs() + c2) + b_c2,
                b_mu + gamma(3) * d1 + b_c1,
                b_sxx + b_syy + gamma(2) * (s_xx.abs() + s_yy.abs() + c2) + b_c2,
            ]
        )
        self.first_order = max((beta[4] / d1).max().item(), (beta[5] / d2).max().item())
        assert self.first_order < 1e-2, "first-order bounds need small perturbations of D1, D2"

        # S and the derivative maps as functions of v, and their partial derivatives
        v = [t.clone().requires_grad_() for t in (mu_x, mu_y, n1, n2, d1, d2)]
        v_mx, v_my, v_n1, v_n2, v_d1, v_d2 = v
        s = v_n1 * v_n2 / (v_d1 * v_d2)
        g_mu = (2 * v_my * (v_n2 - v_n1) - 2 * v_mx * s * (v_d2 - v_d1)) / (v_d1 * v_d2)
        g_xx = -s / v_d2
        g_xy = 2 * v_n1 / (v_d1 * v_d2)

        def partials(f):  # (6, ...) d f / d v, per position (f is elementwise in v)
            d = torch.autograd.grad(f.sum(), v, retain_graph=True, allow_unused=True)
            return torch.stack([torch.zeros_like(t) if g is None else g for g, t in zip(d, v)])

        ds, dg_mu, dg_xx, dg_xy = partials(s), partials(g_mu), partials(g_xx), partials(g_xy)
        s, g_xx, g_xy = s.detach(), g_xx.detach(), g_xy.detach()

        # 3: the value
        self.count = count = n * c * ho * wo
        self.s_map = s
        s_bound = (ds.abs() * beta).sum(0) + gamma(K_VALUE) * s.abs()
        self.value_bound = s_bound.mean() + gamma(count + 1) * s.abs().mean()

        # 4: the gradient with respect to x': (a) pair by pair, (b) rounding, (c) x', y'
        moved = torch.zeros_like(xn)
        for i in range(kh):
            for j in range(kw):
                at = (Ellipsis, slice(i, i + ho), slice(j, j + wo))
                change = (dg_mu + 2 * xn[at] * dg_xx + yn[at] * dg_xy).abs() * beta
                moved[at] += wv[i] * wh[j] * change.sum(0)
        t_mu = 2 * (mu_y.abs() * (n2.abs() + n1.abs()) + mu_x.abs() * s.abs() * (d2 + d1))
        terms = (
            window_t(t_mu / (d1 * d2))
            + 2 * xn.abs() * window_t(g_xx.abs())
            + yn.abs() * window_t(g_xy.abs())
        )
        b_gn = moved + gamma(kh + kw + K_GRAD_EXTRA) * terms
        if normalize:
            b_gn += gamma(4) * (
                2 * window_t(g_xx).abs() * xn.abs() + window_t(g_xy).abs() * yn.abs()
            )
        b_gn /= count
        if not normalize:
            self.grad_bound = b_gn
            return

        # 5: min-max, grad_x = inv (g' + the shares at the extremes)
        flat = x64.detach().flatten(2)
        lo, hi = flat.amin(2, keepdim=True), flat.amax(2, keepdim=True)
        inv = 1 / (hi - lo).clamp_min(MINMAX_EPS).unsqueeze(-1)
        g, xf, bf = grad_n.flatten(2), xn.flatten(2), b_gn.flatten(2)
        sums = (
            gamma(h * w + K_PLANE_SUM_EXTRA) * ((g * xf).abs() + g.abs())
            + bf * (1 + xf.abs())
            + gamma(4) * (g * xf).abs()
        ).sum(2, keepdim=True)
        at_lo, at_hi = flat == lo, flat == hi
        shares = sums * (at_lo / at_lo.sum(2, keepdim=True) + at_hi / at_hi.sum(2, keepdim=True))
        self.grad_bound = inv * (b_gn + shares.view_as(xn))
        # for float16 outputs: where the kernel rounds the gradient twice, and what it rounds first
        self.extreme = (at_lo | at_hi).view_as(xn)
        self.before_shares = inv * (grad_n.abs() + b_gn)

    def check(self, value, grad, what, dtype=torch.float32):
        """
        ``value`` (the mean SSIM) and ``grad`` (its gradient w.r.t. x) from a float32
        evaluation are within the bounds.  With ``dtype`` float16 they were then rounded to
        it: U16 of their size more, plus half float16's smallest subnormal (2**-25) for the
        gradient; at the min-max extremes twice (the kernel stores the gradient in float16,
        then adds the shares to it and stores again).
        """
        value_bound, grad_bound = self.value_bound, self.grad_bound
        if dtype == torch.float16:
            value_bound = value_bound + U16 * (self.mean.abs() + value_bound)
            grad_bound = grad_bound + U16 * (self.grad.abs() + grad_bound) + 2**-25
            if self.normalize:
                grad_bound = grad_bound + self.extreme * (U16 * self.before_shares + 2**-25)
        else:
            assert dtype == torch.float32, dtype
        assert_within(value.detach(), self.mean, value_bound, what + ": mean SSIM")
        assert_within(grad, self.grad, grad_bound, what + ": gradient")

    def level_loss_bounds(self, levels):
        """
        Bounds of one level's term (1 - mean SSIM) / 2 / levels of SSIMFeatureLoss and of its
        gradient: 3's, plus rounding 1 - S per position (PyTorch) or 1 - mean (the kernel),
        gamma(1) of 1 + |S|.  (levels: the scale's roundings are counted in K_GRAD_EXTRA.)
        """
        value = (self.value_bound + gamma(self.count + 2) * (1 + self.s_map.abs()).mean()) / 2
        return value / levels, self.grad_bound / (2 * levels)


def _torch_float32(x, y, normalize=False):
    """
    Mean SSIM and its gradient with respect to x by the PyTorch path in float32.  The tests
    check it against _Reference's bounds too, on the CPU only: on CUDA, cuDNN may run float32
    convolutions in TF32 (torch.backends.cudnn.allow_tf32), whose 10-bit mantissas the bounds
    do not cover (the kernel computes in IEEE fp32 throughout).
    """
    x = x.detach().float().requires_grad_()
    y = y.detach().float()
    if normalize:
        x_n, y_n = minmax_normalize(x), minmax_normalize(y)
    else:
        x_n, y_n = x, y
    mean = ssim_map(x_n, y_n).mean()
    (grad,) = torch.autograd.grad(mean, x)
    return mean, grad


def _fpn_features():
    """Features of a Detectron2 R-18 FPN (random weights) on a structured image."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 1 if INTERPRETED else 32
    torch.manual_seed(0)
    backbone = build_backbone(cfg).to(DEVICE).eval()
    size = (128, 128) if INTERPRETED else (256, 320)
    yy, xx = torch.meshgrid(
        torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij"
    )
    image = (
        torch.stack([torch.sin(8 * xx), torch.cos(5 * yy), xx * yy]).mul(60).unsqueeze(0).to(DEVICE)
    )
    with torch.no_grad():
        s = backbone(image)
        t = backbone(image + 20 * torch.randn_like(image))
    return list(s.values()), list(t.values())


@pytest.mark.skipif(
    not INTERPRETED, reason="checks the interpreter's bounds check (TRITON_INTERPRET=1)"
)
def test_fused_tests_catch_out_of_bounds_accesses(bounds_checked):
    """The bounds check that the interpreted kernel tests run under fails on a planted over-read and
    over-write."""
    triton, tl = ssim_triton.triton, ssim_triton.tl

    @triton.jit
    def copy_kernel(
        src, dst, n, MASK_LOAD: tl.constexpr, MASK_STORE: tl.constexpr, BLOCK: tl.constexpr
    ):
        offsets = tl.arange(0, BLOCK)
        inside = offsets < n
        values = tl.load(src + offsets, mask=inside if MASK_LOAD else None)
        tl.store(dst + offsets, values, mask=inside if MASK_STORE else None)

    src, dst = torch.arange(10.0), torch.zeros(10)
    copy_kernel[(1,)](src, dst, 10, MASK_LOAD=True, MASK_STORE=True, BLOCK=16)
    assert torch.equal(dst, src) and bounds_checked.accesses == 20
    for mask_load, mask_store, what in [
        (False, True, "load of 6 lanes"),
        (True, False, "store of 6 lanes"),
    ]:
        with pytest.raises(Exception, match=what + " outside every tensor argument"):
            copy_kernel[(1,)](src, dst, 10, MASK_LOAD=mask_load, MASK_STORE=mask_store, BLOCK=16)


@pytest.mark.numeric
@needs_kernel
@pytest.mark.parametrize("shape", LEVEL_SHAPES)
def test_fused_mean_and_grad_equal_torch(shape, vertical_pass):
    """Mean SSIM and its gradient, fused and by PyTorch in float32, within _Reference's bounds."""
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.rand(shape, device=DEVICE, generator=g).requires_grad_()
    y = 0.5 * x.detach() + 0.5 * torch.rand(shape, device=DEVICE, generator=g)
    ref = _Reference(x, y)
    fused = ssim_triton.fused_ssim_mean(x, y)
    (fused_grad,) = torch.autograd.grad(fused, x)
    ref.check(fused, fused_grad, "fused")
    if not x.is_cuda:
        ref.check(*_torch_float32(x, y), "PyTorch float32")


@pytest.mark.numeric
@needs_kernel
def test_fused_minmax_normalisation_equals_torch(monkeypatch, vertical_pass):
    """Min-max rescaling inside the kernel: ties at the minimum, a constant map, a map far from
    0."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    shape = (1, 3, 22, 28) if INTERPRETED else (2, 15, 60, 90)
    # backward over chunks of a few planes, the last one shorter (its zero row then lies in
    # the derivative maps' data rows, which the chunk before wrote): 3 = 2 + 1, 30 = 7 * 4 + 2
    chunk_planes = 2 if INTERPRETED else 4
    ho, wo = shape[2] - 10, shape[3] - 10
    monkeypatch.setattr(
        ssim_triton, "BACKWARD_CHUNK_BYTES", chunk_planes * 3 * 4 * ho * (wo + 2 * 10)
    )
    x = torch.randn(shape, device=DEVICE, generator=g)
    x[0, 1] = 0.25  # constant: the range is clamped, every position is both min and max
    x[0, 2] += 40.0  # an offset of ~6 ranges: the kernel shifts each value, then scales the sums
    x[0, 0, 0, :3] = x[0, 0].min() - 1.0  # three positions share the minimum
    x[0, 2, 5, 7] = x[0, 2].max() + 2.0
    x.requires_grad_()
    y = 3.0 * x.detach() + torch.randn(shape, device=DEVICE, generator=g)
    ref = _Reference(x, y, normalize=True)
    fused = ssim_triton.fused_ssim_mean(x, y, normalize=True)
    (fused_grad,) = torch.autograd.grad(fused, x)
    # element-wise: the constant plane's gradient (its range clamped to eps) is ~1e6 times the
    # others', and the extremes' positions get shares of sums over their plane
    ref.check(fused, fused_grad, "fused")
    # (among them) the tied minimum's positions, where torch.amin shares its gradient equally
    tied = (0, 0, 0, slice(0, 3))
    assert_within(fused_grad[tied], ref.grad[tied], ref.grad_bound[tied], "tied minimum")
    if not x.is_cuda:
        ref.check(*_torch_float32(x, y, normalize=True), "PyTorch float32")


@pytest.mark.numeric
@needs_kernel
def test_fused_half_precision_student(vertical_pass):
    """A float16 student (AMP training) beside a float32 teacher: fp32 inside, the gradient in
    float16."""
    g = torch.Generator(device=DEVICE).manual_seed(3)
    shape = (1, 2, 19, 23) if INTERPRETED else (2, 8, 60, 90)
    x = torch.randn(shape, device=DEVICE, generator=g).half().requires_grad_()
    y = 2.0 * x.detach().float() + torch.randn(shape, device=DEVICE, generator=g)
    # the kernel reads the float16 values exactly and computes in fp32: the float32 bounds, plus
    # the outputs' rounding to float16, which dominates (U16 = 2**-11)
    ref = _Reference(x, y, normalize=True)
    fused = ssim_triton.fused_ssim_mean(x, y, normalize=True)
    (fused_grad,) = torch.autograd.grad(fused, x)
    assert fused.dtype == torch.float16 and fused_grad.dtype == torch.float16
    ref.check(fused, fused_grad, "fused", dtype=torch.float16)
    if not x.is_cuda:
        ref.check(*_torch_float32(x, y, normalize=True), "PyTorch float32 (of the float16 values)")


def _feature_loss_constants(teacher, normalize, k1=0.01, k2=0.03):
    """SSIMFeatureLoss's (c1, c2) in float64: per plane from the teacher's range without min-max."""
    if normalize == "minmax":
        return k1**2, k2**2
    flat = teacher.detach().double().flatten(2)
    value_range = (flat.amax(2) - flat.amin(2)).clamp_min(1e-6)
    return (k1 * value_range) ** 2, (k2 * value_range) ** 2


@pytest.mark.numeric
@needs_kernel
@pytest.mark.parametrize("normalize", ["minmax", "none"])
def test_fused_feature_loss_on_fpn_features(monkeypatch, normalize, vertical_pass):
    """
    SSIMFeatureLoss over an FPN's levels, fused and by PyTorch in float32, against the PyTorch
    path in float64: the loss sum_l (1 - mean SSIM_l) / 2 / L within the levels' bounds
    (:meth:`_Reference.level_loss_bounds`) plus the rounding of the sum over L levels
    (gamma(L + 1) of the levels' magnitudes); each level's gradient within its bound.
    """
    if INTERPRETED:  # the interpreter's time goes with the number of programs
        monkeypatch.setattr(ssim_triton, "BLOCK_W", 32)
        monkeypatch.setattr(ssim_triton, "ROWS_PER_PROGRAM", 32)
    student, teacher = _fpn_features()
    student = [s.clone().requires_grad_() for s in student]
    levels = len(student)
    student64 = [s.detach().double().requires_grad_() for s in student]
    loss_fn = SSIMFeatureLoss(normalize=normalize, impl="torch")
    ref_loss = loss_fn(student64, [t.double() for t in teacher])
    ref_grads = torch.autograd.grad(ref_loss, student64)
    refs = [
        _Reference(s, t, *_feature_loss_constants(t, normalize), normalize == "minmax")
        for s, t in zip(student, teacher)
    ]
    bounds = [ref.level_loss_bounds(levels) for ref in refs]
    loss_bound = (
        sum(b for b, _ in bounds)
        + gamma(levels + 1) * sum((1 - ref.mean).abs() / 2 for ref in refs) / levels
    )

    fused_loss = (
        sum(
            ssim_triton.fused_ssim_feature_loss(s, t, 11, 1.5, 0.01, 0.03, normalize)
            for s, t in zip(student, teacher)
        )
        / levels
    )
    results = [("fused", fused_loss, torch.autograd.grad(fused_loss, student))]
    if DEVICE == "cpu":
        torch_loss = loss_fn(student, teacher)
        results.append(("PyTorch float32", torch_loss, torch.autograd.grad(torch_loss, student)))
    for what, loss, grads in results:
        assert_within(loss.detach(), ref_loss.detach(), loss_bound, what + ": loss")
        for level, (grad, ref_grad, (_, grad_bound)) in enumerate(zip(grads, ref_grads, bounds)):
            assert_within(grad, ref_grad, grad_bound, "{}: level {} gradient".format(what, level))


@pytest.mark.numeric
@needs_kernel
def test_fused_non_contiguous_inputs(vertical_pass):
    """A channels-last student (KD.TEACHER.CHANNELS_LAST teachers give such features) and a
    transposed teacher."""
    g = torch.Generator(device=DEVICE).manual_seed(2)
    x = (
        torch.rand(1, 2, 14, 19, device=DEVICE, generator=g)
        .to(memory_format=torch.channels_last)
        .requires_grad_()
    )
    y = 0.5 * x.detach() + 0.5 * torch.rand(1, 2, 19, 14, device=DEVICE, generator=g).transpose(
        -1, -2
    )
    assert not x.is_contiguous() and not y.is_contiguous()
    ref = _Reference(x, y, normalize=True)
    fused = ssim_triton.fused_ssim_mean(x, y, normalize=True)
    (fused_grad,) = torch.autograd.grad(fused, x)
    assert fused_grad.shape == x.shape
    ref.check(fused, fused_grad, "fused")


@needs_kernel
def test_fused_kernel_rejects_bad_input():
    x = torch.rand(1, 2, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match="windows up to"):
        ssim_triton.fused_ssim_mean(x, x, window_size=17)
    with pytest.raises(ValueError, match="one shape"):
        ssim_triton.fused_ssim_mean(x, x[:, :1])


@pytest.mark.numeric
@needs_kernel
def test_fused_backward_uses_the_forward_config(monkeypatch, vertical_pass):
    """
    The backward launches with the forward's tuning constants: it does not read them again, so
    constants changed in between (benchmarks do) do not mix settings or passes.
    """
    g = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.rand((1, 1, 14, 13), device=DEVICE, generator=g).requires_grad_()
    y = torch.rand((1, 1, 14, 13), device=DEVICE, generator=g)
    ref = _Reference(x, y)
    fused = ssim_triton.fused_ssim_mean(x, y)

    def read_again(cls):
        raise AssertionError("the backward read the tuning constants again")

    monkeypatch.setattr(ssim_triton._KernelConfig, "current", classmethod(read_again))
    monkeypatch.setattr(ssim_triton, "BLOCK_W", 7)
    (fused_grad,) = torch.autograd.grad(fused, x)
    ref.check(fused, fused_grad, "fused")


@needs_gpu
def test_auto_picks_the_kernel_on_cuda(monkeypatch):
    calls = []
    real = ssim_triton.fused_ssim_feature_loss
    monkeypatch.setattr(
        ssim_triton, "fused_ssim_feature_loss", lambda *a: calls.append(1) or real(*a)
    )
    x = torch.rand(1, 2, 16, 16, device="cuda")
    SSIMFeatureLoss(impl="auto")([x], [x.flip(-1)])
    assert calls


@pytest.mark.numeric
@pytest.mark.slow
@pytest.mark.skipif(
    DEVICE is not None or bool(INTERPRETER_BROKEN),
    reason="the kernel tests run directly here" if DEVICE else INTERPRETER_BROKEN,
)
def test_kernels_in_triton_interpreter(tmp_path):
    """
    On a CPU-only machine: the kernel tests above, on CPU tensors, by Triton's interpreter.
    Two processes at once, each with about half of the interpreter's time (the min-max and
    FPN tests, the rest): the test process only waits, so a 2-core machine runs them in
    half the time (OMP_NUM_THREADS=1: a core each; the numeric tests' bounds hold for any
    thread count, and the CPU-kernel settings, ATEN_CPU_CAPABILITY and ONEDNN_MAX_CPU_ISA,
    pass on to them).  kd_det's vertical pass only: the benchmarks' other passes are not
    part of the suite (``--ssim-variants``).
    """
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    runs = []
    halves = [
        "fused and (minmax_normalisation or feature_loss)",
        "fused and not (minmax_normalisation or feature_loss)",
    ]
    for k, selection in enumerate(halves):
        log = open(tmp_path / "interpreted{}.log".format(k), "w+")
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "pytest",
                "-q",
                "-p",
                "no:cacheprovider",
                __file__,
                "-k",
                selection,
            ],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
        )
        runs.append((selection, proc, log))
    for selection, proc, log in runs:
        try:
            proc.wait(timeout=1200)
        finally:
            proc.kill()
        log.seek(0)
        out = log.read()
        log.close()
        assert proc.returncode == 0, selection + ":\n" + out[-8000:]
        last = out.strip().splitlines()[-1]
        assert " passed" in last and "skipped" not in last and "deselected" in last, (
            selection + ":\n" + out[-2000:]
        )


def _has_ptxas():
    if ssim_triton.triton is None:
        return False
    return os.path.isfile(
        os.path.join(
            os.path.dirname(ssim_triton.triton.__file__), "backends", "nvidia", "bin", "ptxas"
        )
    )


@pytest.mark.slow
@needs_variants
@pytest.mark.skipif(not _has_ptxas(), reason="needs Triton with its NVIDIA backend (bundled ptxas)")
def test_kernels_compile_for_h100(monkeypatch):
    """
    The benchmarks' other vertical passes compile for sm_90 without a GPU, within its shared
    memory and without spilling registers; the instruction count of the row loops
    (``--sass``) parses.  kd_det's pass is compiled, and checked the same way, by
    :func:`test_launch_path_for_h100`.
    """
    import runpy

    variants = _variants_module(monkeypatch)  # ssim_kernel_resources.py imports it too
    bench = runpy.run_path(os.path.join(REPO, "benchmarks", "ssim_kernel_resources.py"))
    settings = [
        ("ring", ssim_triton.BLOCK_W, ssim_triton.NUM_WARPS, None),
        ("band", 32, 4, variants.BAND_NUM_STAGES),
    ]
    for vertical_pass, block_w, warps, stages in settings:
        for name, fn, constexprs in bench["kernels_of"](
            vertical_pass, block_w, ssim_triton.ROWS_PER_PROGRAM, "ieee"
        ):
            r = bench["compile_kernel"](fn, constexprs, warps, stages, 90)
            assert r["shared_bytes"] <= bench["SHARED_LIMIT"], (vertical_pass, name, r)
            assert r["spill_bytes"] == 0 and r["registers"] <= 255, (vertical_pass, name, r)
            if vertical_pass == "ring" and name == "stats":
                pipes = bench["by_pipe"](bench["row_loop"](r["cubin"]))
                # one row per trip: the window's 11 values of x and of y, 5 x 11 products
                assert pipes["ld/st"] >= 2 * 11 and pipes["fp32"] >= 5 * 11, pipes


@pytest.mark.slow
@pytest.mark.skipif(not _has_ptxas(), reason="needs Triton with its NVIDIA backend (bundled ptxas)")
def test_launch_path_for_h100():
    """
    The fused loss's forward and backward go through Triton's JIT launch path for sm_90
    (binding, specialisation, compilation, launcher arguments), with a driver that
    records launches instead of running them (``tests/losses/sm90_launch_check.py``).
    """
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    check = os.path.join(os.path.dirname(__file__), "sm90_launch_check.py")
    proc = subprocess.run(
        [sys.executable, check], env=env, capture_output=True, text=True, timeout=1200
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    launches = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [launch["kernel"] for launch in launches] == [
        "_ssim_stats_unrolled_kernel",
        "_ssim_stats_unrolled_kernel",
        "_ssim_grad_unrolled_kernel",
        "_minmax_grad_fixup_kernel",
    ]
    for launch in launches[:3]:
        assert launch["num_warps"] == ssim_triton.NUM_WARPS, launch
        assert launch["spill_bytes"] == 0 and launch["registers"] <= 255, launch


@pytest.mark.slow
@pytest.mark.skipif(not _has_ptxas(), reason="needs Triton with its NVIDIA backend")
def test_one_compilation_per_window_over_training_sizes():
    """
    Over the FPN levels of Detectron2's training image sizes (110 level shapes), each
    kernel is compiled once per window shape (and direction), not per pattern of sizes
    divisible by 16 or pointer alignments (101 compilations before ``SIZE_ARGS``).  Counted
    from Triton's compile keys on the sm_90 driver of ``tests/losses/sm90_launch_check.py``;
    nothing is compiled.
    """
    import json

    from kd_det.losses.ssim import effective_window_sizes

    sys.path.insert(0, os.path.dirname(__file__))
    from sm90_launch_check import training_level_sizes

    windows = {effective_window_sizes(h, w, 11) for h, w in training_level_sizes()}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(os.path.dirname(__file__), "sm90_launch_check.py"),
            "--compilations",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])["compilations"]
    stats, grad = "_ssim_stats_unrolled_kernel", "_ssim_grad_unrolled_kernel"
    # the statistics kernel runs forward and (BACKWARD) in the backward
    assert counts == {
        stats: 2 * len(windows),
        grad: len(windows),
        "_minmax_grad_fixup_kernel": 1,
    }, counts


def test_selection_on_cpu(monkeypatch):
    x = torch.rand(1, 2, 16, 16)
    with pytest.raises(RuntimeError, match="IMPL='triton' needs CUDA"):
        SSIMFeatureLoss(impl="triton")([x], [x])
    # even where the kernel is available, CPU tensors take the PyTorch path
    monkeypatch.setattr(ssim_triton, "is_available", lambda: True)
    monkeypatch.setattr(
        ssim_triton, "fused_ssim_feature_loss", lambda *a: pytest.fail("fused path on CPU")
    )
    auto = SSIMFeatureLoss(impl="auto")([x], [x.flip(-1)])
    # the same PyTorch operations on the same inputs in one process: equal bit for bit
    assert torch.equal(auto, SSIMFeatureLoss(impl="torch")([x], [x.flip(-1)]))
    with pytest.raises(ValueError, match="KD.SSIM.IMPL"):
        SSIMFeatureLoss(impl="cuda")

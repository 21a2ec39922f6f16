"""
The fused SSIM loss equals the PyTorch path, in value and gradient.

The kernel tests run on CUDA where there is a GPU, and on CPU tensors under Triton's
interpreter (``TRITON_INTERPRET=1``, which must be set before Triton compiles
anything): on a CPU-only machine ``test_kernels_in_triton_interpreter`` reruns this
file that way in a subprocess, with small shapes and small blocks so that they still
span several column strips and row chunks.
"""

import os
import subprocess
import sys

import pytest
import torch

from interpreter_bounds import checked_accesses
from kd_det.losses import SSIMFeatureLoss, ssim_map
from kd_det.losses import ssim_triton
from kd_det.losses.ssim import minmax_normalize

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
            ssim_triton.triton.__version__, numpy.__version__)
    return ""


INTERPRETER_BROKEN = _interpreter_broken()
if INTERPRETED and INTERPRETER_BROKEN:
    DEVICE, INTERPRETED = None, False
needs_kernel = pytest.mark.skipif(DEVICE is None, reason="needs CUDA, or Triton's interpreter (TRITON_INTERPRET=1)"
                                  + ("; " + INTERPRETER_BROKEN if INTERPRETER_BROKEN else ""))
needs_gpu = pytest.mark.skipif(not ssim_triton.is_available(), reason="needs CUDA and Triton")

# FPN-like pyramids with levels smaller than the 11x11 window
if INTERPRETED:
    LEVEL_SHAPES = [(1, 1, 30, 28), (1, 1, 14, 22), (1, 2, 6, 10), (1, 1, 3, 5), (1, 2, 1, 1), (1, 1, 12, 3)]
else:
    LEVEL_SHAPES = [(2, 8, 96, 160), (2, 8, 48, 80), (2, 8, 24, 40), (2, 8, 12, 20), (2, 8, 6, 10), (2, 8, 3, 5),
                    (2, 8, 1, 1)]


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


@pytest.fixture(params=list(ssim_triton.VERTICAL_PASSES))
def vertical_pass(request, monkeypatch):
    """Each kernel test runs with every vertical pass (see ssim_triton.VERTICAL_PASS)."""
    monkeypatch.setattr(ssim_triton, "VERTICAL_PASS", request.param)
    return request.param


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


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
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size[0]), torch.linspace(-1, 1, size[1]), indexing="ij")
    image = torch.stack([torch.sin(8 * xx), torch.cos(5 * yy), xx * yy]).mul(60).unsqueeze(0).to(DEVICE)
    with torch.no_grad():
        s = backbone(image)
        t = backbone(image + 20 * torch.randn_like(image))
    return list(s.values()), list(t.values())


@pytest.mark.skipif(not INTERPRETED, reason="checks the interpreter's bounds check (TRITON_INTERPRET=1)")
def test_fused_tests_catch_out_of_bounds_accesses(bounds_checked):
    """The bounds check that the interpreted kernel tests run under fails on a planted over-read and over-write."""
    triton, tl = ssim_triton.triton, ssim_triton.tl

    @triton.jit
    def copy_kernel(src, dst, n, MASK_LOAD: tl.constexpr, MASK_STORE: tl.constexpr, BLOCK: tl.constexpr):
        offsets = tl.arange(0, BLOCK)
        inside = offsets < n
        values = tl.load(src + offsets, mask=inside if MASK_LOAD else None)
        tl.store(dst + offsets, values, mask=inside if MASK_STORE else None)

    src, dst = torch.arange(10.0), torch.zeros(10)
    copy_kernel[(1,)](src, dst, 10, MASK_LOAD=True, MASK_STORE=True, BLOCK=16)
    assert torch.equal(dst, src) and bounds_checked.accesses == 20
    for mask_load, mask_store, what in [(False, True, "load of 6 lanes"), (True, False, "store of 6 lanes")]:
        with pytest.raises(Exception, match=what + " outside every tensor argument"):
            copy_kernel[(1,)](src, dst, 10, MASK_LOAD=mask_load, MASK_STORE=mask_store, BLOCK=16)


@needs_kernel
@pytest.mark.parametrize("shape", LEVEL_SHAPES)
def test_fused_mean_and_grad_equal_torch(shape, vertical_pass):
    g = torch.Generator(device=DEVICE).manual_seed(0)
    x = torch.rand(shape, device=DEVICE, generator=g).requires_grad_()
    y = (0.5 * x.detach() + 0.5 * torch.rand(shape, device=DEVICE, generator=g))
    ref = ssim_map(x, y).mean()
    (ref_grad,) = torch.autograd.grad(ref, x)
    fused = ssim_triton.fused_ssim_mean(x, y)
    (fused_grad,) = torch.autograd.grad(fused, x)
    assert abs(fused.item() - ref.item()) <= 1e-4 * abs(ref.item())
    if shape[-2:] == (1, 1):
        # one-pixel maps: the gradient is a difference of terms ~1/C2 = 1e3 times larger than
        # itself, so any fp32 evaluation is off by ~1e-4 (seen: PyTorch path 4e-5..3e-4 from
        # float64); compare both with float64 there
        x64 = x.detach().double().requires_grad_()
        (ref_grad,) = torch.autograd.grad(ssim_map(x64, y.double()).mean(), x64)
        assert _rel(fused_grad.double(), ref_grad) < 1e-3
    else:
        assert _rel(fused_grad, ref_grad) < 1e-4


@needs_kernel
def test_fused_minmax_normalisation_equals_torch(monkeypatch, vertical_pass):
    """Min-max rescaling inside the kernel: ties at the minimum, a constant map, a map far from 0."""
    g = torch.Generator(device=DEVICE).manual_seed(1)
    shape = (1, 3, 22, 28) if INTERPRETED else (2, 15, 60, 90)
    # backward over chunks of a few planes, the last one shorter (its zero row then lies in
    # the derivative maps' data rows, which the chunk before wrote): 3 = 2 + 1, 30 = 7 * 4 + 2
    chunk_planes = 2 if INTERPRETED else 4
    ho, wo = shape[2] - 10, shape[3] - 10
    monkeypatch.setattr(ssim_triton, "BACKWARD_CHUNK_BYTES", chunk_planes * 3 * 4 * ho * (wo + 2 * 10))
    x = torch.randn(shape, device=DEVICE, generator=g)
    x[0, 1] = 0.25  # constant: the range is clamped, every position is both min and max
    x[0, 2] += 40.0  # an offset of ~6 ranges: the kernel shifts each value, then scales the sums
    x[0, 0, 0, :3] = x[0, 0].min() - 1.0  # three positions share the minimum
    x[0, 2, 5, 7] = x[0, 2].max() + 2.0
    x.requires_grad_()
    y = 3.0 * x.detach() + torch.randn(shape, device=DEVICE, generator=g)
    ref = ssim_map(minmax_normalize(x), minmax_normalize(y), c1=0.01**2, c2=0.03**2).mean()
    (ref_grad,) = torch.autograd.grad(ref, x)
    fused = ssim_triton.fused_ssim_mean(x, y, normalize=True)
    (fused_grad,) = torch.autograd.grad(fused, x)
    assert abs(fused.item() - ref.item()) <= 1e-4 * abs(ref.item())
    # per plane: the constant plane's gradient (its range clamped to eps) is ~1e6 times the others'
    for i in range(shape[1]):
        assert _rel(fused_grad[:, i], ref_grad[:, i]) < 1e-4, i
    # the tied minimum's positions, where torch.amin shares its gradient equally
    assert torch.allclose(fused_grad[0, 0, 0, :3], ref_grad[0, 0, 0, :3], rtol=1e-4, atol=1e-9)


@needs_kernel
def test_fused_half_precision_student(vertical_pass):
    """A float16 student (AMP training) beside a float32 teacher: fp32 inside, the gradient in float16."""
    g = torch.Generator(device=DEVICE).manual_seed(3)
    shape = (1, 2, 19, 23) if INTERPRETED else (2, 8, 60, 90)
    x = torch.randn(shape, device=DEVICE, generator=g).half().requires_grad_()
    y = 2.0 * x.detach().float() + torch.randn(shape, device=DEVICE, generator=g)
    x32 = x.detach().float().requires_grad_()
    ref = ssim_map(minmax_normalize(x32), minmax_normalize(y), c1=0.01**2, c2=0.03**2).mean()
    (ref_grad,) = torch.autograd.grad(ref, x32)
    fused = ssim_triton.fused_ssim_mean(x, y, normalize=True)
    (fused_grad,) = torch.autograd.grad(fused, x)
    assert fused.dtype == torch.float16 and fused_grad.dtype == torch.float16
    # the kernel reads the float16 values exactly and computes in fp32: only the outputs' rounding differs
    assert abs(fused.item() - ref.item()) <= 1e-3 * abs(ref.item())
    assert _rel(fused_grad.float(), ref_grad) < 2e-3


@needs_kernel
@pytest.mark.parametrize("normalize", ["minmax", "none"])
def test_fused_feature_loss_on_fpn_features(monkeypatch, normalize, vertical_pass):
    if INTERPRETED:  # the interpreter's time goes with the number of programs
        monkeypatch.setattr(ssim_triton, "BLOCK_W", 32)
        monkeypatch.setattr(ssim_triton, "ROWS_PER_PROGRAM", 32)
    student, teacher = _fpn_features()
    student = [s.clone().requires_grad_() for s in student]
    torch_loss = SSIMFeatureLoss(normalize=normalize, impl="torch")(student, teacher)
    torch_grads = torch.autograd.grad(torch_loss, student)
    fused_loss = sum(ssim_triton.fused_ssim_feature_loss(s, t, 11, 1.5, 0.01, 0.03, normalize)
                     for s, t in zip(student, teacher)) / len(student)
    fused_grads = torch.autograd.grad(fused_loss, student)
    assert abs(fused_loss.item() - torch_loss.item()) <= 1e-4 * abs(torch_loss.item())
    for a, b in zip(fused_grads, torch_grads):
        assert _rel(a, b) < 1e-4


@needs_kernel
def test_fused_non_contiguous_inputs(vertical_pass):
    """A channels-last student (KD.TEACHER.CHANNELS_LAST teachers give such features) and a transposed teacher."""
    g = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.rand(1, 2, 14, 19, device=DEVICE, generator=g).to(memory_format=torch.channels_last).requires_grad_()
    y = 0.5 * x.detach() + 0.5 * torch.rand(1, 2, 19, 14, device=DEVICE, generator=g).transpose(-1, -2)
    assert not x.is_contiguous() and not y.is_contiguous()
    ref = ssim_map(minmax_normalize(x), minmax_normalize(y)).mean()
    (ref_grad,) = torch.autograd.grad(ref, x)
    fused = ssim_triton.fused_ssim_mean(x, y, normalize=True)
    (fused_grad,) = torch.autograd.grad(fused, x)
    assert abs(fused.item() - ref.item()) <= 1e-4 * abs(ref.item())
    assert fused_grad.shape == x.shape and _rel(fused_grad, ref_grad) < 1e-4


@needs_kernel
def test_fused_kernel_rejects_bad_input(monkeypatch):
    x = torch.rand(1, 2, 8, 8, device=DEVICE)
    with pytest.raises(ValueError, match="windows up to"):
        ssim_triton.fused_ssim_mean(x, x, window_size=17)
    with pytest.raises(ValueError, match="one shape"):
        ssim_triton.fused_ssim_mean(x, x[:, :1])
    monkeypatch.setattr(ssim_triton, "VERTICAL_PASS", "rows")
    with pytest.raises(ValueError, match="VERTICAL_PASS"):
        ssim_triton.fused_ssim_mean(x, x)


@needs_kernel
def test_fused_backward_uses_the_forward_config(monkeypatch, vertical_pass):
    """Tuning constants changed between forward and backward (benchmarks do) do not mix passes."""
    g = torch.Generator(device=DEVICE).manual_seed(2)
    x = torch.rand((1, 1, 14, 13), device=DEVICE, generator=g).requires_grad_()
    y = torch.rand((1, 1, 14, 13), device=DEVICE, generator=g)
    (ref_grad,) = torch.autograd.grad(ssim_map(x, y).mean(), x)
    fused = ssim_triton.fused_ssim_mean(x, y)
    monkeypatch.setattr(ssim_triton, "VERTICAL_PASS", "unknown")
    (fused_grad,) = torch.autograd.grad(fused, x)
    assert _rel(fused_grad, ref_grad) < 1e-4


@needs_gpu
def test_auto_picks_the_kernel_on_cuda(monkeypatch):
    calls = []
    real = ssim_triton.fused_ssim_feature_loss
    monkeypatch.setattr(ssim_triton, "fused_ssim_feature_loss", lambda *a: calls.append(1) or real(*a))
    x = torch.rand(1, 2, 16, 16, device="cuda")
    SSIMFeatureLoss(impl="auto")([x], [x.flip(-1)])
    assert calls


@pytest.mark.skipif(DEVICE is not None or bool(INTERPRETER_BROKEN),
                    reason="the kernel tests run directly here" if DEVICE else INTERPRETER_BROKEN)
def test_kernels_in_triton_interpreter(tmp_path):
    """
    On a CPU-only machine: the kernel tests above, on CPU tensors, by Triton's interpreter.
    Two processes at once, each with half of the tests (the "unrolled" vertical pass takes
    about half of the interpreter's time): the test process only waits, so a 2-core
    machine runs them in half the time.
    """
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    runs = []
    for k, selection in enumerate(["fused and unrolled", "fused and not unrolled"]):
        log = open(tmp_path / "interpreted{}.log".format(k), "w+")
        proc = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__,
                                 "-k", selection], env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
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
        assert " passed" in last and "skipped" not in last and "deselected" in last, selection + ":\n" + out[-2000:]


def _has_ptxas():
    if ssim_triton.triton is None:
        return False
    return os.path.isfile(os.path.join(os.path.dirname(ssim_triton.triton.__file__), "backends", "nvidia", "bin",
                                       "ptxas"))


@pytest.mark.skipif(not _has_ptxas(), reason="needs Triton with its NVIDIA backend (bundled ptxas)")
def test_kernels_compile_for_h100():
    """
    The other vertical passes compile for sm_90 without a GPU, within its shared memory
    and without spilling registers; the instruction count of the row loops (``--sass``)
    parses.  The default pass is compiled, and checked the same way, by
    :func:`test_launch_path_for_h100`.
    """
    import runpy

    from conftest import REPO

    bench = runpy.run_path(os.path.join(REPO, "benchmarks", "ssim_kernel_resources.py"))
    settings = [("ring", ssim_triton.BLOCK_W, ssim_triton.NUM_WARPS, None),
                ("band", 32, 4, ssim_triton.BAND_NUM_STAGES)]
    for vertical_pass, block_w, warps, stages in settings:
        for name, fn, constexprs in bench["kernels_of"](vertical_pass, block_w, ssim_triton.ROWS_PER_PROGRAM, "ieee"):
            r = bench["compile_kernel"](fn, constexprs, warps, stages, 90)
            assert r["shared_bytes"] <= bench["SHARED_LIMIT"], (vertical_pass, name, r)
            assert r["spill_bytes"] == 0 and r["registers"] <= 255, (vertical_pass, name, r)
            if vertical_pass == "ring" and name == "stats":
                pipes = bench["by_pipe"](bench["row_loop"](r["cubin"]))
                # one row per trip: the window's 11 values of x and of y, 5 x 11 products
                assert pipes["ld/st"] >= 2 * 11 and pipes["fp32"] >= 5 * 11, pipes


@pytest.mark.skipif(not _has_ptxas(), reason="needs Triton with its NVIDIA backend (bundled ptxas)")
def test_launch_path_for_h100():
    """
    The default pass's forward and backward go through Triton's JIT launch path for sm_90
    (binding, specialisation, compilation, launcher arguments), with a driver that
    records launches instead of running them (``tests/sm90_launch_check.py``).
    """
    import json

    if ssim_triton.VERTICAL_PASS != "unrolled":
        pytest.skip("checks the default pass, unrolled")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "sm90_launch_check.py"),
                           ssim_triton.VERTICAL_PASS], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    launches = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [launch["kernel"] for launch in launches] == [
        "_ssim_stats_unrolled_kernel", "_ssim_stats_unrolled_kernel", "_ssim_grad_unrolled_kernel",
        "_minmax_grad_fixup_kernel"]
    for launch in launches[:3]:
        assert launch["num_warps"] == ssim_triton.NUM_WARPS, launch
        assert launch["spill_bytes"] == 0 and launch["registers"] <= 255, launch


@pytest.mark.skipif(not _has_ptxas(), reason="needs Triton with its NVIDIA backend")
def test_one_compilation_per_window_over_training_sizes():
    """
    Over the FPN levels of Detectron2's training image sizes (110 level shapes), each
    kernel is compiled once per window shape (and direction), not per pattern of sizes
    divisible by 16 or pointer alignments (101 compilations before ``SIZE_ARGS``).  Counted
    from Triton's compile keys on the sm_90 driver of ``tests/sm90_launch_check.py``;
    nothing is compiled.
    """
    import json

    from kd_det.losses.ssim import effective_window_sizes

    sys.path.insert(0, os.path.dirname(__file__))
    from sm90_launch_check import training_level_sizes

    windows = {effective_window_sizes(h, w, 11) for h, w in training_level_sizes()}
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__), "sm90_launch_check.py"),
                           "--compilations", ssim_triton.VERTICAL_PASS], env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    counts = json.loads(proc.stdout.strip().splitlines()[-1])["compilations"]
    stats, grad = {"unrolled": ("_ssim_stats_unrolled_kernel", "_ssim_grad_unrolled_kernel"),
                   "band": ("_ssim_stats_band_kernel", "_ssim_grad_band_kernel"),
                   "ring": ("_ssim_stats_kernel", "_ssim_grad_kernel")}[ssim_triton.VERTICAL_PASS]
    # the statistics kernel runs forward and (BACKWARD) in the backward
    assert counts == {stats: 2 * len(windows), grad: len(windows), "_minmax_grad_fixup_kernel": 1}, counts


def test_selection_on_cpu(monkeypatch):
    x = torch.rand(1, 2, 16, 16)
    with pytest.raises(RuntimeError, match="IMPL='triton' needs CUDA"):
        SSIMFeatureLoss(impl="triton")([x], [x])
    # even where the kernel is available, CPU tensors take the PyTorch path
    monkeypatch.setattr(ssim_triton, "is_available", lambda: True)
    monkeypatch.setattr(ssim_triton, "fused_ssim_feature_loss", lambda *a: pytest.fail("fused path on CPU"))
    auto = SSIMFeatureLoss(impl="auto")([x], [x.flip(-1)])
    assert torch.allclose(auto, SSIMFeatureLoss(impl="torch")([x], [x.flip(-1)]))
    with pytest.raises(ValueError, match="KD.SSIM.IMPL"):
        SSIMFeatureLoss(impl="cuda")

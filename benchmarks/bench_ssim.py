#!/usr/bin/env python
"""
SSIM over an FPN pyramid, forward + backward (student requires grad), against peers.

    python benchmarks/bench_ssim.py                      # GPU, batch 8, 256 ch, P2-P6 of 800x1344
    python benchmarks/bench_ssim.py --device cpu --shape small
    python benchmarks/bench_ssim.py --json out.json

Implementations, all on the same tensors (values in [0, 1], 11x11 Gaussian window,
sigma 1.5, K = (0.01, 0.03), data range 1, valid window):
  kd_det-fused   kd_det.losses.ssim_triton.fused_ssim_mean (Triton, CUDA only), its
                 vertical pass ("unrolled"); kd_det-fused[ring/ieee], [band/ieee],
                 [band/tf32x3] the other passes (ssim_vertical_variants.py)
  kd_det-torch   kd_det.losses.ssim_map(...).mean() (separable grouped conv)
  pytorch-msssim pytorch_msssim.ssim (benchmark extra: pip install -e .[bench])
  kornia         kornia.metrics.ssim(padding="valid")
Reports the median time of forward+backward over the pyramid, the peak memory above
the inputs (CUDA), each value's relative difference to kd_det-torch, and each time
against the bandwidth floor: reading student and teacher once and writing the gradient
once, at the bandwidth of a device-to-device copy measured here.  Also the
whole SSIMFeatureLoss (min-max normalisation included: PyTorch ops for IMPL torch,
inside the kernels for IMPL triton).
"""

import argparse
import json
import platform
import statistics
import time

import ssim_vertical_variants as variants  # beside this script
import torch

from kd_det.losses import SSIMFeatureLoss, ssim_map, ssim_triton

SHAPES = {
    # P2-P6 of an 800x1344 input
    "fpn800": [
        (8, 256, 200, 336),
        (8, 256, 100, 168),
        (8, 256, 50, 84),
        (8, 256, 25, 42),
        (8, 256, 13, 21),
    ],
    # every level at least as large as the window: kornia and pytorch-msssim need it
    "small": [(2, 64, 96, 128), (2, 64, 48, 64), (2, 64, 24, 32), (2, 64, 12, 16)],
}


def fused_variant(vertical_pass, precision, num_warps):
    """fused_ssim_mean with the given vertical pass, dot precision and warps (restored
    afterwards)."""

    def fn(x, y):
        saved = ssim_triton.NUM_WARPS
        ssim_triton.NUM_WARPS = num_warps
        try:
            with variants.vertical_pass(vertical_pass, precision):
                return ssim_triton.fused_ssim_mean(x, y)
        finally:
            ssim_triton.NUM_WARPS = saved

    return fn


def peers():
    out = {"kd_det-torch": lambda x, y: ssim_map(x, y).mean()}
    if ssim_triton.is_available():
        out["kd_det-fused"] = lambda x, y: ssim_triton.fused_ssim_mean(x, y)
        # the band pass spills registers with fewer than 4 warps (ssim_kernel_resources.py)
        for vertical_pass, precision, warps in [
            ("ring", "ieee", ssim_triton.NUM_WARPS),
            ("band", "ieee", 4),
            ("band", "tf32x3", 4),
        ]:
            out["kd_det-fused[{}/{}]".format(vertical_pass, precision)] = fused_variant(
                vertical_pass, precision, warps
            )
    try:
        from pytorch_msssim import ssim as msssim

        out["pytorch-msssim"] = lambda x, y: msssim(x, y, data_range=1.0, size_average=True)
    except ImportError:
        print("pytorch-msssim not installed (pip install -e .[bench]); skipped")
    try:
        import kornia

        out["kornia"] = lambda x, y: kornia.metrics.ssim(
            x, y, 11, max_val=1.0, padding="valid"
        ).mean()
    except ImportError:
        print("kornia not installed (pip install -e .[bench]); skipped")
    return out


def _sync(device):
    if device == "cuda":
        torch.cuda.synchronize()


def measure(fn, student, teacher, device, reps):
    """median seconds and peak extra bytes of fn over all levels, forward + backward."""

    def step():
        total = sum(fn(s, t) for s, t in zip(student, teacher))
        total.backward()
        for s in student:
            s.grad = None
        return total

    value = step().item()  # warm-up (compilation, autotuning)
    step()
    _sync(device)
    times = []
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        _sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() - base if device == "cuda" else float("nan")
    return statistics.median(times), peak, value


def copy_bandwidth(device, nbytes, reps=10):
    """Bytes per second moved (read + written) by a large tensor copy on ``device``: median of
    ``reps``."""
    src = torch.rand(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return 2 * nbytes / statistics.median(times)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--shape", choices=sorted(SHAPES), default=None)
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    shape = args.shape or ("fpn800" if args.device == "cuda" else "small")
    g = torch.Generator(device=args.device).manual_seed(0)
    student = [
        torch.rand(s, device=args.device, generator=g).requires_grad_() for s in SHAPES[shape]
    ]
    teacher = [
        (0.5 * s.detach() + 0.5 * torch.rand(s.shape, device=args.device, generator=g))
        for s in student
    ]
    data_bytes = sum(s.numel() for s in student) * 4

    rows = []
    impls = peers()
    for name, fn in impls.items():
        seconds, peak, value = measure(fn, student, teacher, args.device, args.reps)
        rows.append(
            {"impl": name, "ms": seconds * 1e3, "peak_extra_GiB": peak / 2**30, "value": value}
        )
    ref = next(r["value"] for r in rows if r["impl"] == "kd_det-torch")
    for r in rows:
        r["rel_diff"] = abs(r["value"] - ref) / abs(ref)

    # the whole distillation loss (min-max normalisation, (1 - SSIM) / 2, mean over levels)
    for impl in ["torch"] + (["triton"] if ssim_triton.is_available() else []):
        loss = SSIMFeatureLoss(impl=impl)
        seconds, peak, value = measure(
            lambda s, t: loss([s], [t]), student, teacher, args.device, args.reps
        )
        rows.append(
            {
                "impl": "SSIMFeatureLoss[{}]".format(impl),
                "ms": seconds * 1e3,
                "peak_extra_GiB": peak / 2**30,
                "value": value,
                "rel_diff": float("nan"),
            }
        )

    # the floor: student and teacher read once, the gradient written once, at copy bandwidth
    bandwidth = copy_bandwidth(args.device, min(data_bytes, 2**30))
    floor_ms = 3 * data_bytes / bandwidth * 1e3
    for r in rows:
        r["x_floor"] = r["ms"] / floor_ms

    device_name = (
        torch.cuda.get_device_name() if args.device == "cuda" else platform.processor() or "cpu"
    )
    print(
        "SSIM forward+backward, shape {} {} on {} (torch {})".format(
            shape, SHAPES[shape], device_name, torch.__version__
        )
    )
    print(
        "feature data: {:.2f} GB per tensor "
        "(student, teacher, gradient: {:.2f} GB moved at least)".format(
            data_bytes / 1e9, 3 * data_bytes / 1e9
        )
    )
    print("copy bandwidth {:.0f} GB/s: bandwidth floor {:.2f} ms".format(bandwidth / 1e9, floor_ms))
    print(
        "{:<24} {:>10} {:>9} {:>16} {:>14}".format(
            "implementation", "ms", "x floor", "peak extra GiB", "rel diff"
        )
    )
    for r in rows:
        print(
            "{:<24} {:>10.2f} {:>9.1f} {:>16.3f} {:>14.2e}".format(
                r["impl"], r["ms"], r["x_floor"], r["peak_extra_GiB"], r["rel_diff"]
            )
        )
    result = {
        "shape": shape,
        "levels": SHAPES[shape],
        "device": device_name,
        "torch": torch.__version__,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "floor_ms": floor_ms,
        "rows": rows,
    }
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

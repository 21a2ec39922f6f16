#!/usr/bin/env python
"""
Where the fused SSIM loss spends its time on the GPU: CUDA time per kernel (torch.profiler)
over forward + backward of the FPN pyramid of ``bench_ssim.py``, plain and with the
min-max normalisation of SSIMFeatureLoss.

    python benchmarks/profile_ssim_triton.py                    # per-kernel table
    python benchmarks/profile_ssim_triton.py --json prof.json
    ncu --kernel-name regex:_ssim_ --launch-count 3 --section SpeedOfLight --section Occupancy \\
        --section WarpStateStats python benchmarks/profile_ssim_triton.py --once --levels 0
        # one forward + backward of P2 alone, for Nsight Compute's counters

Kernel times are summed over the ``--reps`` profiled iterations and divided by them: ms per
forward + backward.  Everything else (allocation, min/max, sums) shows under its own
PyTorch kernel names.  Then, for each ``--chunk-mb`` (the backward's derivative maps per
launch, ``ssim_triton.BACKWARD_CHUNK_BYTES``): the wall time of a forward + backward (as
``bench_ssim.py`` measures it), the host time to enqueue it (returning before the device
is done: where it is close to the wall time, launches, not kernels, set the pace) and the
peak memory above the inputs.
"""

import argparse
import json
import statistics
import time
from collections import defaultdict

import torch

from kd_det.losses import ssim_triton

SHAPES = [
    (8, 256, 200, 336),
    (8, 256, 100, 168),
    (8, 256, 50, 84),
    (8, 256, 25, 42),
    (8, 256, 13, 21),
]


def kernel_times(fn, reps):
    """{kernel name: ms per call of fn}, from the CUDA activity of ``reps`` calls."""
    from torch.profiler import ProfilerActivity, profile

    fn()  # compile outside the trace
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    times = defaultdict(float)
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            times[event.name] += event.device_time / 1e3 / reps
    return dict(times)


def host_and_wall(fn, reps=10):
    """Median wall ms of fn() to the device's end, median host ms until fn() returns, peak GiB."""
    fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    wall, host = [], []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        torch.cuda.synchronize()
        host.append((t1 - t0) * 1e3)
        wall.append((time.perf_counter() - t0) * 1e3)
    return {
        "wall_ms": statistics.median(wall),
        "host_ms": statistics.median(host),
        "peak_gib": (torch.cuda.max_memory_allocated() - base) / 2**30,
    }


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--levels", type=int, nargs="+", default=list(range(len(SHAPES))))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--once", action="store_true", help="one plain forward + backward, no profiler (for ncu)"
    )
    parser.add_argument("--chunk-mb", type=int, nargs="*", default=[256, 512, 1024])
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if not ssim_triton.is_available():
        raise SystemExit("the profile needs CUDA and Triton")
    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.rand(SHAPES[i], device="cuda", generator=g).requires_grad_() for i in args.levels]
    ys = [(0.5 * x.detach() + 0.5 * torch.rand(x.shape, device="cuda", generator=g)) for x in xs]

    def step(normalize):
        total = sum(ssim_triton.fused_ssim_mean(x, y, normalize=normalize) for x, y in zip(xs, ys))
        total.backward()
        for x in xs:
            x.grad = None

    if args.once:
        step(False)
        torch.cuda.synchronize()
        return {}
    result = {"device": torch.cuda.get_device_name(), "levels": [SHAPES[i] for i in args.levels]}
    for normalize in (False, True):
        times = kernel_times(lambda: step(normalize), args.reps)
        label = "min-max normalised" if normalize else "plain"
        print("{}: {:.2f} ms of kernels per forward + backward".format(label, sum(times.values())))
        for name, ms in sorted(times.items(), key=lambda kv: -kv[1]):
            print("  {:8.3f} ms  {}".format(ms, name[:110]))
        result[label] = times
    result["chunks"] = {}
    default_chunk = ssim_triton.BACKWARD_CHUNK_BYTES
    for mb in args.chunk_mb:
        ssim_triton.BACKWARD_CHUNK_BYTES = mb * 2**20
        try:
            for normalize in (False, True):
                row = host_and_wall(lambda: step(normalize))
                label = "{} MB chunks, {}".format(mb, "min-max" if normalize else "plain")
                print(
                    "{:<28} wall {wall_ms:6.2f} ms  host enqueue {host_ms:6.2f} ms  peak extra "
                    "{peak_gib:.3f} GiB".format(label, **row)
                )
                result["chunks"][label] = row
        finally:
            ssim_triton.BACKWARD_CHUNK_BYTES = default_chunk
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""
Tuning sweep of the fused SSIM kernel (GPU): vertical pass ("unrolled", kd_det's own;
"band" and "ring" of ssim_vertical_variants.py), block sizes, warps, for the "unrolled"
pass its rows per loop trip (fewer: a shorter loop for the instruction cache, more
register moves between trips) and, for the "band" pass, the precision of its tl.dot
products.
Forward and forward + backward are timed apart, the latter also with the min-max
normalisation of SSIMFeatureLoss.

    python benchmarks/sweep_ssim_triton.py                     # the default grid
    python benchmarks/sweep_ssim_triton.py --passes band --block-w 64 --rows 128 --band-warps 4 8

Shape: batch 8, 256 channels, P2-P6 of an 800x1344 input (issue 9).  Every
configuration is also checked against the PyTorch path on P4 (relative difference of
value and gradient), so a fast but inexact setting (tf32 products) shows as such.
Stops starting new configurations after ``--budget-s`` seconds (the device tool allows
10 minutes a command); prints one line per configuration and writes ``--json``.
"""

import argparse
import itertools
import json
import time

import ssim_vertical_variants as variants  # beside this script
import torch

from kd_det.losses import ssim_map, ssim_triton
from kd_det.losses.ssim import minmax_normalize

SHAPES = [
    (8, 256, 200, 336),
    (8, 256, 100, 168),
    (8, 256, 50, 84),
    (8, 256, 25, 42),
    (8, 256, 13, 21),
]
CHECK_LEVEL = 2  # P4: several programs per plane, cheap reference


def bench(fn, reps=5):
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def configurations(args):
    """The grid, narrowest strips and fewest warps first across passes: each configuration
    compiles six kernels (seconds each), and what ``--budget-s`` leaves out is then the
    wide strips, which the instruction counts (ssim_kernel_resources.py --sass) rank last."""
    grid = list(_grid(args))
    return sorted(grid, key=lambda c: (c[2], c[4]))  # stable: the passes' order within


def _grid(args):
    for vp in args.passes:
        precisions = args.precisions if vp == "band" else ["-"]
        warps_list = args.band_warps if vp == "band" else args.warps
        unrolls = args.row_unroll if vp == "unrolled" else [0]
        for unroll, bw, rows, warps, prec in itertools.product(
            unrolls, args.block_w, args.rows, warps_list, precisions
        ):
            if vp == "band" and bw < variants.TILE_ROWS:
                continue  # tl.dot takes 16 columns at least
            if vp != "band" and bw < 32 * warps:
                continue  # fewer columns than threads: replicated work
            yield vp, unroll, bw, rows, warps, prec


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--passes", nargs="+", default=["unrolled", "band", "ring"], choices=list(variants.PASSES)
    )
    parser.add_argument("--block-w", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--rows", nargs="+", type=int, default=[128])
    parser.add_argument(
        "--warps", nargs="+", type=int, default=[1, 2, 4, 8], help="of the ring and unrolled passes"
    )
    # compiled for sm_90 (benchmarks/ssim_kernel_resources.py) the band kernels spill
    # registers with 1 or 2 warps at every BLOCK_W
    parser.add_argument("--band-warps", nargs="+", type=int, default=[4, 8])
    parser.add_argument(
        "--row-unroll",
        nargs="+",
        type=int,
        default=[ssim_triton.ROW_UNROLL, 2],
        help="rows per loop trip of the unrolled pass (0: the window height)",
    )
    parser.add_argument(
        "--precisions", nargs="+", default=["ieee", "tf32x3"], choices=["ieee", "tf32x3", "tf32"]
    )
    parser.add_argument("--budget-s", type=float, default=480.0)
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if not ssim_triton.is_available():
        raise SystemExit("the sweep needs CUDA and Triton")

    g = torch.Generator(device="cuda").manual_seed(0)
    xs = [torch.rand(s, device="cuda", generator=g).requires_grad_() for s in SHAPES]
    ys = [(0.5 * x.detach() + 0.5 * torch.rand(x.shape, device="cuda", generator=g)) for x in xs]
    # reference on one level: value and gradient of the PyTorch path, plain and min-max normalised
    xc, yc = xs[CHECK_LEVEL], ys[CHECK_LEVEL]
    refs = {}
    for normalize in (False, True):
        a, b = (minmax_normalize(xc), minmax_normalize(yc)) if normalize else (xc, yc)
        value = ssim_map(a, b, c1=0.01**2, c2=0.03**2).mean()
        refs[normalize] = (value.detach(), torch.autograd.grad(value, xc)[0])

    results, started = [], time.time()
    for vp, unroll, bw, rows, warps, prec in configurations(args):
        if time.time() - started > args.budget_s:
            print(
                "budget of {:.0f} s spent; remaining configurations skipped".format(args.budget_s),
                flush=True,
            )
            break
        variants.use(vp, prec if prec != "-" else "ieee")
        ssim_triton.BLOCK_W, ssim_triton.ROWS_PER_PROGRAM, ssim_triton.NUM_WARPS = bw, rows, warps
        ssim_triton.ROW_UNROLL = unroll
        row = {
            "pass": vp,
            "row_unroll": unroll,
            "block_w": bw,
            "rows": rows,
            "warps": warps,
            "precision": prec,
        }
        try:
            errors = []
            for normalize in (False, True):
                value = ssim_triton.fused_ssim_mean(xc, yc, normalize=normalize)
                grad = torch.autograd.grad(value, xc)[0]
                ref_value, ref_grad = refs[normalize]
                errors.append(
                    max(
                        abs(value.item() - ref_value.item()) / abs(ref_value.item()),
                        ((grad - ref_grad).abs().max() / ref_grad.abs().max()).item(),
                    )
                )
            row["max_rel_diff"] = max(errors)
            row["forward_ms"] = bench(
                lambda: [ssim_triton.fused_ssim_mean(x, y) for x, y in zip(xs, ys)]
            )

            def both(normalize=False):
                total = sum(
                    ssim_triton.fused_ssim_mean(x, y, normalize=normalize) for x, y in zip(xs, ys)
                )
                total.backward()

            row["fwd_bwd_ms"] = bench(both)
            row["fwd_bwd_minmax_ms"] = bench(lambda: both(normalize=True))
        except (
            Exception
        ) as e:  # a configuration the compiler rejects (registers, shared memory) is a result too
            row["error"] = "{}: {}".format(
                type(e).__name__, str(e).splitlines()[0][:200] if str(e) else ""
            )
        results.append(row)
        label = (
            "{pass:8s} U {row_unroll:2d} BLOCK_W {block_w:4d} ROWS {rows:4d} "
            "warps {warps} {precision:6s}".format(**row)
        )
        if "error" in row:
            print("{}: {}".format(label, row["error"]), flush=True)
        else:
            print(
                "{}: forward {forward_ms:6.2f} ms  fwd+bwd {fwd_bwd_ms:6.2f} ms  with min-max"
                " {fwd_bwd_minmax_ms:6.2f}"
                " ms  max rel diff {max_rel_diff:.1e}".format(label, **row),
                flush=True,
            )
    ok = [r for r in results if "error" not in r and r["max_rel_diff"] < 1e-4]
    if ok:
        best = min(ok, key=lambda r: r["fwd_bwd_minmax_ms"])
        print("best within 1e-4 (fwd+bwd with min-max): {}".format(best), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "device": torch.cuda.get_device_name(),
                    "torch": torch.__version__,
                    "shapes": SHAPES,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""
Checks the issue-bound model of ``ssim_kernel_resources.py --sass`` against the only
H100 timings of the fused SSIM kernel (session of 2026-11-21, benchmarks/RESULTS.md):
the ring kernel as it was at commit c94ae13, without min-max normalisation.

    python benchmarks/ssim_sass_calibration.py

Reads that version of ``kd_det/losses/ssim_triton.py`` from git, compiles its kernels for
sm_90 at the measured settings and prints model time, measured time and their ratio.
"""

import importlib.util
import os
import subprocess
import tempfile

import ssim_kernel_resources as resources  # benchmarks/, this script's folder: first on sys.path

HERE = os.path.dirname(os.path.abspath(__file__))

COMMIT = "c94ae13"
# (BLOCK_W, rows per program, warps) -> measured ms on the H100: forward, forward + backward
MEASURED = {(32, 64, 1): (6.1, 20.4), (128, 64, 4): (None, 23.7)}


def old_module():
    source = subprocess.run(
        ["git", "show", COMMIT + ":kd_det/losses/ssim_triton.py"],
        cwd=HERE,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    path = os.path.join(tempfile.mkdtemp(), "ssim_triton_{}.py".format(COMMIT))
    with open(path, "w") as f:
        f.write(source)
    import kd_det.losses  # noqa: F401  (the old module imports .ssim from this package)

    spec = importlib.util.spec_from_file_location("kd_det.losses.ssim_triton_" + COMMIT, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def main():
    old = old_module()
    for (block_w, rows, warps), (fwd_ms, total_ms) in MEASURED.items():
        common = dict(KH=11, KW=11, RING=16, BLOCK_W=block_w, ROWS=rows)
        model = {}
        for name, fn, constexprs in [
            ("stats", old._ssim_stats_kernel, dict(common, BACKWARD=False)),
            ("stats-bwd", old._ssim_stats_kernel, dict(common, BACKWARD=True)),
            ("grad", old._ssim_grad_kernel, common),
        ]:
            r = resources.compile_kernel(fn, constexprs, warps, None, 90)
            pipes = resources.by_pipe(resources.row_loop(r["cubin"]))
            model[name] = resources.issue_bound_ms("ring", name, pipes, block_w, rows, warps)
        total = sum(model.values())
        print(
            "ring at {} (BLOCK_W {}, {} rows, {} warps): model forward {:.2f} ms{}, "
            "forward + backward {:.2f} ms, measured {:.1f} ms (x{:.2f})".format(
                COMMIT,
                block_w,
                rows,
                warps,
                model["stats"],
                (
                    ", measured {:.1f} ms (x{:.2f})".format(fwd_ms, fwd_ms / model["stats"])
                    if fwd_ms
                    else ""
                ),
                total,
                total_ms,
                total_ms / total,
            ),
            flush=True,
        )


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""
Registers, spills and shared memory of the fused SSIM kernels, compiled for a GPU
architecture on any machine (no GPU needed): Triton compiles to PTX and its bundled
``ptxas -v`` reports what each program would use.

    python benchmarks/ssim_kernel_resources.py                           # sm_90 (H100), the default grid
    python benchmarks/ssim_kernel_resources.py --passes band --block-w 64 --warps 8 --num-stages 1 3

It cannot say how fast a kernel is, but it tells which settings would spill registers
to local memory or exceed the 227 KiB of shared memory an H100 program may use (which
fail to launch), before any device time is spent on them.  Each kernel of a setting is
compiled as the loss runs it: 11x11 window, min-max normalisation on; "stats" is the
forward, "stats-bwd" the derivative pass of the backward, "grad" the gradient pass.
"""

import argparse
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from kd_det.losses import ssim_triton  # noqa: E402

SHARED_LIMIT = 227 * 1024  # per program (thread block) on sm_90


def ptxas_report(ptx: str, arch: str):
    """(registers, spill store bytes) of the PTX's kernel, from ``ptxas -v``."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run([ptxas, "-arch=" + arch, "-v", path, "-o", os.path.join(d, "kernel.o")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr else "ptxas failed")
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spill = re.search(r"(\d+) bytes spill stores", proc.stderr)
    return int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else 0


def compile_kernel(fn, constexprs, num_warps, num_stages, capability):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {n: ("constexpr" if n in constexprs else "*fp32" if n.endswith("_ptr") else "i32")
                 for n in fn.arg_names}
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    kernel = triton.compile(ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                            target=GPUTarget("cuda", capability, 32), options=options)
    arch = "sm_{}{}".format(capability, "a" if capability == 90 else "")
    regs, spill = ptxas_report(kernel.asm["ptx"], arch)
    return {"registers": regs, "spill_bytes": spill, "shared_bytes": kernel.metadata.shared}


def kernels_of(vertical_pass, block_w, rows, precision):
    common = dict(KH=11, KW=11, BLOCK_W=block_w, ROWS=rows, NORMALIZE=True, NORM_STRIDE=ssim_triton.NORM_STRIDE)
    if vertical_pass == "band":
        common.update(TILE=ssim_triton.TILE_ROWS, DOT_PRECISION=precision)
        stats, grad = ssim_triton._ssim_stats_band_kernel, ssim_triton._ssim_grad_band_kernel
    else:
        common.update(RING=ssim_triton.RING)
        stats, grad = ssim_triton._ssim_stats_kernel, ssim_triton._ssim_grad_kernel
    return [("stats", stats, dict(common, BACKWARD=False)), ("stats-bwd", stats, dict(common, BACKWARD=True)),
            ("grad", grad, common)]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--passes", nargs="+", default=["ring", "band"], choices=["ring", "band"])
    parser.add_argument("--block-w", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--warps", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--precisions", nargs="+", default=["ieee"], choices=["ieee", "tf32x3", "tf32"])
    parser.add_argument("--num-stages", nargs="+", type=int, default=None,
                        help="default: what the loss uses (Triton's default for ring, BAND_NUM_STAGES for band)")
    parser.add_argument("--capability", type=int, default=90, help="compute capability, 90 = H100")
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if ssim_triton.triton is None:
        raise SystemExit("needs Triton (with its bundled ptxas)")

    results = []
    for vp in args.passes:
        precisions = args.precisions if vp == "band" else ["-"]
        stages = args.num_stages or [ssim_triton.BAND_NUM_STAGES if vp == "band" else None]
        for bw, warps, prec, st in itertools.product(args.block_w, args.warps, precisions, stages):
            row = {"pass": vp, "block_w": bw, "rows": args.rows, "warps": warps, "precision": prec,
                   "num_stages": st}
            for name, fn, constexprs in kernels_of(vp, bw, args.rows, prec):
                try:
                    row[name] = compile_kernel(fn, constexprs, warps, st, args.capability)
                except Exception as e:  # a setting the compiler rejects is a result
                    row[name] = {"error": "{}: {}".format(type(e).__name__, str(e).splitlines()[0][:160])}
            results.append(row)
            cells = []
            for name in ("stats", "stats-bwd", "grad"):
                r = row[name]
                if "error" in r:
                    cells.append("{} {}".format(name, r["error"]))
                else:
                    over = " OVER SHARED LIMIT" if r["shared_bytes"] > SHARED_LIMIT else ""
                    cells.append("{} {:3d} regs {:5d} B spilled {:4d} KiB shared{}".format(
                        name, r["registers"], r["spill_bytes"], r["shared_bytes"] // 1024, over))
            print("{:4s} BLOCK_W {:3d} warps {} {:6s} stages {}: {}".format(
                vp, bw, warps, prec, st if st is not None else "default", " | ".join(cells)), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"capability": args.capability, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

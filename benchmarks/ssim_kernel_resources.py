#!/usr/bin/env python
"""
Registers, spills and shared memory of the fused SSIM kernels, compiled for a GPU
architecture on any machine (no GPU needed): Triton compiles to PTX and its bundled
``ptxas -v`` reports what each program would use.

    # sm_90 (H100), the default grid
    python benchmarks/ssim_kernel_resources.py
    python benchmarks/ssim_kernel_resources.py --passes band --block-w 64 --warps 8 --num-stages 1 3

It cannot say how fast a kernel is, but it tells which settings would spill registers
to local memory or exceed the 227 KiB of shared memory an H100 program may use (which
fail to launch), before any device time is spent on them.  Each kernel of a setting is
compiled as the loss runs it: 11x11 window, min-max normalisation on; "stats" is the
forward, "stats-bwd" the derivative pass of the backward, "grad" the gradient pass.

``--sass`` also disassembles each kernel (Triton's bundled ``nvdisasm``), counts the
machine instructions of its row loop by execution pipe, and turns them into an
issue-bound time for issue 9's shape (batch 8, 256 channels, P2-P6 of 800x1344): the
loop's warp instructions over all programs, divided by each pipe's per-SM rate on
sm_90, 132 SMs, 1.98 GHz.  That is a lower bound (no latency, occupancy or memory
stalls, no tail effects), useful to compare kernels; only the GPU's clock says how fast
they are.

    python benchmarks/ssim_kernel_resources.py --sass --passes ring band unrolled \\
        --block-w 32 --warps 1
"""

import argparse
import itertools
import json
import os
import re
import subprocess
import tempfile

import ssim_vertical_variants as variants  # beside this script: the ring and band passes

from kd_det.losses import ssim_triton
from kd_det.losses.ssim import gaussian_window_1d

SHARED_LIMIT = 227 * 1024  # per program (thread block) on sm_90
# Issue 9's shape: (planes, height, width) of each FPN level, all windows 11x11.
FPN800_LEVELS = [
    (8 * 256, 200, 336),
    (8 * 256, 100, 168),
    (8 * 256, 50, 84),
    (8 * 256, 25, 42),
    (8 * 256, 13, 21),
]
H100_SMS, H100_BOOST_HZ = 132, 1.98e9
# Warp instructions per clock per SM on sm_90 (CUDA C++ Programming Guide, throughput of
# arithmetic instructions for compute capability 9.0: 128 fp32 FMA/add/mul, 64 integer,
# compare, select and logic, 16 special-function results per clock; 32 load/store units).
PIPE_RATES = {"fp32": 4.0, "int": 2.0, "ld/st": 1.0, "mufu": 0.5}
ISSUE_RATE = 4.0  # four schedulers, one warp instruction each per clock
PIPE_OF = {
    "fp32": ("FFMA", "FADD", "FMUL"),
    "ld/st": (
        "LDG",
        "STG",
        "LDS",
        "STS",
        "LDSM",
        "LD",
        "ST",
        "SHFL",
        "ATOMG",
        "ATOMS",
        "RED",
        "LDL",
        "STL",
        "LDGSTS",
    ),
    "mufu": ("MUFU",),
    "tensor": ("HMMA", "HGMMA"),
    # uniform datapath, branches and barriers: they take an issue slot only
    "other": (
        "BRA",
        "BSSY",
        "BSYNC",
        "EXIT",
        "NOP",
        "BAR",
        "DEPBAR",
        "WARPSYNC",
        "ULDC",
        "UMOV",
        "UIADD3",
        "UIMAD",
        "ULOP3",
        "USHF",
        "ULEA",
        "UISETP",
        "USEL",
        "R2UR",
        "S2UR",
        "CALL",
        "RET",
        "YIELD",
    ),
}


def ptxas_report(ptx: str, arch: str):
    """(registers, spill store bytes) of the PTX's kernel, from ``ptxas -v``."""
    import triton

    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.ptx")
        with open(path, "w") as f:
            f.write(ptx)
        proc = subprocess.run(
            [ptxas, "-arch=" + arch, "-v", path, "-o", os.path.join(d, "kernel.o")],
            capture_output=True,
            text=True,
        )
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr else "ptxas failed")
    regs = re.search(r"Used (\d+) registers", proc.stderr)
    spill = re.search(r"(\d+) bytes spill stores", proc.stderr)
    return int(regs.group(1)) if regs else None, int(spill.group(1)) if spill else 0


def compile_kernel(fn, constexprs, num_warps, num_stages, capability):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {
        n: ("constexpr" if n in constexprs else "*fp32" if n.endswith("_ptr") else "i32")
        for n in fn.arg_names
    }
    options = {"num_warps": num_warps}
    if num_stages is not None:
        options["num_stages"] = num_stages
    kernel = triton.compile(
        ASTSource(fn=fn, signature=signature, constexprs=constexprs),
        target=GPUTarget("cuda", capability, 32),
        options=options,
    )
    arch = "sm_{}{}".format(capability, "a" if capability == 90 else "")
    regs, spill = ptxas_report(kernel.asm["ptx"], arch)
    return {
        "registers": regs,
        "spill_bytes": spill,
        "shared_bytes": kernel.metadata.shared,
        "cubin": kernel.asm["cubin"],
    }


def sass_lines(cubin: bytes):
    """(address, opcode) of each instruction and {label: address}, from ``nvdisasm``."""
    import triton

    nvdisasm = os.path.join(
        os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "nvdisasm"
    )
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        text = subprocess.run(
            [nvdisasm, "-c", path], capture_output=True, text=True, check=True
        ).stdout
    instructions, labels, pending = [], {}, []
    for line in text.splitlines():
        label = re.match(r"^\s*(\.L_\w+):", line)
        if label:
            pending.append(label.group(1))
            continue
        m = re.match(r"^\s*/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(\S*)\s*(.*)$", line)
        if m:
            addr = int(m.group(1), 16)
            for name in pending:
                labels[name] = addr
            pending = []
            instructions.append((addr, m.group(2), m.group(4)))
    return instructions, labels


def row_loop(cubin: bytes):
    """Opcode counts of the kernel's largest loop (the row loop): instructions from a label
    up to a branch back to it."""
    instructions, labels = sass_lines(cubin)
    loops = []
    for addr, op, operands in instructions:
        target = re.search(r"\((\.L_\w+)\)", operands) if op == "BRA" else None
        if target and labels.get(target.group(1), addr + 1) <= addr:
            loops.append((labels[target.group(1)], addr))
    if not loops:
        raise RuntimeError("no loop found in the kernel")
    start, end = max(loops, key=lambda loop: loop[1] - loop[0])
    counts = {}
    for addr, op, _ in instructions:
        if start <= addr <= end:
            counts[op] = counts.get(op, 0) + 1
    return counts


def by_pipe(counts):
    pipes = {name: 0 for name in list(PIPE_RATES) + ["tensor", "other"]}
    for op, n in counts.items():
        pipe = next(
            (p for p, ops in PIPE_OF.items() if op in ops), "int"
        )  # the rest: integer/compare/select/move
        pipes[pipe] += n
    return pipes


def loop_trips(vertical_pass, rows_out, window=11, tile=16, unroll=0):
    """Row-loop trips of one program that produces ``rows_out`` rows, and rows per trip."""
    if vertical_pass == "unrolled":
        unroll = unroll or window
        return -(-(rows_out + window - 1) // unroll), unroll
    if vertical_pass == "band":
        return -(-rows_out // tile) + 1, tile
    return rows_out + window - 1, 1


def issue_bound_ms(
    vertical_pass,
    kernel_name,
    pipes,
    block_w,
    rows,
    warps,
    levels=FPN800_LEVELS,
    window=11,
    unroll=0,
):
    """Issue-bound time of a kernel's row loops over ``levels`` (see the module docstring)."""
    warp_instructions = {p: 0.0 for p in pipes}
    for planes, h, w in levels:
        # the forward and derivative passes walk output rows, the gradient pass input rows
        height, width = (h, w) if kernel_name == "grad" else (h - window + 1, w - window + 1)
        col_blocks = -(-width // block_w)
        for row0 in range(0, height, rows):
            trips, _ = loop_trips(vertical_pass, min(rows, height - row0), window, unroll=unroll)
            for p, n in pipes.items():
                warp_instructions[p] += planes * col_blocks * trips * n * warps
    clocks = max(
        [warp_instructions[p] / rate for p, rate in PIPE_RATES.items()]
        + [sum(warp_instructions.values()) / ISSUE_RATE]
    )
    return 1e3 * clocks / H100_SMS / H100_BOOST_HZ


def kernels_of(vertical_pass, block_w, rows, precision, window=11, sigma=1.5, unroll=0):
    taps = tuple(gaussian_window_1d(window, sigma).tolist())
    common = dict(
        WH=taps, BLOCK_W=block_w, ROWS=rows, NORMALIZE=True, NORM_STRIDE=ssim_triton.NORM_STRIDE
    )
    if vertical_pass == "band":
        common.update(KH=window, TILE=variants.TILE_ROWS, DOT_PRECISION=precision)
        stats, grad = variants._ssim_stats_band_kernel, variants._ssim_grad_band_kernel
    elif vertical_pass == "unrolled":
        common.update(WV=taps, UNROLL=unroll or window)
        stats, grad = (
            ssim_triton._ssim_stats_unrolled_kernel,
            ssim_triton._ssim_grad_unrolled_kernel,
        )
    else:
        common.update(KH=window, RING=variants.RING)
        stats, grad = variants._ssim_stats_kernel, variants._ssim_grad_kernel
    return [
        ("stats", stats, dict(common, BACKWARD=False)),
        ("stats-bwd", stats, dict(common, BACKWARD=True)),
        ("grad", grad, common),
    ]


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--passes", nargs="+", default=list(variants.PASSES), choices=list(variants.PASSES)
    )
    parser.add_argument("--block-w", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--rows", type=int, default=128)
    parser.add_argument("--warps", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument(
        "--precisions", nargs="+", default=["ieee"], choices=["ieee", "tf32x3", "tf32"]
    )
    parser.add_argument(
        "--num-stages",
        nargs="+",
        type=int,
        default=None,
        help="default: what the loss uses (Triton's default for ring, BAND_NUM_STAGES for band)",
    )
    parser.add_argument("--capability", type=int, default=90, help="compute capability, 90 = H100")
    parser.add_argument(
        "--unroll",
        type=int,
        default=ssim_triton.ROW_UNROLL,
        help="rows per trip of the unrolled pass (default: the kernel's ROW_UNROLL; 0: the window)",
    )
    parser.add_argument(
        "--sass",
        action="store_true",
        help="count each row loop's instructions and estimate an issue-bound time "
        "(module docstring)",
    )
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    if ssim_triton.triton is None:
        raise SystemExit("needs Triton (with its bundled ptxas)")

    results = []
    for vp in args.passes:
        precisions = args.precisions if vp == "band" else ["-"]
        stages = args.num_stages or [variants.BAND_NUM_STAGES if vp == "band" else None]
        for bw, warps, prec, st in itertools.product(args.block_w, args.warps, precisions, stages):
            row = {
                "pass": vp,
                "block_w": bw,
                "rows": args.rows,
                "warps": warps,
                "precision": prec,
                "num_stages": st,
            }
            for name, fn, constexprs in kernels_of(vp, bw, args.rows, prec, unroll=args.unroll):
                try:
                    row[name] = compile_kernel(fn, constexprs, warps, st, args.capability)
                    cubin = row[name].pop("cubin")
                    if args.sass:
                        pipes = by_pipe(row_loop(cubin))
                        per_row = loop_trips(vp, args.rows, unroll=args.unroll)[1]
                        row[name]["loop_per_row"] = {p: n / per_row for p, n in pipes.items()}
                        row[name]["issue_bound_ms"] = issue_bound_ms(
                            vp, name, pipes, bw, args.rows, warps, unroll=args.unroll
                        )
                except Exception as e:  # a setting the compiler rejects is a result
                    row[name] = {
                        "error": "{}: {}".format(type(e).__name__, str(e).splitlines()[0][:160])
                    }
            results.append(row)
            cells = []
            for name in ("stats", "stats-bwd", "grad"):
                r = row[name]
                if "error" in r:
                    cells.append("{} {}".format(name, r["error"]))
                else:
                    over = " OVER SHARED LIMIT" if r["shared_bytes"] > SHARED_LIMIT else ""
                    cells.append(
                        "{} {:3d} regs {:5d} B spilled {:4d} KiB shared{}".format(
                            name, r["registers"], r["spill_bytes"], r["shared_bytes"] // 1024, over
                        )
                    )
            print(
                "{:8s} BLOCK_W {:3d} warps {} {:6s} stages {}: {}".format(
                    vp, bw, warps, prec, st if st is not None else "default", " | ".join(cells)
                ),
                flush=True,
            )
            if args.sass:
                for name in ("stats", "stats-bwd", "grad"):
                    r = row[name]
                    if "loop_per_row" in r:
                        mix = "  ".join(
                            "{} {:.0f}".format(p, n) for p, n in r["loop_per_row"].items() if n
                        )
                        print(
                            "    {:9s} per input row and warp: {}  -> issue-bound {:.2f} ms".format(
                                name, mix, r["issue_bound_ms"]
                            ),
                            flush=True,
                        )
                total = [row[n].get("issue_bound_ms") for n in ("stats", "stats-bwd", "grad")]
                if None not in total:
                    print(
                        "    forward {:.2f} ms, forward + backward {:.2f} ms "
                        "(issue-bound, row loops only)".format(total[0], sum(total)),
                        flush=True,
                    )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"capability": args.capability, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

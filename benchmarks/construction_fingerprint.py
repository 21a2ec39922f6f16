#!/usr/bin/env python
"""
Fingerprints of a few short training runs, to show that a refactoring changed no behaviour.

Trains, each with ``tools/train_net.py`` as a user runs it, on the generated synthetic data
at 64 px for a few iterations (no loader workers, a fixed seed):

1. the demo's Faster R-CNN teacher (R-18-FPN-128),
2. the demo's vanilla student (R-18-FPN-64),
3. the demo's SSIM student, distilled from 1,
4. a RetinaNet R-50-FPN teacher, then an RM+PFI RetinaNet R-18 student distilled from it,

and prints, per run, the SHA-256 of the trained weights (every tensor of the checkpoint's
``model``, in key order, with its key, dtype and shape) and the last logged losses.  On one
machine and thread count, runs before and after a change that keeps behaviour give the same
hashes (CPU kernels are deterministic for a fixed thread count); another machine's kernels
round differently, so compare hashes from one machine only.

    python benchmarks/construction_fingerprint.py [--iters 4] [--out /tmp/fingerprint] [--json f]
"""

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = [
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "64",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "64",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.STEPS",
    "()",
    "SOLVER.WARMUP_ITERS",
    "1",
    "SOLVER.CHECKPOINT_PERIOD",
    "100000",
    "DATASETS.TEST",
    "()",
    "SEED",
    "5",
]
# name -> (config, teacher run or None, extra options)
RUNS = [
    ("rcnn_teacher", "configs/synthetic/faster_rcnn_R_18_FPN128_long.yaml", None, []),
    ("rcnn_vanilla", "configs/synthetic/faster_rcnn_R_18_FPN.yaml", None, []),
    (
        "rcnn_ssim",
        "configs/synthetic/distill/ssim_faster_rcnn_R18long_to_R18.yaml",
        "rcnn_teacher",
        [],
    ),
    ("retina_teacher", "configs/synthetic/retinanet_R_50_FPN.yaml", None, []),
    (
        "retina_rm_pfi",
        "configs/synthetic/distill/rm_pfi_retinanet_R50_to_R18.yaml",
        "retina_teacher",
        ["KD.TEACHER.CONFIG", "configs/synthetic/retinanet_R_50_FPN.yaml"],
    ),
]


def weights_sha256(path: str) -> str:
    """SHA-256 over the checkpoint's model tensors: key, dtype, shape and bytes, in key order."""
    state = torch.load(path, map_location="cpu", weights_only=True)["model"]
    digest = hashlib.sha256()
    for key in sorted(state):
        t = state[key].contiguous()
        digest.update("{} {} {}\n".format(key, t.dtype, tuple(t.shape)).encode())
        raw = t.view(torch.int16) if t.dtype == torch.bfloat16 else t  # numpy has no bfloat16
        digest.update(raw.numpy().tobytes())
    return digest.hexdigest()


def last_losses(output_dir: str) -> dict:
    with open(os.path.join(output_dir, "metrics.json")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    rows = [r for r in rows if "total_loss" in r]
    last = rows[-1] if rows else {}
    return {k: v for k, v in last.items() if k.startswith("loss") or k == "total_loss"}


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--iters", type=int, default=4)
    parser.add_argument("--out", default="", help="output root (default: a temporary directory)")
    parser.add_argument("--json", default="", help="also write the fingerprints to this file")
    args = parser.parse_args(argv)
    out = args.out or tempfile.mkdtemp(prefix="kd_fingerprint_")
    env = dict(os.environ, DETECTRON2_DATASETS=os.path.join(out, "datasets"))
    result = {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "iters": args.iters,
        "runs": {},
    }
    for name, config, teacher, extra in RUNS:
        run_dir = os.path.join(out, name)
        opts = SMALL + ["SOLVER.MAX_ITER", str(args.iters), "OUTPUT_DIR", run_dir] + extra
        if teacher:
            opts += ["KD.TEACHER.WEIGHTS", os.path.join(out, teacher, "model_final.pth")]
        cmd = [
            sys.executable,
            os.path.join(ROOT, "tools", "train_net.py"),
            "--config-file",
            config,
        ] + opts
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit("{} failed:\n{}".format(name, (proc.stdout + proc.stderr)[-4000:]))
        sha = weights_sha256(os.path.join(run_dir, "model_final.pth"))
        result["runs"][name] = {"sha256": sha, "losses": last_losses(run_dir)}
        losses = json.dumps(result["runs"][name]["losses"], sort_keys=True)
        print("{:<16} {}  {}".format(name, sha, losses), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2, sort_keys=True)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""
One training iteration, R-50-FPN teacher -> R-18-FPN student (the COCO configs):
the vanilla student step, the teacher's inference alone, and the distillation step
with each method; overhead = distillation step / (student step + teacher inference).

    python benchmarks/bench_step.py                                   # GPU, batch 8, 800x1333
    python benchmarks/bench_step.py --teacher-autocast bf16 --channels-last
    # CPU smoke setting
    python benchmarks/bench_step.py --device cpu --batch 2 --size 320 512 --iters 3
    python benchmarks/bench_step.py --json step.json

Weights are random (speed does not depend on them, except through the number of
RPN proposals surviving NMS, which the fixed TOPK limits bound).  On CUDA the SSIM
method runs twice: with the fused Triton loss (KD.SSIM.IMPL auto) and, as
"ssim[torch]", with the PyTorch one, which is the fused kernel's effect on the step.  With a
fast-teacher option, the KD loss values are also compared with the fp32 teacher's on one batch.
"""

import argparse
import json
import os
import platform
import statistics
import tempfile
import time

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.structures import Boxes, Instances

from kd_det import get_kd_cfg, merge_kd_config

# the checkout this script lies in (benchmarks/..): its configs/
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

ARCHS = {
    "faster_rcnn": (
        "COCO-Detection/faster_rcnn_R_50_FPN_1x.yaml",
        "COCO-Detection/faster_rcnn_R_18_FPN_1x.yaml",
        {
            "l2": "COCO-Distillation/l2_faster_rcnn_R50_to_R18_1x.yaml",
            "ssim": "COCO-Distillation/ssim_faster_rcnn_R50_to_R18_1x.yaml",
        },
    ),
    "retinanet": (
        "COCO-Detection/retinanet_R_50_FPN_1x.yaml",
        "COCO-Detection/retinanet_R_18_FPN_1x.yaml",
        {
            "l2": "COCO-Distillation/l2_retinanet_R50_to_R18_1x.yaml",
            "ssim": "COCO-Distillation/ssim_retinanet_R50_to_R18_1x.yaml",
            "rm_pfi": "COCO-Distillation/rm_pfi_retinanet_R50_to_R18_1x.yaml",
        },
    ),
}


def load_cfg(rel, device, opts=()):
    return merge_kd_config(
        get_kd_cfg(),
        os.path.join(ROOT, "configs", rel),
        ["MODEL.WEIGHTS", "", "MODEL.DEVICE", device] + list(opts),
    )


def make_batch(n, h, w, num_classes, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(n):
        xy = torch.rand(6, 2, generator=g) * torch.tensor([w * 0.7, h * 0.7])
        wh = 16 + torch.rand(6, 2, generator=g) * torch.tensor([w * 0.3, h * 0.3])
        inst = Instances((h, w))
        inst.gt_boxes = Boxes(torch.cat([xy, xy + wh], dim=1))
        inst.gt_classes = torch.randint(0, num_classes, (6,), generator=g)
        batch.append(
            {
                "image": torch.randint(0, 256, (3, h, w), generator=g, dtype=torch.uint8),
                "instances": inst,
                "height": h,
                "width": w,
            }
        )
    return batch


def measure(fn, iters, warmup, device):
    """Median ms of fn() and peak memory (GiB, CUDA) over the timed calls."""
    cuda = device.startswith("cuda")
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize()
        times.append((time.perf_counter() - t) * 1000)
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")
    return statistics.median(times), peak


def teacher_inference_fn(model, batch):
    """The (first) teacher's share of a distillation step: its view of the batch, backbone
    features and, with a dense head, class logits."""
    teacher = model.teacher

    def teacher_inference():
        with torch.no_grad():
            images = model.preprocess_image(batch)
            feats = teacher.backbone_features(model.teacher_images(batch, images))
            if teacher.has_dense_head:
                teacher.dense_class_logits(feats)

    return teacher_inference


def train_step_fn(model, batch):
    model.train()
    # lr 0: the update runs (its cost is part of a step) but the weights stay put.  With random
    # weights even lr 1e-6 let an imitation loss's gradient blow the student up (NaN boxes in
    # the RPN within a few steps on the GPU), and every timed step should be the same step
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    from detectron2.utils.events import EventStorage

    storage = EventStorage(0)

    def step():
        with storage:
            losses = model(batch)
            sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return losses

    return step


def method_runs(methods, device):
    """(name, config, extra options) of each method to time; on CUDA SSIM also with IMPL torch."""
    runs = [(name, rel, []) for name, rel in methods.items()]
    if device.startswith("cuda") and "ssim" in methods:
        runs.append(("ssim[torch]", methods["ssim"], ["KD.SSIM.IMPL", "torch"]))
    return runs


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--arch", choices=["faster_rcnn", "retinanet", "both"], default="both")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--size", type=int, nargs=2, default=[800, 1333], metavar=("H", "W"))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--teacher-autocast", choices=["", "bf16", "fp16"], default="")
    parser.add_argument(
        "--channels-last", action="store_true", help="teacher weights and inputs channels-last"
    )
    parser.add_argument("--json", default="")
    args = parser.parse_args(argv)
    # the teachers' random-init checkpoints (hundreds of MB) live only as long as the run
    with tempfile.TemporaryDirectory(prefix="kd_bench_step_") as tmp:
        rows = run_archs(args, tmp)
    print_table(args, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "torch": torch.__version__, "rows": rows}, f, indent=2)
    return rows


def run_archs(args, tmp):
    """Measure every (arch, method) of ``args``; teacher checkpoints go to ``tmp``."""
    fast_opts = [
        "KD.TEACHER.AUTOCAST",
        args.teacher_autocast,
        "KD.TEACHER.CHANNELS_LAST",
        args.channels_last,
    ]
    rows = []
    for arch in (["faster_rcnn", "retinanet"] if args.arch == "both" else [args.arch]):
        teacher_rel, student_rel, methods = ARCHS[arch]
        teacher_model = build_model(load_cfg(teacher_rel, args.device))
        DetectionCheckpointer(teacher_model, save_dir=tmp).save(arch + "_teacher")
        weights = os.path.join(tmp, arch + "_teacher.pth")
        del teacher_model
        student_cfg = load_cfg(student_rel, args.device)
        batch = make_batch(args.batch, *args.size, num_classes=80)

        student = build_model(student_cfg)
        student_ms, student_mem = measure(
            train_step_fn(student, batch), args.iters, args.warmup, args.device
        )
        del student
        row = {
            "arch": arch,
            "student_step_ms": student_ms,
            "student_peak_gib": student_mem,
            "methods": {},
        }
        for name, rel, method_opts in method_runs(methods, args.device):
            kd_opts = [
                "KD.TEACHER.WEIGHTS",
                weights,
                "KD.TEACHER.CONFIG",
                os.path.join(ROOT, "configs", teacher_rel),
            ] + method_opts
            model = build_model(load_cfg(rel, args.device, kd_opts + fast_opts))
            teacher_ms, _ = measure(
                teacher_inference_fn(model, batch), args.iters, args.warmup, args.device
            )
            step = train_step_fn(model, batch)
            kd_ms, kd_mem = measure(step, args.iters, args.warmup, args.device)
            entry = {
                "teacher_inference_ms": teacher_ms,
                "distill_step_ms": kd_ms,
                "distill_peak_gib": kd_mem,
                "overhead": kd_ms / (student_ms + teacher_ms),
            }
            if args.teacher_autocast or args.channels_last:
                # effect of the fast teacher on the KD loss values, same weights and batch
                ref = build_model(load_cfg(rel, args.device, kd_opts))
                ref.load_state_dict(model.state_dict())
                with torch.no_grad():
                    model.train(), ref.train()
                    from detectron2.utils.events import EventStorage

                    with EventStorage(0):
                        a, b = model(batch), ref(batch)
                entry["kd_loss_rel_diff"] = {
                    k: abs(a[k].item() - b[k].item()) / max(abs(b[k].item()), 1e-12)
                    for k in a
                    if k.startswith("loss_kd")
                }
                del ref
            row["methods"][name] = entry
            del model, step
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


def print_table(args, rows):
    print(
        "device: {} | batch {} | {}x{} | teacher autocast {!r} | channels-last {}".format(
            (
                torch.cuda.get_device_name()
                if args.device.startswith("cuda")
                else platform.processor() or "cpu"
            ),
            args.batch,
            *args.size,
            args.teacher_autocast,
            args.channels_last
        )
    )
    print(
        "| arch | method | student step ms | teacher inf. ms | distill step ms | overhead "
        "| peak GiB | KD loss rel. diff |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---|")
    for r in rows:
        for name, e in r["methods"].items():
            diff = (
                ", ".join(
                    "{} {:.1e}".format(k, v) for k, v in e.get("kd_loss_rel_diff", {}).items()
                )
                or "-"
            )
            print(
                "| {} | {} | {:.1f} | {:.1f} | {:.1f} | {:.3f} | {:.2f} | {} |".format(
                    r["arch"],
                    name,
                    r["student_step_ms"],
                    e["teacher_inference_ms"],
                    e["distill_step_ms"],
                    e["overhead"],
                    e["distill_peak_gib"],
                    diff,
                )
            )


if __name__ == "__main__":
    main()

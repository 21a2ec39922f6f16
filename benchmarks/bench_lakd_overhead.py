#!/usr/bin/env python
"""
What LAKD's distillation path costs per training step: the synthetic LAKD config's student
(R-18-FPN, a randomly initialised R-50-FPN teacher) timed with ``KD.LAKD.ENABLED`` True
(every stage switched on) and False, everything else equal (the teacher's forward runs in
both), on one fixed batch of random images.

    python benchmarks/bench_lakd_overhead.py --arch faster_rcnn --steps 10
    python benchmarks/bench_lakd_overhead.py --arch retinanet --device cuda

A step is the forward, the backward and the optimizer step.  Prints the median and the
fastest wall-clock ms/step of each setting and the median CPU time of the process per step
(after ``--warmup`` untimed steps, the settings alternating step by step so that drifts of a
shared machine hit both), and the extra time LAKD's second run of the stages takes.  On a
machine shared with other jobs, the CPU time with ``--threads 1`` is the steadiest measure:
it counts the work done, not the time spent waiting for a core.
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = {
    "faster_rcnn": (
        "configs/synthetic/distill/lakd_faster_rcnn_R50_to_R18.yaml",
        "configs/synthetic/faster_rcnn_R_50_FPN.yaml",
    ),
    "retinanet": (
        "configs/synthetic/distill/lakd_retinanet_R50_to_R18.yaml",
        "configs/synthetic/retinanet_R_50_FPN.yaml",
    ),
}


def build(arch, lakd, teacher_weights, device, opts=()):
    from detectron2.modeling import build_model

    from kd_det import get_kd_cfg, merge_kd_config

    student_config, teacher_config = CONFIGS[arch]
    cfg = merge_kd_config(
        get_kd_cfg(),
        os.path.join(ROOT, student_config),
        [
            "KD.TEACHER.CONFIG",
            os.path.join(ROOT, teacher_config),
            "KD.TEACHER.WEIGHTS",
            teacher_weights,
            "KD.TEACHER.CHECK_CLASSES",
            False,
            "KD.LAKD.ENABLED",
            lakd,
            "KD.LAKD.START_ITERS",
            [],
            "MODEL.DEVICE",
            device,
        ]
        + list(opts),
    )
    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    return cfg, model, optimizer


def save_teacher(arch, path, device):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from kd_det import get_kd_cfg, merge_kd_config

    cfg = merge_kd_config(
        get_kd_cfg(), os.path.join(ROOT, CONFIGS[arch][1]), ["MODEL.DEVICE", device]
    )
    torch.manual_seed(1)
    DetectionCheckpointer(build_model(cfg), save_dir=os.path.dirname(path)).save(
        os.path.splitext(os.path.basename(path))[0]
    )


def make_batch(num_images, size, num_classes, seed=0):
    from detectron2.structures import Boxes, Instances

    g = torch.Generator().manual_seed(seed)
    batch = []
    for _ in range(num_images):
        xy = torch.randint(0, size // 2, (4, 2), generator=g).float()
        wh = torch.randint(8, size // 2, (4, 2), generator=g).float()
        boxes = torch.cat([xy, (xy + wh).clamp(max=size - 1)], dim=1)
        instances = Instances(
            (size, size),
            gt_boxes=Boxes(boxes),
            gt_classes=torch.randint(0, num_classes, (4,), generator=g),
        )
        image = torch.randint(0, 256, (3, size, size), dtype=torch.uint8, generator=g)
        batch.append({"image": image, "instances": instances, "height": size, "width": size})
    return batch


def step(model, optimizer, batch, device):
    from detectron2.utils.events import EventStorage

    if device == "cuda":
        torch.cuda.synchronize()
    start, cpu_start = time.perf_counter(), time.process_time()
    with EventStorage(0):
        losses = model(batch)
    optimizer.zero_grad(set_to_none=True)
    sum(losses.values()).backward()
    optimizer.step()
    if device == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    return wall * 1000.0, cpu * 1000.0, sorted(losses)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", choices=sorted(CONFIGS), default="faster_rcnn")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="images per step (the config's 8)")
    parser.add_argument("--size", type=int, default=128, help="image side (the config's 128)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--json", default="", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    sys.path.insert(0, ROOT)
    import kd_det  # noqa: F401  (registers the meta-architectures)

    with tempfile.TemporaryDirectory() as tmp:
        weights = os.path.join(tmp, "teacher.pth")
        save_teacher(args.arch, weights, args.device)
        runs = {
            name: build(args.arch, name == "lakd", weights, args.device) for name in ("off", "lakd")
        }
    num_classes = 5
    batch = make_batch(args.batch, args.size, num_classes)
    times = {name: [] for name in runs}
    cpu_times = {name: [] for name in runs}
    keys = {}
    for i in range(args.warmup + args.steps):
        for name, (_, model, optimizer) in runs.items():
            ms, cpu_ms, keys[name] = step(model, optimizer, batch, args.device)
            if i >= args.warmup:
                times[name].append(ms)
                cpu_times[name].append(cpu_ms)
    assert "loss_kd_lakd" in keys["lakd"] and "loss_kd_lakd" not in keys["off"], keys
    result = {
        "arch": args.arch,
        "device": args.device,
        "threads": torch.get_num_threads(),
        "batch": args.batch,
        "size": args.size,
        "steps": args.steps,
    }
    print(
        "{} student, batch {} x {}px, {} {} thread(s), {} timed steps per setting".format(
            args.arch, args.batch, args.size, args.device, torch.get_num_threads(), args.steps
        )
    )
    print("| setting | median ms/step | fastest ms/step | median CPU ms/step |")
    print("|---|---:|---:|---:|")
    for name, label in (
        ("off", "KD.LAKD off (teacher forward only)"),
        ("lakd", "KD.LAKD on, 4 stages"),
    ):
        med, low = statistics.median(times[name]), min(times[name])
        cpu = statistics.median(cpu_times[name])
        result[name] = {
            "median_ms": med,
            "min_ms": low,
            "median_cpu_ms": cpu,
            "all_ms": times[name],
            "all_cpu_ms": cpu_times[name],
        }
        print("| {} | {:.1f} | {:.1f} | {:.1f} |".format(label, med, low, cpu))
    for key, what in (
        ("median_ms", "median wall"),
        ("min_ms", "fastest wall"),
        ("median_cpu_ms", "median CPU"),
    ):
        extra = result["lakd"][key] - result["off"][key]
        result["extra_" + key] = extra
        print(
            "LAKD's second run of the stages: {:+.1f} ms/step ({:+.1%}), {}".format(
                extra, extra / result["off"][key], what
            )
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()

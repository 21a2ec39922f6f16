#!/usr/bin/env python
"""
The main job on kd_det's synthetic data (``make demo``):

1. train the teacher (Faster R-CNN: R-18-FPN with 128 FPN channels, 200 iterations
   where the students get 150; RetinaNet: R-50-FPN),
2. train the vanilla student (R-18-FPN, 64 FPN channels),
3. train the same student with SSIM feature distillation from that teacher,

each with ``tools/train_net.py`` exactly as a user would run it, each evaluated with
COCO metrics (pycocotools) on ``kd_synthetic_val``; then print a table (AP, AP50,
AP75, APs, APm, APl) and write a report with loss/AP curves to ``--report-dir``.

    tools/run_demo.py                       # Faster R-CNN (default; ~15 min on 2 CPU cores)
    tools/run_demo.py --arch retinanet      # RetinaNet (learns more slowly from scratch)
    tools/run_demo.py --with-l2             # also the L2 feature-imitation baseline
    tools/run_demo.py --reuse               # skip runs that already finished and were evaluated
"""

import argparse
import datetime
import json
import os
import platform
import time

from kd_det.utils.metrics import COCO_BOX_KEYS, load_metrics
from kd_det.utils.runs import train_and_evaluate

# the checkout this tool lies in (tools/..): the configs and the default output folders are there
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# run name -> (label, config), per architecture; the distilled students take the teacher's weights.
# The Faster R-CNN demo's teacher is an R-18-FPN-128 trained 200 iterations (students: 150): from
# scratch
# in a CPU-sized schedule an R-50 does not beat an R-18 (see the teacher config).
RUNS = {
    "faster_rcnn": {
        "teacher": (
            "teacher R-18-FPN-128, 200 it",
            "configs/synthetic/faster_rcnn_R_18_FPN128_long.yaml",
        ),
        "student": ("student R-18-FPN-64", "configs/synthetic/faster_rcnn_R_18_FPN.yaml"),
        "ssim_kd": (
            "student + SSIM KD",
            "configs/synthetic/distill/ssim_faster_rcnn_R18long_to_R18.yaml",
        ),
        "l2_kd": (
            "student + L2 KD",
            "configs/synthetic/distill/l2_faster_rcnn_R18long_to_R18.yaml",
        ),
    },
    "retinanet": {
        "teacher": ("teacher R-50-FPN-128", "configs/synthetic/retinanet_R_50_FPN.yaml"),
        "student": ("student R-18-FPN-64", "configs/synthetic/retinanet_R_18_FPN.yaml"),
        "ssim_kd": (
            "student + SSIM KD",
            "configs/synthetic/distill/ssim_retinanet_R50_to_R18.yaml",
        ),
        "l2_kd": ("student + L2 KD", "configs/synthetic/distill/l2_retinanet_R50_to_R18.yaml"),
    },
}


def format_table(rows):
    head = "| model | " + " | ".join(COCO_BOX_KEYS) + " | train+eval time |"
    sep = "|---|" + "---:|" * (len(COCO_BOX_KEYS) + 1)
    lines = [head, sep]
    for label, ap, seconds in rows:
        vals = " | ".join("{:.2f}".format(ap[k]) for k in COCO_BOX_KEYS)
        lines.append(
            "| {} | {} | {} |".format(
                label, vals, "{:.0f} s".format(seconds) if seconds else "reused"
            )
        )
    return "\n".join(lines)


def verdict(results):
    """One honest sentence on whether distillation helped, with the share of the teacher-student gap
    closed."""
    t, s, d = results["teacher"]["AP"], results["student"]["AP"], results["ssim_kd"]["AP"]
    parts = [
        "SSIM distillation changed the student's AP by {:+.2f} ({:.2f} -> {:.2f}).".format(
            d - s, s, d
        )
    ]
    if t > s:
        parts.append(
            "The teacher leads the vanilla student by {:.2f} AP; "
            "distillation closed {:.0f}% of that gap.".format(t - s, 100.0 * (d - s) / (t - s))
        )
    else:
        parts.append(
            "The teacher ({:.2f} AP) does not lead the vanilla student here, "
            "so there was no gap to close.".format(t)
        )
    if "l2_kd" in results:
        parts.append("The L2 imitation baseline reached {:.2f} AP.".format(results["l2_kd"]["AP"]))
    parts.append(
        "Each model was trained once, with one seed (runs are deterministic on the CPU); the "
        "seed-to-seed spread is not measured here, so read small differences with care."
    )
    return " ".join(parts)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=sorted(RUNS), default="faster_rcnn")
    parser.add_argument(
        "--output-root", default="output/demo", help="training outputs go to OUTPUT_ROOT/ARCH/RUN"
    )
    parser.add_argument("--report-dir", default="demo_report")
    parser.add_argument(
        "--with-l2", action="store_true", help="also train the L2 feature-imitation baseline"
    )
    parser.add_argument(
        "--reuse", action="store_true", help="skip runs whose model_final.pth and evaluation exist"
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides (KEY VALUE ...) applied to every run, e.g. SOLVER.MAX_ITER 50",
    )
    args = parser.parse_args(argv)

    from kd_det.data import prepare_datasets  # imports Detectron2; after argument errors

    os.chdir(ROOT)
    prepare_datasets(["kd_synthetic_train", "kd_synthetic_val"])
    runs = RUNS[args.arch]
    names = ["teacher", "student", "ssim_kd"] + (["l2_kd"] if args.with_l2 else [])
    out_root = os.path.join(os.path.abspath(args.output_root), args.arch)
    teacher_weights = os.path.join(out_root, "teacher", "model_final.pth")

    started = time.time()
    results, seconds = {}, {}
    for name in names:
        opts = list(args.opts)
        if name.endswith("_kd"):
            # the teacher's AP, logged in the run itself, goes into MODEL_ZOO.md's row for it
            opts += ["KD.TEACHER.WEIGHTS", teacher_weights, "KD.TEACHER.EVAL_BEFORE_TRAIN", "True"]
        results[name], seconds[name] = train_and_evaluate(
            name,
            runs[name][1],
            os.path.join(out_root, name),
            opts,
            args.reuse,
            log_name="run_demo.log",
            root=ROOT,
        )
    total = time.time() - started

    rows = [(runs[n][0], results[n], seconds[n]) for n in names]
    table = format_table(rows)
    summary = verdict(results)
    print("\nCOCO box metrics on kd_synthetic_val ({}):\n".format(args.arch))
    print(table)
    print("\n" + summary)

    os.makedirs(args.report_dir, exist_ok=True)
    curves = os.path.join(args.report_dir, "curves.png")
    from plot_metrics import plot_runs  # tools/plot_metrics.py, next to this file

    plot_runs(
        [(runs[n][0], load_metrics(os.path.join(out_root, n, "metrics.json"))) for n in names],
        curves,
        smooth=3,
    )
    # release the students as a model zoo would: student-only checkpoints + MODEL_ZOO.md from the
    # evaluations
    from model_zoo import format_model_zoo, release_run  # tools/model_zoo.py

    zoo_rows = [
        release_run(os.path.join(out_root, n), os.path.join(args.report_dir, "release"))
        for n in names
        if n != "teacher"
    ]
    with open(os.path.join(args.report_dir, "MODEL_ZOO.md"), "w") as f:
        f.write(
            format_model_zoo(
                zoo_rows,
                "Runs of `tools/run_demo.py --arch {}` on the synthetic data.".format(args.arch),
            )
        )
    with open(os.path.join(args.report_dir, "results.json"), "w") as f:
        json.dump(
            {
                "arch": args.arch,
                "opts": args.opts,
                "results": results,
                "seconds": seconds,
                "total_seconds": total,
            },
            f,
            indent=2,
        )
    with open(os.path.join(args.report_dir, "report.md"), "w") as f:
        f.write("# kd_det demo: {} on kd_synthetic\n\n".format(args.arch))
        f.write(
            "Run {} on {} ({} CPU cores), {:.1f} min in all.\n\n".format(
                datetime.datetime.now().strftime("%Y-%m-%d %H:%M"),
                platform.platform(),
                os.cpu_count(),
                total / 60,
            )
        )
        f.write(
            "COCO box metrics on `kd_synthetic_val` (150 images), pycocotools:\n\n" + table + "\n\n"
        )
        f.write(summary + "\n\n")
        f.write(
            "Configs (`tools/train_net.py --config-file ...`{}):\n\n".format(
                ", with " + " ".join(args.opts) if args.opts else ""
            )
        )
        for n in names:
            f.write(
                "- {}: `{}` -> `{}`\n".format(
                    runs[n][0], runs[n][1], os.path.relpath(os.path.join(out_root, n), ROOT)
                )
            )
        f.write(
            "\nReleased students (vanilla Detectron2 checkpoints): "
            "see [MODEL_ZOO.md](MODEL_ZOO.md).\n"
        )
        f.write("\n![loss and AP curves](curves.png)\n")
    print("\nreport: {}".format(os.path.join(args.report_dir, "report.md")))
    print("total: {:.1f} min".format(total / 60))


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""
Distillation gain: train a teacher, the vanilla student and the student with each
distillation method, over several seeds, and report COCO box AP (mean and spread).

    # CPU setting (synthetic data, 128 px, 150 iterations per student)
    python benchmarks/bench_accuracy.py --arch faster_rcnn --methods vanilla l2 ssim
    # the same with automatic distillation weights (KD.AUTO_WEIGHT)
    python benchmarks/bench_accuracy.py --arch faster_rcnn --methods vanilla ssim ssim_auto l2_auto
    # vanilla, L2, SSIM, soft label, RM, PFI, RM+PFI
    python benchmarks/bench_accuracy.py --arch retinanet
    python benchmarks/bench_accuracy.py --methods vanilla ssim ssim_stats curriculum_ssim \\
        multi_ssim self_frskd
    # GPU setting (more iterations, data-loader workers; sized for about 25 minutes on an H100)
    python benchmarks/bench_accuracy.py --setting gpu --arch retinanet
    # any Detectron2-registered dataset, by name
    python benchmarks/bench_accuracy.py --train-dataset voc_2007_trainval \\
        --test-dataset voc_2007_test \\
        --num-classes 20 SOLVER.MAX_ITER 5000
    # the student runs 8 at a time (one GPU, or a many-core CPU)
    python benchmarks/bench_accuracy.py --arch retinanet --methods vanilla ssim cwd mgd \\
        --jobs 8 MODEL.DEVICE cuda
    # reuse a trained teacher, finished runs
    python benchmarks/bench_accuracy.py \\
        --teacher-weights output/demo/faster_rcnn/teacher/model_final.pth --reuse

Every run is ``tools/train_net.py --config-file <method config> SEED <seed> ...``; the
distilled students take the benchmark's teacher (``KD.TEACHER.CONFIG/WEIGHTS`` set
here).  The teacher is trained once, with the first seed.  Prints a table and writes
``--json``; "gap closed" is (method - vanilla) / (teacher - vanilla) on mean AP, and
"spread" is max - min over seeds.
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import time

from kd_det.utils.runs import train_and_evaluate

# the checkout this script lies in (benchmarks/..): configs, tools/ and the default outputs
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SYN = "configs/synthetic/"
# How a method's run gets its teacher:
#   "none": no teacher (vanilla, teacher-free self-distillation);
#   "teacher": the benchmark's teacher (KD.TEACHER.CONFIG/WEIGHTS);
#   "two_teachers": the benchmark's teacher and a second one of the same config trained with the
#       second seed (KD.MULTI_TEACHER);
#   "curriculum": the benchmark's teacher, and images ordered by the same seed's vanilla student
#       at its first checkpoint (tools/score_images.py, TRAINER.CURRICULUM.SCORES).
# per architecture: the teacher config of each setting, and method -> (label, student config,
# teacher use)
ARCHS = {
    "faster_rcnn": {
        "teacher": {
            "cpu": SYN + "faster_rcnn_R_18_FPN128_long.yaml",
            "gpu": SYN + "faster_rcnn_R_50_FPN.yaml",
        },
        "num_classes_key": "MODEL.ROI_HEADS.NUM_CLASSES",
        "methods": {
            "vanilla": ("student R-18-FPN-64", SYN + "faster_rcnn_R_18_FPN.yaml", "none"),
            "l2": ("+ L2 imitation", SYN + "distill/l2_faster_rcnn_R50_to_R18.yaml", "teacher"),
            "ssim": ("+ SSIM", SYN + "distill/ssim_faster_rcnn_R50_to_R18.yaml", "teacher"),
            "ssim_structure": (
                "+ SSIM, structure term only",
                SYN + "distill/ssim_structure_faster_rcnn_R50_to_R18.yaml",
                "teacher",
            ),
            "soft_label": (
                "+ soft-label KD (RoI head)",
                SYN + "distill/soft_label_faster_rcnn_R50_to_R18.yaml",
                "teacher",
            ),
            "box": (
                "+ box distillation (RoI head)",
                SYN + "distill/box_faster_rcnn_R50_to_R18.yaml",
                "teacher",
            ),
            "l2_minmax": (
                "+ L2, min-max maps",
                SYN + "distill/l2_minmax_faster_rcnn_R50_to_R18.yaml",
                "teacher",
            ),
            "l2_channel": (
                "+ L2, standardised maps",
                SYN + "distill/l2_channel_faster_rcnn_R50_to_R18.yaml",
                "teacher",
            ),
            "ssim_stats": (
                "+ SSIM + channel stats/AdaIN",
                SYN + "distill/ssim_stats_faster_rcnn_R50_to_R18.yaml",
                "teacher",
            ),
            "curriculum_ssim": (
                "+ SSIM, curriculum",
                SYN + "distill/curriculum_ssim_faster_rcnn_R50_to_R18.yaml",
                "curriculum",
            ),
            "multi_ssim": (
                "+ SSIM, 2 teachers (gate)",
                SYN + "distill/multi_ssim_faster_rcnn_to_R18.yaml",
                "two_teachers",
            ),
            # issue 33's losses (CWD, MGD: mmrazor's weights; PKD: l2_channel's), untuned here
            "cwd": ("+ CWD", SYN + "distill/cwd_faster_rcnn_R50_to_R18.yaml", "teacher"),
            "mgd": ("+ MGD", SYN + "distill/mgd_faster_rcnn_R50_to_R18.yaml", "teacher"),
            "pkd": ("+ PKD", SYN + "distill/pkd_faster_rcnn_R50_to_R18.yaml", "teacher"),
            "self_frskd": (
                "self-distillation (FRSKD)",
                SYN + "distill/self_frskd_faster_rcnn_R18.yaml",
                "none",
            ),
            "lakd": (
                "+ LAKD (ResNet stages)",
                SYN + "distill/lakd_faster_rcnn_R50_to_R18.yaml",
                "teacher",
            ),
        },
    },
    "retinanet": {
        "teacher": {
            "cpu": SYN + "retinanet_R_18_FPN128_long.yaml",
            "gpu": SYN + "retinanet_R_50_FPN.yaml",
        },
        "num_classes_key": "MODEL.RETINANET.NUM_CLASSES",
        # from scratch on the CPU a RetinaNet R-18 student learns slowly: 0.58 AP after the
        # synthetic configs' 150 iterations, 2.62 AP after 300 (AdamW 1e-3, seed 1)
        "student_opts": {"cpu": ["SOLVER.MAX_ITER", "300", "SOLVER.STEPS", "(240, 280)"]},
        "methods": {
            "vanilla": ("student R-18-FPN-64", SYN + "retinanet_R_18_FPN.yaml", "none"),
            "l2": ("+ L2 imitation", SYN + "distill/l2_retinanet_R50_to_R18.yaml", "teacher"),
            "ssim": ("+ SSIM", SYN + "distill/ssim_retinanet_R50_to_R18.yaml", "teacher"),
            "ssim_structure": (
                "+ SSIM, structure term only",
                SYN + "distill/ssim_structure_retinanet_R50_to_R18.yaml",
                "teacher",
            ),
            "soft_label": (
                "+ soft-label KD",
                SYN + "distill/soft_label_retinanet_R50_to_R18.yaml",
                "teacher",
            ),
            "rm": ("+ RM", SYN + "distill/rm_retinanet_R50_to_R18.yaml", "teacher"),
            "pfi": ("+ PFI (L2)", SYN + "distill/pfi_retinanet_R50_to_R18.yaml", "teacher"),
            "rm_pfi": ("+ RM + PFI", SYN + "distill/rm_pfi_retinanet_R50_to_R18.yaml", "teacher"),
            "crosskd": ("+ CrossKD", SYN + "distill/crosskd_retinanet_R50_to_R18.yaml", "teacher"),
            "box": ("+ box distillation", SYN + "distill/box_retinanet_R50_to_R18.yaml", "teacher"),
            # scale-free lp baselines (KD.FEATURE.NORMALIZE): raw FPN features of a teacher
            # trained from scratch are large, and a raw L2 at weight 1 swamps the detection loss
            "l2_minmax": (
                "+ L2, min-max maps",
                SYN + "distill/l2_minmax_retinanet_R50_to_R18.yaml",
                "teacher",
            ),
            "l2_channel": (
                "+ L2, standardised maps",
                SYN + "distill/l2_channel_retinanet_R50_to_R18.yaml",
                "teacher",
            ),
            "pfi_channel": (
                "+ PFI (L2, standardised)",
                SYN + "distill/pfi_channel_retinanet_R50_to_R18.yaml",
                "teacher",
            ),
            "rm_pfi_channel": (
                "+ RM + PFI (standardised)",
                SYN + "distill/rm_pfi_channel_retinanet_R50_to_R18.yaml",
                "teacher",
            ),
            "pfi_ssim": (
                "+ PFI (SSIM)",
                SYN + "distill/pfi_ssim_retinanet_R50_to_R18.yaml",
                "teacher",
            ),
            "ssim_stats": (
                "+ SSIM + channel stats/AdaIN",
                SYN + "distill/ssim_stats_retinanet_R50_to_R18.yaml",
                "teacher",
            ),
            # issue 33's losses (CWD, MGD: mmrazor's weights; PKD: l2_channel's), untuned here
            "cwd": ("+ CWD", SYN + "distill/cwd_retinanet_R50_to_R18.yaml", "teacher"),
            "mgd": ("+ MGD", SYN + "distill/mgd_retinanet_R50_to_R18.yaml", "teacher"),
            "pkd": ("+ PKD", SYN + "distill/pkd_retinanet_R50_to_R18.yaml", "teacher"),
            "self_frskd": (
                "self-distillation (FRSKD)",
                SYN + "distill/self_frskd_retinanet_R18.yaml",
                "none",
            ),
            "lakd": (
                "+ LAKD (ResNet stages)",
                SYN + "distill/lakd_retinanet_R50_to_R18.yaml",
                "teacher",
            ),
        },
    },
}
# Issue 35's automatic weights (KD.AUTO_WEIGHT): "<method>_auto" is <method>'s run with the
# distillation weights calibrated over the first iterations (gradient norm FRACTION of the
# detection loss's, kd_det's default) instead of the config's hand-set KD.*.WEIGHT alone.
AUTO_WEIGHT_OF = ("l2", "ssim")
AUTO_WEIGHT_OPTS = ["KD.AUTO_WEIGHT.ENABLED", "True"]
for _arch in ARCHS.values():
    for _m in AUTO_WEIGHT_OF:
        _label, _config, _use = _arch["methods"][_m]
        _arch["methods"][_m + "_auto"] = (_label + ", automatic weights", _config, _use)
# overrides of a method's runs beyond its config
METHOD_OPTS = {m + "_auto": AUTO_WEIGHT_OPTS for m in AUTO_WEIGHT_OF}
# what a plain `--methods` default trains: the comparison (the later methods on request)
DEFAULT_METHODS = {
    "faster_rcnn": ["vanilla", "l2", "ssim"],
    "retinanet": ["vanilla", "l2", "ssim", "soft_label", "rm", "pfi", "rm_pfi"],
}
# overrides of each setting, applied to every run (students and teacher)
SETTINGS = {
    # the synthetic configs as they are: 150 iterations for students, batch 8, 128 px
    "cpu": [],
    # an estimate for one H100 (~0.05-0.1 s/it at batch 8, 128 px), not yet run there:
    # 15 runs x 1000 iterations plus evaluation in about 25 minutes
    "gpu": [
        "MODEL.DEVICE",
        "cuda",
        "DATALOADER.NUM_WORKERS",
        "4",
        "SOLVER.MAX_ITER",
        "1000",
        "SOLVER.STEPS",
        "(800, 950)",
        "SOLVER.WARMUP_ITERS",
        "100",
    ],
}
# the teacher's schedule relative to the students' in the GPU setting (the CPU teacher config has
# its own)
GPU_TEACHER_OPTS = ["SOLVER.MAX_ITER", "1500", "SOLVER.STEPS", "(1200, 1400)"]


# the L2 imitation baselines the verdict compares SSIM with
L2_BASELINES = ("l2", "l2_minmax", "l2_channel")


def summarize(values):
    """Mean, sample standard deviation and spread (max - min) of a list of floats."""
    return {
        "mean": statistics.fmean(values),
        "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        "spread": max(values) - min(values),
        "values": list(values),
    }


def dataset_opts(args, arch):
    """Overrides that point every run (and the teachers inside the students) at the chosen
    dataset."""
    if not args.train_dataset:
        return [], []
    opts = [
        "DATASETS.TRAIN",
        "('{}',)".format(args.train_dataset),
        "DATASETS.TEST",
        "('{}',)".format(args.test_dataset or args.train_dataset),
    ]
    num_classes = args.num_classes
    if num_classes is None:
        from detectron2.data import MetadataCatalog

        import kd_det.data  # noqa: F401  registers kd_det's datasets

        classes = MetadataCatalog.get(args.train_dataset).get("thing_classes")
        if not classes:
            raise SystemExit(
                "dataset {!r} has no thing_classes metadata here; pass --num-classes".format(
                    args.train_dataset
                )
            )
        num_classes = len(classes)
    key = ARCHS[arch]["num_classes_key"]
    return opts + [key, str(num_classes)], [key, str(num_classes)]


def run_benchmark(args):
    arch = ARCHS[args.arch]
    unknown = [m for m in args.methods if m not in arch["methods"]]
    if unknown:
        raise SystemExit(
            "unknown method(s) {} for {}; choose from {}".format(
                unknown, args.arch, sorted(arch["methods"])
            )
        )
    out_root = os.path.join(os.path.abspath(args.output_root), args.arch)
    data_opts, teacher_class_opts = dataset_opts(args, args.arch)
    common = SETTINGS[args.setting] + data_opts + list(args.opts)

    from kd_det.data import prepare_datasets  # imports Detectron2; after argument errors

    os.chdir(ROOT)
    prepare_datasets(
        [args.train_dataset, args.test_dataset]
        if args.train_dataset
        else ["kd_synthetic_train", "kd_synthetic_val"]
    )
    results = {}
    seconds = {}
    teacher_cfg = arch["teacher"][args.setting]
    teacher_weights = args.teacher_weights
    if teacher_weights:
        teacher_weights = os.path.abspath(teacher_weights)
        ap, seconds["teacher"] = train_and_evaluate(
            "teacher",
            teacher_cfg,
            os.path.join(out_root, "teacher_eval"),
            ["MODEL.WEIGHTS", teacher_weights] + common,
            reuse=args.reuse,
            eval_only=True,
            root=ROOT,
        )
    else:
        teacher_dir = os.path.join(out_root, "teacher")
        opts = (
            common
            + (GPU_TEACHER_OPTS if args.setting == "gpu" else [])
            + ["SEED", str(args.seeds[0])]
        )
        ap, seconds["teacher"] = train_and_evaluate(
            "teacher", teacher_cfg, teacher_dir, opts, reuse=args.reuse, root=ROOT
        )
        teacher_weights = os.path.join(teacher_dir, "model_final.pth")
    results["teacher"] = {
        "label": "teacher ({})".format(os.path.basename(teacher_cfg)),
        "runs": [ap],
    }

    teacher_opts = ["KD.TEACHER.CONFIG", teacher_cfg, "KD.TEACHER.WEIGHTS", teacher_weights]
    if teacher_class_opts:
        teacher_opts += ["KD.TEACHER.OPTS", repr(teacher_class_opts)]
    second_teacher = None
    if any(arch["methods"][m][2] == "two_teachers" for m in args.methods):
        if len(args.seeds) < 2:
            raise SystemExit(
                "the two-teacher method trains its second teacher with the second seed; "
                "give two seeds"
            )
        second_dir = os.path.join(out_root, "teacher_seed{}".format(args.seeds[1]))
        opts = (
            common
            + (GPU_TEACHER_OPTS if args.setting == "gpu" else [])
            + ["SEED", str(args.seeds[1])]
        )
        ap, seconds["teacher2"] = train_and_evaluate(
            "teacher2", teacher_cfg, second_dir, opts, reuse=args.reuse, root=ROOT
        )
        results["teacher2"] = {
            "label": "second teacher (seed {})".format(args.seeds[1]),
            "runs": [ap],
        }
        second_teacher = os.path.join(second_dir, "model_final.pth")
    student_common = (
        common[: len(SETTINGS[args.setting])]
        + arch.get("student_opts", {}).get(args.setting, [])
        + common[len(SETTINGS[args.setting]) :]
    )
    # every (method, seed) run after the teachers is independent of the others, except that a
    # curriculum run trains (or reuses) the vanilla run of its seed: those run last, one by one
    tasks = []
    for method in args.methods:
        label, config, use = arch["methods"][method]
        for seed in args.seeds:
            opts = student_common + METHOD_OPTS.get(method, []) + ["SEED", str(seed)]
            if use in ("teacher", "curriculum"):
                opts += teacher_opts
            if use == "two_teachers":
                opts += [
                    "KD.TEACHER.CONFIG",
                    "",
                    "KD.TEACHER.WEIGHTS",
                    "",
                    "KD.MULTI_TEACHER.CONFIGS",
                    repr([teacher_cfg, teacher_cfg]),
                    "KD.MULTI_TEACHER.WEIGHTS",
                    repr([teacher_weights, second_teacher]),
                ]
                if teacher_class_opts:
                    opts += ["KD.TEACHER.OPTS", repr(teacher_class_opts)]
            tasks.append((method, seed, config, use, opts))

    def run(task):
        method, seed, config, use, opts = task
        if use == "curriculum":
            opts = opts + [
                "TRAINER.CURRICULUM.SCORES",
                score_with_vanilla_snapshot(arch, out_root, seed, student_common, args.reuse),
            ]
        return train_and_evaluate(
            "{}/seed{}".format(method, seed),
            config,
            os.path.join(out_root, method, "seed{}".format(seed)),
            opts,
            reuse=args.reuse,
            root=ROOT,
        )

    independent = [t for t in tasks if t[3] != "curriculum"]
    done = {t[:2]: r for t, r in zip(independent, run_parallel(run, independent, args.jobs))}
    done.update((t[:2], run(t)) for t in tasks if t[3] == "curriculum")
    for method in args.methods:
        label, config, _ = arch["methods"][method]
        runs = []
        for seed in args.seeds:
            ap, seconds["{}/seed{}".format(method, seed)] = done[method, seed]
            runs.append(ap)
        results[method] = {"label": label, "config": config, "runs": runs}
    return results, seconds, teacher_cfg, teacher_weights


def run_parallel(function, items, jobs):
    """``[function(item) for item in items]``, ``jobs`` at a time (each run is a subprocess, so
    threads suffice).  The first failure is raised once every started run has ended."""
    if jobs <= 1:
        return [function(item) for item in items]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = [pool.submit(function, item) for item in items]
    return [f.result() for f in futures]


def score_with_vanilla_snapshot(arch, out_root, seed, common, reuse):
    """Score the training images with the vanilla student's first checkpoint of ``seed`` (trained if
    needed)."""
    import glob
    import subprocess

    vanilla_dir = os.path.join(out_root, "vanilla", "seed{}".format(seed))
    train_and_evaluate(
        "vanilla/seed{}".format(seed),
        arch["methods"]["vanilla"][1],
        vanilla_dir,
        common + ["SEED", str(seed)],
        reuse=True,
        root=ROOT,
    )
    snapshots = sorted(glob.glob(os.path.join(vanilla_dir, "model_0*.pth"))) or [
        os.path.join(vanilla_dir, "model_final.pth")
    ]
    scores = os.path.join(vanilla_dir, "scores.json")
    if not (reuse and os.path.isfile(scores)):
        subprocess.run(
            [
                sys.executable,
                os.path.join(ROOT, "tools", "score_images.py"),
                "--config-file",
                arch["methods"]["vanilla"][1],
                "--snapshot",
                snapshots[0],
                "--output",
                scores,
            ]
            + common,
            cwd=ROOT,
            check=True,
        )
    return scores


def table(results):
    """Markdown table of AP/AP50/AP75 mean ± std, spread, and the share of the teacher-student gap
    closed."""
    stats = {
        m: {k: summarize([r[k] for r in v["runs"]]) for k in ("AP", "AP50", "AP75")}
        for m, v in results.items()
    }
    teacher = stats["teacher"]["AP"]["mean"]
    vanilla = stats["vanilla"]["AP"]["mean"] if "vanilla" in stats else None
    lines = [
        "| method | seeds | AP (mean ± std) | AP spread | AP50 | AP75 | gap closed |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for m, v in results.items():
        s = stats[m]
        gap = ""
        if (
            vanilla is not None
            and m not in ("teacher", "teacher2", "vanilla")
            and teacher > vanilla
        ):
            gap = "{:.0f}%".format(100.0 * (s["AP"]["mean"] - vanilla) / (teacher - vanilla))
        lines.append(
            "| {} | {} | {:.2f} ± {:.2f} | {:.2f} | {:.2f} | {:.2f} | {} |".format(
                v["label"],
                len(v["runs"]),
                s["AP"]["mean"],
                s["AP"]["std"],
                s["AP"]["spread"],
                s["AP50"]["mean"],
                s["AP75"]["mean"],
                gap,
            )
        )
    return "\n".join(lines), stats


def verdict(stats):
    """Issue 6's target, checked: SSIM beats vanilla and L2 by more than the seed spread, closes >=
    40% of the gap."""
    if not all(m in stats for m in ("vanilla", "ssim")):
        return "Target not checked: it needs the vanilla and ssim rows."
    t, v, s = (stats[m]["AP"] for m in ("teacher", "vanilla", "ssim"))
    checks = [
        "SSIM {:.2f} vs vanilla {:.2f}: {} the larger spread ({:.2f})".format(
            s["mean"],
            v["mean"],
            "beyond" if s["mean"] - v["mean"] > max(s["spread"], v["spread"]) else "NOT beyond",
            max(s["spread"], v["spread"]),
        )
    ]
    # every L2 baseline run (raw, min-max or standardised maps): SSIM must beat each
    for name in [m for m in L2_BASELINES if m in stats]:
        l2 = stats[name]["AP"]
        checks.append(
            "SSIM vs {} {:.2f}: {} the larger spread ({:.2f})".format(
                name,
                l2["mean"],
                (
                    "beyond"
                    if s["mean"] - l2["mean"] > max(s["spread"], l2["spread"])
                    else "NOT beyond"
                ),
                max(s["spread"], l2["spread"]),
            )
        )
    if t["mean"] > v["mean"]:
        closed = (s["mean"] - v["mean"]) / (t["mean"] - v["mean"])
        checks.append(
            "gap closed {:.0f}% (target 40%: {})".format(
                100 * closed, "met" if closed >= 0.4 else "NOT met"
            )
        )
    else:
        checks.append("the teacher does not lead the vanilla student; no gap to close")
    return "; ".join(checks) + "."


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--arch", choices=sorted(ARCHS), default="faster_rcnn")
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        help="methods to train (default: {}; also: {})".format(
            DEFAULT_METHODS,
            {a: sorted(set(v["methods"]) - set(DEFAULT_METHODS[a])) for a, v in ARCHS.items()},
        ),
    )
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="cpu")
    parser.add_argument(
        "--teacher-weights", default="", help="use this trained teacher instead of training one"
    )
    parser.add_argument(
        "--train-dataset", default="", help="a registered dataset name (default: kd_synthetic)"
    )
    parser.add_argument("--test-dataset", default="")
    parser.add_argument(
        "--num-classes",
        type=int,
        default=None,
        help="class count of --train-dataset (default: from its thing_classes metadata)",
    )
    parser.add_argument("--output-root", default="output/bench_accuracy")
    parser.add_argument(
        "--reuse", action="store_true", help="skip runs whose model_final.pth and evaluation exist"
    )
    parser.add_argument("--json", default="", help="write the results here")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="student runs at a time (after the teacher). On CPUs each run then gets "
        "cores/jobs threads unless OMP_NUM_THREADS is set; on one GPU several small runs "
        "share it",
    )
    parser.add_argument(
        "opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides applied to every run"
    )
    args = parser.parse_args(argv)
    if args.methods is None:
        args.methods = list(DEFAULT_METHODS[args.arch])
    if len(args.seeds) < 2:
        print(
            "warning: with one seed the spread is 0 and says nothing about noise", file=sys.stderr
        )

    if args.jobs > 1 and "OMP_NUM_THREADS" not in os.environ:
        # the runs inherit it: N runs of all cores each would oversubscribe the machine
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // args.jobs))
    started = time.time()
    results, seconds, teacher_cfg, teacher_weights = run_benchmark(args)
    total = time.time() - started
    md, stats = table(results)
    summary = verdict(stats)
    print(
        "\nCOCO box AP, {} ({} setting, seeds {}), {:.1f} min:\n".format(
            args.arch, args.setting, args.seeds, total / 60
        )
    )
    print(md)
    print("\n" + summary)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "arch": args.arch,
                    "setting": args.setting,
                    "seeds": args.seeds,
                    "opts": args.opts,
                    "teacher_config": teacher_cfg,
                    "teacher_weights": teacher_weights,
                    "results": results,
                    "stats": stats,
                    "seconds": seconds,
                    "total_seconds": total,
                    "verdict": summary,
                    "machine": platform.platform(),
                    "cpus": os.cpu_count(),
                    "date": datetime.datetime.now().isoformat(timespec="minutes"),
                },
                f,
                indent=2,
            )


if __name__ == "__main__":
    main()

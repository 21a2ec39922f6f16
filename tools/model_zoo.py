#!/usr/bin/env python
"""
Release finished training runs as model-zoo students and write MODEL_ZOO.md from
their evaluation outputs (nothing typed by hand).

For each run folder (the output directory of tools/train_net.py or
tools/lazyconfig_train_net.py, holding config.yaml, model_final.pth and a metrics.json
with a COCO evaluation) the student is released with kd_det.release.student (student-only
checkpoint + vanilla Detectron2 config, yacs or LazyConfig as trained) to
RELEASE_DIR/<run name>/, and a table row gives its config, size (parameters, GFLOPs),
teacher, schedule, box AP and the checkpoint's SHA-256; ``--torchscript`` and ``--onnx`` add
each student exported to TorchScript / ONNX.

    tools/model_zoo.py output/demo/retinanet/student output/demo/retinanet/ssim_kd \\
        --release-dir release -o MODEL_ZOO.md
"""

import argparse
import os
import re
import sys


def _release(config, weights, dest):
    """
    Release a run; returns (row fields, its DistillationSummary, export paths, released config).
    The run is tools/train_net.py's (yacs config.yaml) or tools/lazyconfig_train_net.py's (a
    saved LazyConfig).
    """
    from kd_det.config.detector import detector_settings, load_detector_config, meta_architecture_of
    from kd_det.config.run import backbone_name, distillation_summary, training_schedule
    from kd_det.config.student import load_student_config
    from kd_det.release.student import release_student

    cfg = load_detector_config(config)  # a run's config.yaml: older runs' keys are renamed
    out = release_student(cfg, weights, dest)
    released = load_student_config(out["config"])
    settings = detector_settings(cfg)
    iterations, batch = ("?" if v is None else v for v in training_schedule(cfg))
    fields = {
        "meta_architecture": meta_architecture_of(cfg),
        "backbone": backbone_name(cfg),
        "schedule": "{} it x {} img".format(iterations, batch),
        "dataset": "{} / {}".format(
            ",".join(settings.train_datasets), ",".join(settings.test_datasets)
        ),
    }
    return fields, distillation_summary(cfg), out, released


def release_run(run_dir, release_dir, torchscript=False, onnx=False):
    """
    Export one run (with ``torchscript``/``onnx``, also its ``model.ts``/``model.onnx``);
    returns its table row as a dict. The run is tools/train_net.py's (yacs config.yaml)
    or tools/lazyconfig_train_net.py's (LazyConfig config.yaml).
    """
    from kd_det.release import deploy
    from kd_det.utils.metrics import last_box_ap, load_metrics, metric_series

    name = os.path.basename(os.path.normpath(run_dir))
    for f in ("config.yaml", "model_final.pth", "metrics.json"):
        if not os.path.isfile(os.path.join(run_dir, f)):
            raise FileNotFoundError(
                "{} has no {}: pass the OUTPUT_DIR of a finished, evaluated training run".format(
                    run_dir, f
                )
            )
    config = os.path.join(run_dir, "config.yaml")
    records = load_metrics(os.path.join(run_dir, "metrics.json"))
    ap = last_box_ap(records)
    dest = os.path.join(release_dir, name)
    fields, kd, out, released = _release(config, os.path.join(run_dir, "model_final.pth"), dest)
    complexity = _student_complexity(released, out["weights"], out["config"])
    if torchscript:
        deploy.export_torchscript(released, out["weights"], dest)
    if onnx:
        deploy.export_onnx(released, out["weights"], dest)
    meta_architecture = fields.pop("meta_architecture")
    methods, teacher = list(kd.methods), kd.teacher  # kd: kd_det.config.run.DistillationSummary
    _, teacher_ap = metric_series(
        records, "teacher/bbox/AP"
    )  # logged with KD.TEACHER.EVAL_BEFORE_TRAIN
    return dict(
        fields,
        **{
            "name": name,
            "arch": re.sub(r"^(Self)?Distill", "", meta_architecture),
            "distillation": " + ".join(methods) if methods else "none",
            "teacher": teacher,
            "teacher_ap": "{:.2f}".format(teacher_ap[-1]) if teacher and teacher_ap else "-",
            "ap": ap,
            "weights": out["weights"],
            "config": out["config"],
            "sha256": out["sha256"],
            "params": "{:.1f}".format(complexity["params_m"]) if complexity else "-",
            "gflops": "{:.2f}".format(complexity["gflops"]) if complexity else "-",
        }
    )


def _student_complexity(released, weights, config_path):
    """Parameters and GFLOPs of the released student (its config and weights), or None with a
    warning."""
    from kd_det.release.deploy import load_student
    from kd_det.utils.complexity import model_complexity

    model = load_student(released, weights, "cpu")
    try:
        return model_complexity(released, model)
    except (
        Exception
    ) as e:  # the test images may live on another machine: the row is still worth writing
        print(
            "warning: no flop count for {} ({}: {}); the row says '-'".format(
                config_path, type(e).__name__, e
            ),
            file=sys.stderr,
        )
        return None


def format_model_zoo(rows, source_note=""):
    lines = [
        "# kd_det model zoo",
        "",
        "Generated by `tools/model_zoo.py` from each run's evaluation (metrics.json) "
        "and exported checkpoint; do not edit by hand.{}".format(
            " " + source_note if source_note else ""
        ),
        "",
        "Each checkpoint is a student-only Detectron2 checkpoint; load it with vanilla Detectron2:",
        '`cfg = get_cfg(); cfg.merge_from_file("<release>/config.yaml"); model = build_model(cfg); '
        "DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)`; "
        "where config.yaml is a LazyConfig (a student "
        "trained with `tools/lazyconfig_train_net.py`): "
        '`cfg = LazyConfig.load("<release>/config.yaml"); '
        "model = instantiate(cfg.model); "
        "DetectionCheckpointer(model).load(cfg.train.init_checkpoint)`.",
        "",
        "Params and GFLOPs are the student's, counted as Detectron2's `tools/analyze_model.py` "
        "does (fvcore: a multiply-add is one flop), averaged over the first 5 test images "
        "at the test input size.",
        "",
        "| name | model | params (M) | GFLOPs | distillation | teacher config | teacher AP "
        "| schedule | train / test | box AP | AP50 | AP75 | sha256 (first 12) |",
        "|---|---|---:|---:|---|---|---:|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        lines.append(
            "| {name} | {arch} {backbone} | {params} | {gflops} | {distillation} | {teacher} "
            "| {teacher_ap} | {schedule} | {dataset} | "
            "{a:.2f} | {a50:.2f} | {a75:.2f} | `{sha}` |".format(
                a=r["ap"]["AP"],
                a50=r["ap"]["AP50"],
                a75=r["ap"]["AP75"],
                sha=r["sha256"][:12],
                **{
                    k: (("`{}`".format(v) if v else "-") if k == "teacher" else v)
                    for k, v in r.items()
                }
            )
        )
    return "\n".join(lines) + "\n"


# MODEL_ZOO.md's hand-written part (the paper settings and their published APs) starts at this line,
# and a rewrite of the file keeps it
KEPT_MARKER = "<!-- kept: tools/model_zoo.py rewrites the part above this line only -->"


def kept_part(path: str) -> str:
    """The part of the file ``path`` from :data:`KEPT_MARKER` on ("" without the file or marker)."""
    if not os.path.isfile(path):
        return ""
    with open(path) as f:
        text = f.read()
    at = text.find(KEPT_MARKER)
    return "\n" + text[at:] if at >= 0 else ""


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("runs", nargs="+", help="training OUTPUT_DIRs")
    parser.add_argument("--release-dir", default="release")
    parser.add_argument("-o", "--output", default="MODEL_ZOO.md")
    parser.add_argument(
        "--torchscript",
        action="store_true",
        help="also trace each student to model.ts (see tools/export_student.py --torchscript)",
    )
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="also export each student to model.onnx (see tools/export_student.py --onnx)",
    )
    parser.add_argument("--note", default="", help="a sentence on where the runs come from")
    from kd_det.checkpoint import add_trust_pickle_argument, trust_pickle_from_args

    add_trust_pickle_argument(parser)
    args = parser.parse_args(argv)
    trust_pickle_from_args(args.trust_pickle)
    rows = [release_run(r, args.release_dir, args.torchscript, args.onnx) for r in args.runs]
    kept = kept_part(args.output)
    with open(args.output, "w") as f:
        f.write(format_model_zoo(rows, args.note) + kept)
    print(
        "wrote {} ({} models; checkpoints under {})".format(
            args.output, len(rows), args.release_dir
        )
    )
    return rows


if __name__ == "__main__":
    main()

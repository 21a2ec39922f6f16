#!/usr/bin/env python
"""
Export a distilled student for release: a student-only Detectron2 checkpoint and
its own config, loadable by vanilla Detectron2 (``get_cfg().merge_from_file`` +
``build_model`` + ``DetectionCheckpointer``) with no kd_det import.

    tools/export_student.py \\
        --config-file configs/synthetic/distill/ssim_retinanet_R50_to_R18.yaml \\
        --weights output/synthetic/ssim_retinanet_R50_to_R18/model_final.pth \\
        --output-dir release/ssim_r18

With ``--torchscript`` it also writes ``model.ts``, the student traced with
Detectron2's ``TracingAdapter`` (one image in, boxes/scores/classes out; loads with
``torch.jit.load`` without Detectron2, in Python or C++), and ``torchscript.json``
(preprocessing, outputs, class names).  With ``--onnx`` it writes ``model.onnx`` (same
inputs and outputs; runs in ONNX Runtime without torch) and ``onnx.json``; it needs
``pip install -e '.[onnx]'``.  Each export is checked against the model on the sample
image and on two crops of other sizes, and fails if they disagree: detections matched one
to one within bounds derived from float32 rounding, where only ties at the score threshold,
the cap per image or in NMS may differ (``kd_det.release.deploy.match_detections``).

A LazyConfig student (``.py``, trained with tools/lazyconfig_train_net.py; overrides as
``key=value``) is released as its weights and a LazyConfig ``config.yaml`` whose model is
the plain student; ``--torchscript``/``--onnx`` take the test-time resize from its
``dataloader.test`` (one ``ResizeShortestEdge``).
"""

import argparse
import json


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file", required=True, help="the training config (yacs .yaml or LazyConfig .py)"
    )
    parser.add_argument(
        "--weights", required=True, help="the training checkpoint (model_final.pth)"
    )
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "--torchscript", action="store_true", help="also write model.ts (traced TorchScript)"
    )
    parser.add_argument(
        "--onnx", action="store_true", help="also write model.onnx (needs onnx and onnxruntime)"
    )
    parser.add_argument(
        "--opset",
        type=int,
        default=None,
        help="ONNX opset (default: kd_det.release.deploy.ONNX_OPSET)",
    )
    parser.add_argument(
        "--sample-image",
        default="",
        help="image to trace with (default: the first image of the first test set)",
    )
    parser.add_argument(
        "--device", default="cpu", help="device the TorchScript model runs on (cpu, cuda)"
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides used in training (KEY VALUE ..., or key=value for a .py)",
    )
    from kd_det.checkpoint import add_trust_pickle_argument, trust_pickle_from_args

    add_trust_pickle_argument(parser)
    args = parser.parse_args(argv)
    trust_pickle_from_args(args.trust_pickle)
    from kd_det.release import deploy

    if args.onnx:
        deploy._import_onnx()  # a missing package fails before any work, with the install command

    from kd_det.config.detector import load_detector_config
    from kd_det.config.student import load_student_config
    from kd_det.release.student import release_student

    cfg = load_detector_config(args.config_file, args.opts, opts_name="the command line")
    if args.torchscript or args.onnx:
        # a test resize the sidecar cannot describe fails before any file is written
        deploy.deploy_settings(cfg)
    out = release_student(cfg, args.weights, args.output_dir)
    # trace what was released: the student's own config, as vanilla Detectron2 loads it, and
    # its student-only weights
    released_cfg = load_student_config(out["config"])
    if args.torchscript:
        out.update(
            deploy.export_torchscript(
                released_cfg, out["weights"], args.output_dir, args.sample_image, args.device
            )
        )
    if args.onnx:
        exported = deploy.export_onnx(
            released_cfg,
            out["weights"],
            args.output_dir,
            args.sample_image,
            args.opset or deploy.ONNX_OPSET,
        )
        out.update(
            {
                "onnx": exported["onnx"],
                "onnx_metadata": exported["metadata"],
                "onnx_sha256": exported["sha256"],
                "onnx_checked": exported["checked"],
            }
        )
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()

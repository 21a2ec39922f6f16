#!/usr/bin/env python
"""
Where does the student's feature imitation loss come from?  For a few images of a
dataset, draw per imitated FPN level the teacher's and the (adapted) student's features,
the loss map of ``KD.FEATURE.LOSS`` (for SSIM: (1 - SSIM) / 2, averaged over channels)
and, for RetinaNet with ``KD.PFI``, the prediction-guided weights; write the per-level
losses to summary.json and print their mean.

    tools/visualize_distillation.py \\
        --config-file configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml \\
        --weights output/synthetic/distill/ssim_faster_rcnn_R50_to_R18/model_final.pth \\
        --output-dir vis
    tools/visualize_distillation.py --config-file CFG.py --weights W \\
        --dataset kd_synthetic_train --num-images 8 \\
        --output-dir vis model.feature_distiller.loss._target_=kd_det.losses.L2FeatureLoss

The weights are a training checkpoint of the distillation config (they hold the student
and its adapters; the teacher is loaded from ``KD.TEACHER`` as in training).  Images are
those of ``--dataset`` (default: the config's first test set), resized as at test time,
with their ground-truth boxes drawn; the model runs in eval mode (BatchNorm running
statistics), one image at a time.
"""

import argparse
import json
import os


def _image_rgb(record, input_format):
    """(H, W, 3) uint8 RGB of a mapped record's ``image`` (C, H, W) tensor."""
    image = record["image"].permute(1, 2, 0).numpy()
    if input_format == "BGR":
        image = image[:, :, ::-1]
    return image.clip(0, 255).astype("uint8")


def draw(record, maps, input_format, path):
    """One PNG: the image with its boxes, then a row per level (teacher, student, loss[, PFI])."""
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    levels = maps["levels"]
    cols = 4 if any("pfi" in v for v in levels.values()) else 3
    fig, axes = plt.subplots(
        len(levels) + 1, cols, figsize=(3.0 * cols, 2.8 * (len(levels) + 1)), squeeze=False
    )
    for ax in axes.flat:
        ax.axis("off")
    axes[0, 0].imshow(_image_rgb(record, input_format))
    if "instances" in record:
        for x0, y0, x1, y1 in record["instances"].gt_boxes.tensor.tolist():
            axes[0, 0].add_patch(
                Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, color="lime", linewidth=1)
            )
    axes[0, 0].set_title(os.path.basename(record.get("file_name", "")), fontsize=8)
    axes[0, 1].text(
        0,
        0.5,
        "feature loss {:.4f}\n".format(maps["loss"])
        + "\n".join(
            "{}: {:.4f}".format(name, v.get("pfi_loss", v["loss_mean"]))
            for name, v in levels.items()
        ),
        fontsize=9,
        va="center",
        family="monospace",
    )
    loss_max = max(float(v["loss"].nan_to_num(0).max()) for v in levels.values()) or 1.0
    for row, (name, v) in enumerate(levels.items(), start=1):
        # each feature on its own scale: SSIM and the normalised lp losses compare structure, not
        # magnitude
        panels = [
            ("teacher", v["teacher"], "viridis", 0, None),
            ("student", v["student"], "viridis", 0, None),
            ("loss {:.4f}".format(v["loss_mean"]), v["loss"], "magma", 0, loss_max),
        ]
        if "pfi" in v:
            panels.append(("PFI weight", v["pfi"], "cividis", 0, None))
        for col, (title, value, cmap, lo, hi) in enumerate(panels):
            im = axes[row, col].imshow(value.numpy(), cmap=cmap, vmin=lo, vmax=hi)
            axes[row, col].set_title("{} {}".format(name, title), fontsize=8)
            fig.colorbar(im, ax=axes[row, col], fraction=0.046, pad=0.02)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file",
        required=True,
        help="the distillation config (yacs .yaml or LazyConfig .py)",
    )
    parser.add_argument(
        "--weights", required=True, help="a training checkpoint of that config (student + adapters)"
    )
    parser.add_argument(
        "--dataset",
        default="",
        help="registered dataset (default: the config's first test set), or a COCO-format one "
        "as NAME=JSON:IMAGE_DIR, registered for this run",
    )
    parser.add_argument("--num-images", type=int, default=4)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides (KEY VALUE ..., or key=value for a .py)",
    )
    from kd_det.checkpoint import add_trust_pickle_argument, trust_pickle_from_args

    add_trust_pickle_argument(parser)
    args = parser.parse_args(argv)
    trust_pickle_from_args(args.trust_pickle)
    if args.num_images < 1:
        raise SystemExit("--num-images must be at least 1")
    if not os.path.isfile(args.weights):
        raise SystemExit(
            "no checkpoint at {!r}: pass a training checkpoint of this config, e.g. its "
            "OUTPUT_DIR/model_final.pth".format(args.weights)
        )

    from kd_det.modeling.distill_maps import check_distillation_model, distillation_maps
    from kd_det.utils.snapshot import load_snapshot

    names = [args.dataset.split("=", 1)[0]] if args.dataset else None
    model, loader, names = load_snapshot(
        args.config_file,
        args.opts,
        args.weights,
        split="test",
        names=names,
        datasets=[args.dataset] if "=" in args.dataset else [],
    )
    if not names:
        raise SystemExit("the config has no test set: pass --dataset NAME")
    names = names[:1]
    try:
        check_distillation_model(model)
    except ValueError as e:
        raise SystemExit("{}: {}".format(args.config_file, e))
    adapters = getattr(getattr(model, "kd_feature", None), "adapters", None)
    if adapters is not None and len(adapters) and not _holds_adapters(args.weights):
        raise SystemExit(
            "{} has no kd_feature.adapters weights (a released student?), "
            "so the student's features would pass through untrained adapters: "
            "pass the training checkpoint (OUTPUT_DIR/model_final.pth)".format(args.weights)
        )
    model.eval()
    os.makedirs(args.output_dir, exist_ok=True)
    summary = {
        "config": args.config_file,
        "weights": os.path.abspath(args.weights),
        "dataset": names[0],
        "feature_loss": type(model.kd_feature.loss).__name__,
        "images": [],
    }
    for index, batch in enumerate(loader):
        if index == args.num_images:
            break
        record = batch[0]
        maps = distillation_maps(model, [record])[0]
        stem = "{:03d}_{}".format(
            index, os.path.splitext(os.path.basename(record.get("file_name", "image")))[0]
        )
        draw(record, maps, model.input_format, os.path.join(args.output_dir, stem + ".png"))
        summary["images"].append(
            {
                "file_name": record.get("file_name"),
                "image_id": record.get("image_id"),
                "png": stem + ".png",
                "loss": maps["loss"],
                "levels": {
                    k: {key: v[key] for key in ("loss_mean", "pfi_loss") if key in v}
                    for k, v in maps["levels"].items()
                },
            }
        )
    if not summary["images"]:
        raise SystemExit("dataset {} has no images".format(names[0]))
    with open(os.path.join(args.output_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)
    images = summary["images"]
    print("{} images of {} -> {}".format(len(images), names[0], args.output_dir))
    for level in images[0]["levels"]:
        mean = sum(im["levels"][level]["loss_mean"] for im in images) / len(images)
        print("  {:<6} mean loss {:.5f}".format(level, mean))
    print(
        "  feature loss (weighted, as loss_kd_*) mean {:.5f}".format(
            sum(im["loss"] for im in images) / len(images)
        )
    )
    return summary


def _holds_adapters(path):
    """Whether a Detectron2/kd_det checkpoint file has adapter weights."""
    from kd_det.checkpoint import read_checkpoint

    if not path.endswith(".pth"):
        return False
    state = read_checkpoint(path)
    state = state.get("model", state)
    return any(k.startswith("kd_feature.adapters.") for k in state)


if __name__ == "__main__":
    main()

#!/usr/bin/env python
"""
Score every training image with a student snapshot, for the instance-level curriculum
(``TRAINER.CURRICULUM``): the snapshot's loss on each image alone, lower = easier.

    tools/score_images.py \\
        --config-file configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml \\
        --snapshot output/snapshot/model_0000049.pth --output scores.json
    tools/score_images.py --config-file CFG --snapshot W --score distillation --output scores.json

The images are those of the config's DATASETS.TRAIN, resized as at test time and not
flipped, so scores do not depend on augmentation.  ``--score distillation`` needs a
distillation config (its teacher is loaded as in training).  A LazyConfig (``.py``,
``key=value`` overrides) gives ``dataloader.train``'s records and mapper, with
``dataloader.test``'s augmentations; its curriculum is the loader's sampler
(``kd_det.data.curriculum.curriculum_sampler``).
"""

import argparse
import json
import os


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--config-file", required=True, help="the training config (yacs .yaml or LazyConfig .py)"
    )
    parser.add_argument(
        "--snapshot", required=True, help="the student checkpoint that judges difficulty"
    )
    parser.add_argument(
        "--score", default="detection", choices=("detection", "distillation", "total")
    )
    parser.add_argument(
        "--output", required=True, help="scores JSON, for TRAINER.CURRICULUM.SCORES"
    )
    parser.add_argument(
        "opts",
        nargs=argparse.REMAINDER,
        help="config overrides (KEY VALUE ..., or key=value for a .py)",
    )
    from kd_det.checkpoint import add_trust_pickle_argument, trust_pickle_from_args
    from kd_det.data.coco_format import add_dataset_argument

    add_trust_pickle_argument(parser)
    add_dataset_argument(parser)
    args = parser.parse_args(argv)
    trust_pickle_from_args(args.trust_pickle)

    import torch

    from kd_det.engine.curriculum import score_images
    from kd_det.utils.snapshot import load_snapshot

    if not os.path.isfile(args.snapshot):
        raise SystemExit(
            "no snapshot at {!r}: train the student briefly (e.g. SOLVER.MAX_ITER 50) and pass its "
            "model_final.pth".format(args.snapshot)
        )
    torch.manual_seed(0)  # RoI sampling in two-stage losses is random
    model, loader, names = load_snapshot(
        args.config_file, args.opts, args.snapshot, split="train", datasets=args.dataset
    )
    scores = score_images(model, loader, args.score)
    out = {
        "scores": scores,
        "score": args.score,
        "snapshot": os.path.abspath(args.snapshot),
        "config": args.config_file,
        "datasets": names,
    }
    tmp = args.output + ".tmp"
    with open(tmp, "w") as f:
        json.dump(out, f)
    os.replace(tmp, args.output)
    values = sorted(scores.values())
    print(
        "scored {} images with {} loss: min {:.4f}, median {:.4f}, max {:.4f} -> {}".format(
            len(values), args.score, values[0], values[len(values) // 2], values[-1], args.output
        )
    )


if __name__ == "__main__":
    main()

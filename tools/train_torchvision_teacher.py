#!/usr/bin/env python
"""
Train a small torchvision detector on a registered Detectron2 dataset (default: kd_det's
synthetic ``kd_synthetic_train``) and save ``{"model": state_dict, "categories": [...]}``, the
weights a ``KD.TEACHER.CONFIG torchvision://NAME`` teacher reads from ``KD.TEACHER.WEIGHTS``.

    tools/train_torchvision_teacher.py --name fasterrcnn_resnet18_fpn \\
        --output output/synthetic/tv_fasterrcnn_resnet18_fpn.pth --iterations 300

Without ``--output`` it writes the file ``synthetic-teacher://NAME`` reads (what a synthetic
config trains on first use, with the default recipe), so a longer training replaces it.
"""

import argparse
import logging


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--name", default="fasterrcnn_resnet18_fpn", help="the detector's name")
    parser.add_argument("--dataset", default="kd_synthetic_train", help="a registered dataset")
    parser.add_argument("--output", default="", help="the weights file to write")
    parser.add_argument("--iterations", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--lr", type=float, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument(
        "--opts", nargs="*", default=[], help="builder arguments key=value (KD.TEACHER.OPTS)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)

    import dataclasses

    import kd_det  # noqa: F401  (registers the synthetic datasets)
    from kd_det.modeling.teacher.synthetic_teacher import (
        TeacherRecipe,
        save_torchvision_teacher,
        synthetic_teacher_path,
        train_torchvision_teacher,
    )
    from kd_det.modeling.teacher.torchvision_teacher import parse_builder_opts

    given = {
        "iterations": args.iterations,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "seed": args.seed,
    }
    recipe = dataclasses.replace(TeacherRecipe(), **{k: v for k, v in given.items() if v})
    checkpoint = train_torchvision_teacher(
        args.name, args.dataset, recipe, parse_builder_opts(args.opts)
    )
    path = save_torchvision_teacher(checkpoint, args.output or synthetic_teacher_path(args.name))
    print("saved {} ({} categories) to {}".format(args.name, len(checkpoint["categories"]), path))


if __name__ == "__main__":
    main()

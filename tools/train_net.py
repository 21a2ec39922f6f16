#!/usr/bin/env python
"""
Train or evaluate a detector, with or without distillation, the Detectron2 way.

    tools/train_net.py --config-file configs/synthetic/faster_rcnn_R_50_FPN.yaml
    tools/train_net.py --config-file configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml
    tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS out/model_final.pth
    tools/train_net.py --config-file CFG --resume
    tools/train_net.py --config-file CFG --num-gpus 8      # (CPU: processes on gloo)
    tools/train_net.py --config-file CFG --dry-run         # checks and one step; writes nothing

The trainer class is ``cfg.TRAINER.NAME`` (kd_det.engine.TRAINER_REGISTRY).
"""

import kd_det  # noqa: F401  # isort: skip  (first: kd_det/_compat.py, before Detectron2)
from detectron2.config import get_cfg
from detectron2.engine import default_argument_parser, default_setup
from detectron2.evaluation import verify_results
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from kd_det import merge_kd_config
from kd_det.checkpoint import add_trust_pickle_argument, trust_pickle_from_args
from kd_det.config.student import student_model_config
from kd_det.data import (
    add_dataset_argument,
    prepare_datasets,
    register_config_datasets,
    validate_registered_datasets,
)
from kd_det.data.empty import empty_dataset_errors
from kd_det.engine import get_trainer_class
from kd_det.engine.dry_run import add_dry_run_argument, dry_run
from kd_det.engine.launch import launch
from kd_det.evaluation import evaluator_name
from kd_det.release.student import StudentCheckpointer


def setup(args):
    cfg = merge_kd_config(get_cfg(), args.config_file, args.opts)
    # DATASETS.COCO_FORMAT and --dataset, registered in every process (workers too)
    register_config_datasets(cfg, getattr(args, "dataset", []))
    cfg.freeze()
    default_setup(cfg, args)
    # kd_det's own log lines (teacher, health monitor, automatic weights), as Detectron2's
    # projects set up theirs
    setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="kd_det")
    return cfg


def main(args):
    cfg = setup(args)
    trainer_cls = get_trainer_class(cfg)
    if args.eval_only:
        # the student alone: evaluating it needs neither the teacher nor its weights
        model = trainer_cls.build_model(student_model_config(cfg))
        checkpointer = StudentCheckpointer(model, save_dir=cfg.OUTPUT_DIR)
        checkpointer.pin(cfg.MODEL.WEIGHTS, cfg.MODEL.WEIGHTS_SHA256)
        checkpointer.resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
        res = trainer_cls.test(cfg, model)
        verify_results(cfg, res)
        return res
    with empty_dataset_errors():  # Detectron2's bare assertion -> the dataset, its file, the fixes
        trainer = trainer_cls(cfg)
    trainer.resume_or_load(resume=args.resume)
    return trainer.train()


def prepare(args):
    """
    Work done once, before any worker starts: generate kd_det's synthetic data if
    used, then check every COCO- and VOC-format dataset (DATASETS.VALIDATE; with "full"
    every image is decoded, in parallel and cached) so that bad data fails now, with the
    file and record to fix.
    """
    cfg = merge_kd_config(get_cfg(), args.config_file, args.opts)
    register_config_datasets(cfg, getattr(args, "dataset", []))
    # --eval-only reads only the test sets, which may be all a machine holds
    names = ([] if args.eval_only else list(cfg.DATASETS.TRAIN)) + list(cfg.DATASETS.TEST)
    prepare_datasets(names)
    if cfg.DATASETS.VALIDATE != "none":
        filtered = not args.eval_only and cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS
        validate_registered_datasets(
            names,
            check_images=cfg.DATASETS.VALIDATE == "full",
            voc_evaluated=[n for n in cfg.DATASETS.TEST if _evaluated_with_voc(cfg, n)],
            filter_empty=cfg.DATASETS.TRAIN if filtered else (),
        )


def _evaluated_with_voc(cfg, dataset_name: str) -> bool:
    try:
        return evaluator_name(cfg, dataset_name) == "pascal_voc"
    except ValueError:  # no kd_det evaluator: a custom trainer's build_evaluator decides
        return False


def cli(argv=None):
    parser = default_argument_parser()
    add_trust_pickle_argument(parser)
    add_dataset_argument(parser)  # --dataset NAME=JSON:IMAGE_DIR
    add_dry_run_argument(parser)
    args = parser.parse_args(argv)
    trust_pickle_from_args(args.trust_pickle)  # an environment variable: every worker sees it
    print("Command Line Args:", args)
    if args.dry_run:  # one process, whatever --num-gpus says
        return dry_run(args, prepare)
    prepare(args)
    return launch(
        main,
        args.num_gpus,
        num_machines=args.num_machines,
        machine_rank=args.machine_rank,
        dist_url=args.dist_url,
        args=(args,),
    )


if __name__ == "__main__":
    ret = cli()
    if isinstance(ret, int):  # the dry run's exit code
        raise SystemExit(ret)

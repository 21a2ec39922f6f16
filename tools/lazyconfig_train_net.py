#!/usr/bin/env python
"""
Train or evaluate a detector written as a Detectron2 LazyConfig (``.py``), distilled
(``model`` a kd_det meta-architecture with its teacher and distillers as arguments, see
:mod:`kd_det.modeling.lazy_student`) or plain (e.g. a teacher).

    tools/lazyconfig_train_net.py \\
        --config-file configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py
    tools/lazyconfig_train_net.py --config-file CFG model.feature_distiller.weight=1.0
    tools/lazyconfig_train_net.py --config-file CFG --eval-only \\
        train.init_checkpoint=out/model_final.pth
    tools/lazyconfig_train_net.py --config-file CFG --resume
    tools/lazyconfig_train_net.py --config-file CFG --num-gpus 8      # (CPU: processes on gloo)
    tools/lazyconfig_train_net.py --config-file CFG --dry-run   # checks and one step, no writes

The config has Detectron2's LazyConfig training keys: ``model``, ``dataloader.train``,
``dataloader.test``, ``dataloader.evaluator``, ``optimizer``, ``lr_multiplier`` and
``train`` (output_dir, init_checkpoint, max_iter, amp.enabled, ddp, checkpointer,
eval_period, log_period, device; and kd_det's, optional: grad_accum_steps, yacs
``SOLVER.GRAD_ACCUM_STEPS``; teacher_eval = dict(enabled=..., min_ap=...), yacs
``KD.TEACHER.EVAL_BEFORE_TRAIN``/``MIN_AP``; validate_datasets, yacs
``DATASETS.VALIDATE``, default "full"; skip_bad_images, yacs ``DATALOADER.SKIP_BAD_IMAGES``,
default False). Overrides are ``key=value``. Evaluation
builds the student alone: neither the teacher nor its weights are needed.
"""

import logging

import kd_det  # noqa: F401  # isort: skip  (first: kd_det/_compat.py, before Detectron2)
from detectron2.config import LazyConfig, instantiate
from detectron2.engine import default_argument_parser, default_setup, defaults, hooks
from detectron2.evaluation import inference_on_dataset, print_csv_format
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from kd_det.checkpoint import (
    AtomicDetectionCheckpointer,
    add_trust_pickle_argument,
    remove_leftover_temp_files,
    trust_pickle_from_args,
)
from kd_det.config.lazy import dataset_names, lazy_get
from kd_det.config.student import student_model_call
from kd_det.data import (
    add_dataset_argument,
    prepare_datasets,
    register_lazy_config_datasets,
    validate_registered_datasets,
)
from kd_det.data.bad_images import SkippedItemsHook
from kd_det.data.empty import empty_dataset_errors
from kd_det.engine import non_finite_loss_error
from kd_det.engine.curriculum import restart_curriculum
from kd_det.engine.dry_run import add_dry_run_argument, dry_run_lazy
from kd_det.engine.hooks import PeriodicCheckpointer
from kd_det.engine.launch import launch
from kd_det.engine.lazy import (
    build_lazy_trainer,
    lazy_distillation_hooks,
    lazy_teacher_eval_hook,
)
from kd_det.engine.resume import StepSeedHook, restart_data_stream, resumable_loader
from kd_det.release.student import StudentCheckpointer

logger = logging.getLogger("kd_det.lazyconfig_train_net")


def datasets_used(cfg, eval_only: bool = False):
    """The dataset names of ``dataloader.train`` (unless ``eval_only``) and ``dataloader.test``."""
    splits = ["test"] if eval_only else ["train", "test"]
    return [
        name
        for split in splits
        for name in dataset_names(lazy_get(cfg, "dataloader.{}.dataset.names".format(split)))
    ]


def do_test(cfg, model):
    if "evaluator" not in cfg.dataloader:
        return {}
    results = inference_on_dataset(
        model, instantiate(cfg.dataloader.test), instantiate(cfg.dataloader.evaluator)
    )
    if comm.is_main_process():
        print_csv_format(results)
    return results


def do_train(args, cfg):
    model = instantiate(cfg.model)
    logger.info("Model:\n{}".format(model))
    model.to(cfg.train.device)  # a distilled student's teachers follow it (DistillMixin._apply)

    cfg.optimizer.params.model = model
    optimizer = instantiate(cfg.optimizer)

    # looked up at call time: kd_det.engine.launch replaces it in CPU worker processes
    model = defaults.create_ddp_model(model, **cfg.train.ddp)
    # Detectron2's bare assertion on an empty training set -> the dataset, its file, the fixes
    with empty_dataset_errors("dataloader.train.dataset.filter_empty"):
        trainer = build_lazy_trainer(cfg, model, optimizer)  # with train.grad_accum_steps
    loader = resumable_loader(trainer)  # its seed and position are saved beside the trainer's
    streams = {"data_stream": loader} if loader is not None else {}
    checkpointer = AtomicDetectionCheckpointer(
        model, cfg.train.output_dir, trainer=trainer, **streams
    )
    checkpointer.pin(
        cfg.train.init_checkpoint,
        cfg.train.get("init_checkpoint_sha256", ""),
        "train.init_checkpoint",
        "train.init_checkpoint_sha256",
    )
    if comm.is_main_process():
        remove_leftover_temp_files(cfg.train.output_dir)  # left by saves of killed processes
    # train.checkpointer.max_to_keep counts the folder's checkpoints, those before a resume too
    periodic = dict(cfg.train.checkpointer)
    periodic["keep"] = periodic.pop("max_to_keep", None) or 0
    trainer.register_hooks(
        [
            StepSeedHook(loader) if loader is not None else None,
            # train.teacher_eval: the model's teachers scored before the first step
            lazy_teacher_eval_hook(cfg),
            hooks.IterationTimer(),
            hooks.LRScheduler(scheduler=instantiate(cfg.lr_multiplier)),
            (PeriodicCheckpointer(checkpointer, **periodic) if comm.is_main_process() else None),
            hooks.EvalHook(cfg.train.eval_period, lambda: do_test(cfg, model)),
            # train.auto_weight, train.kd_monitor (yacs KD.AUTO_WEIGHT, KD.MONITOR)
            *lazy_distillation_hooks(cfg, model),
            # train.skip_bad_images: skipped items counted in metrics.json (before the writer)
            SkippedItemsHook() if lazy_get(cfg, "train.skip_bad_images", False) else None,
            (
                hooks.PeriodicWriter(
                    defaults.default_writers(cfg.train.output_dir, cfg.train.max_iter),
                    period=cfg.train.log_period,
                )
                if comm.is_main_process()
                else None
            ),
        ]
    )
    checkpointer.resume_or_load(cfg.train.init_checkpoint, resume=args.resume)
    start_iter = trainer.iter + 1 if args.resume and checkpointer.has_checkpoint() else 0
    restart_curriculum(
        trainer, start_iter
    )  # a curriculum sampler's stream continues where training resumes
    if loader is not None and start_iter > 0 and loader.position == 0:
        # a checkpoint without the stream's state (older kd_det): the batches its iteration implies
        loader.position = start_iter * int(lazy_get(cfg, "train.grad_accum_steps", 1))
    # a resumable loader continues from the checkpoint's position
    restart_data_stream(trainer, start_iter)
    try:
        trainer.train(start_iter, cfg.train.max_iter)
    except FloatingPointError as e:
        raise non_finite_loss_error(
            e,
            checkpointer,
            "Lower optimizer.lr or the distillers' "
            "weights (e.g. model.feature_distiller.weight)",
        ) from e


def load_config(args):
    """The LazyConfig of ``args.config_file`` with ``args.opts`` applied; missing training keys are
    an error."""
    cfg = LazyConfig.apply_overrides(LazyConfig.load(args.config_file), args.opts)
    register_lazy_config_datasets(cfg, getattr(args, "dataset", []))  # per process
    needed = (
        ("model", "dataloader", "train")
        if args.eval_only
        else ("model", "dataloader", "optimizer", "lr_multiplier", "train")
    )
    missing = [k for k in needed if k not in cfg]
    if missing:
        raise ValueError(
            "LazyConfig {!r} has no {}: {} needs {} (as Detectron2's configs/common: "
            "train.py, optim.py, schedules)".format(
                args.config_file,
                ", ".join(missing),
                "evaluation" if args.eval_only else "training",
                ", ".join(needed),
            )
        )
    return cfg


def main(args):
    cfg = load_config(args)
    default_setup(cfg, args)
    # kd_det's own log lines (teacher, health monitor, automatic weights), as Detectron2's
    # projects set up theirs
    setup_logger(output=cfg.train.output_dir, distributed_rank=comm.get_rank(), name="kd_det")
    if args.eval_only:
        # the student alone: evaluating it needs neither the teacher nor its weights
        model = instantiate(student_model_call(cfg.model))
        model.to(cfg.train.device)
        model = defaults.create_ddp_model(model)
        checkpointer = StudentCheckpointer(model)
        checkpointer.pin(
            cfg.train.init_checkpoint,
            cfg.train.get("init_checkpoint_sha256", ""),
            "train.init_checkpoint",
            "train.init_checkpoint_sha256",
        )
        checkpointer.load(cfg.train.init_checkpoint)
        return do_test(cfg, model)
    return do_train(args, cfg)


def prepare(args):
    """
    Once, before any worker starts: generate kd_det's synthetic data if used, and
    check the COCO- and VOC-format datasets the config names (``train.validate_datasets``,
    as yacs ``DATASETS.VALIDATE``: "full", the default, decodes every image too;
    "annotations"; "none").
    """
    cfg = load_config(args)
    names = datasets_used(cfg, args.eval_only)
    prepare_datasets(names)
    mode = lazy_get(cfg, "train.validate_datasets", "full")
    if mode not in ("full", "annotations", "none"):
        raise ValueError(
            "train.validate_datasets={!r}: use 'full', 'annotations' or 'none'".format(mode)
        )
    if mode == "none":
        return
    # get_detection_dataset_dicts drops images without annotations unless told not to
    filtered = not args.eval_only and lazy_get(cfg, "dataloader.train.dataset.filter_empty", True)
    validate_registered_datasets(
        names,
        check_images=mode == "full",
        filter_empty=(
            dataset_names(lazy_get(cfg, "dataloader.train.dataset.names")) if filtered else ()
        ),
        filter_key="dataloader.train.dataset.filter_empty",
    )


def cli(argv=None):
    parser = default_argument_parser()
    add_trust_pickle_argument(parser)
    add_dataset_argument(parser)  # --dataset NAME=JSON:IMAGE_DIR
    add_dry_run_argument(parser)
    args = parser.parse_args(argv)
    trust_pickle_from_args(args.trust_pickle)  # an environment variable: every worker sees it
    bad = [o for o in args.opts if "=" not in o]
    if bad:
        parser.error(
            "LazyConfig overrides are key=value (e.g. train.max_iter=1000), "
            "not yacs KEY VALUE pairs; got {!r}".format(bad[0])
        )
    print("Command Line Args:", args)
    if args.dry_run:  # one process, whatever --num-gpus says
        return dry_run_lazy(args, load_config, prepare)
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

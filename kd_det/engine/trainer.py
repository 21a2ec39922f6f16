"""Trainers, chosen by ``cfg.TRAINER.NAME`` from :data:`TRAINER_REGISTRY`."""

import logging

import torch
from detectron2.data import DatasetMapper, build_detection_train_loader
from detectron2.engine import DefaultTrainer, hooks
from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils import comm
from detectron2.utils.registry import Registry

from ..checkpoint import AtomicDetectionCheckpointer, remove_leftover_temp_files
from ..data.bad_images import BadImageMapper, SkippedItemsHook
from ..data.curriculum import CurriculumSampler, load_scores
from ..data.stream import (
    INDEX_STREAM_REGISTRY,
    build_resumable_train_loader,
    train_dataset_dicts,
)
from ..evaluation import build_evaluator
from .accumulation import GradientAccumulationTrainer, micro_batch_cfg
from .auto_weight import build_auto_weight_hook
from .curriculum import restart_curriculum
from .health import build_health_monitor
from .hooks import PeriodicCheckpointer, teacher_eval_hook
from .resume import StepSeedHook, restart_data_stream, resumable_loader

__all__ = ["TRAINER_REGISTRY", "KDTrainer", "get_trainer_class", "non_finite_loss_error"]

logger = logging.getLogger(__name__)

TRAINER_REGISTRY = Registry("KD_TRAINER")
TRAINER_REGISTRY.__doc__ = """
Trainer classes (subclasses of Detectron2's DefaultTrainer), selected by ``cfg.TRAINER.NAME``.
Register new ones with ``@TRAINER_REGISTRY.register()``.
"""


@TRAINER_REGISTRY.register()
class KDTrainer(DefaultTrainer):
    """
    Detectron2's DefaultTrainer with kd_det's evaluator registry, crash-safe
    checkpoints (:class:`AtomicDetectionCheckpointer`), ``SOLVER.OPTIMIZER``,
    ``SOLVER.GRAD_ACCUM_STEPS`` (:class:`GradientAccumulationTrainer`) and the
    teacher evaluated before training (``KD.TEACHER.EVAL_BEFORE_TRAIN``), at most
    ``SOLVER.CHECKPOINT_KEEP`` periodic checkpoints, and an exact ``--resume``: the data
    stream (:mod:`kd_det.data.stream`) and each step's random state continue where the
    checkpoint stopped.

    Distillation needs nothing else here: the teacher lives inside the model
    (not as a submodule), so optimizer, checkpointer, DDP and hooks see only the
    student; every ``loss_kd_*`` term is logged like any other loss.
    """

    def __init__(self, cfg):
        micro_batch_cfg(cfg)  # a batch that does not split is an error before anything is built
        super().__init__(cfg)
        if cfg.SOLVER.GRAD_ACCUM_STEPS > 1:
            self._trainer = GradientAccumulationTrainer(
                self._trainer, cfg.SOLVER.GRAD_ACCUM_STEPS, amp=cfg.SOLVER.AMP.ENABLED
            )

    def build_hooks(self):
        # DefaultTrainer made self.checkpointer just before calling this; the hooks
        # (PeriodicCheckpointer) must get the crash-safe one, with the same state.
        old = self.checkpointer
        self.checkpointer = AtomicDetectionCheckpointer(
            old.model, old.save_dir, save_to_disk=old.save_to_disk, **old.checkpointables
        )
        self.checkpointer.pin(self.cfg.MODEL.WEIGHTS, self.cfg.MODEL.WEIGHTS_SHA256)
        ret = [self._keeping(h) for h in super().build_hooks()]
        teacher_eval = teacher_eval_hook(self.cfg)
        if teacher_eval is not None:
            ret.insert(0, teacher_eval)
        if self.cfg.DATALOADER.SKIP_BAD_IMAGES:
            ret.insert(0, SkippedItemsHook())  # before the writers: its count is in their line
        loader = resumable_loader(self._trainer)
        if loader is not None:
            ret.insert(0, StepSeedHook(loader))  # first: every before_step sees the seeded state
        return self._with_distillation_hooks(ret)

    def _with_distillation_hooks(self, ret):
        # After the evaluation (the monitor reads its AP), before the writers (which then write
        # the step's ratios and weights); the automatic weights rescale the loss dict before the
        # monitor measures it, so they come first.
        extra = [h for h in (build_auto_weight_hook(self.cfg), build_health_monitor(self.cfg)) if h]
        writers = [i for i, h in enumerate(ret) if isinstance(h, hooks.PeriodicWriter)]
        at = writers[0] if writers else len(ret)
        return ret[:at] + extra + ret[at:]

    def _keeping(self, hook):
        # Detectron2's PeriodicCheckpointer (main process only) -> kd_det's, which prunes
        if type(hook) is not hooks.PeriodicCheckpointer:
            return hook
        return PeriodicCheckpointer(
            hook.checkpointer, hook.period, keep=self.cfg.SOLVER.CHECKPOINT_KEEP
        )

    def state_dict(self):
        # Detectron2 v0.6's DefaultTrainer leaves out its inner SimpleTrainer, so the
        # optimizer state (momentum, AdamW moments) was not checkpointed and --resume
        # restarted it; later Detectron2 versions save it under the same key.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        loader = resumable_loader(self._trainer)
        if loader is not None:
            ret["data_stream"] = loader.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])
        loader = resumable_loader(self._trainer)
        if loader is None:
            return
        # the micro-batches the saved iteration implies: what a checkpoint without the
        # stream's state (older kd_det), or of another batch or process count, resumes at
        consumed = (self.iter + 1) * self.cfg.SOLVER.GRAD_ACCUM_STEPS
        if "data_stream" in state_dict:
            loader.load_state_dict(state_dict["data_stream"], expected_position=consumed)
        else:
            logger.warning(
                "The checkpoint has no data-stream state (saved by an older kd_det): the "
                "stream continues at batch {}, not where the interrupted run was".format(consumed)
            )
            loader.position = consumed

    @classmethod
    def build_train_loader(cls, cfg):
        """
        A loader of ``SOLVER.IMS_PER_BATCH / SOLVER.GRAD_ACCUM_STEPS`` images per step:
        a :class:`~kd_det.data.stream.ResumableTrainLoader` for Detectron2's
        ``TrainingSampler`` and ``RepeatFactorTrainingSampler`` (``DATALOADER.SAMPLER_TRAIN``);
        Detectron2's own for other samplers, and with ``TRAINER.CURRICULUM.ENABLED`` with a
        :class:`CurriculumSampler`.
        Their mapper names a bad image's file and dataset, or skips it
        (``DATALOADER.SKIP_BAD_IMAGES``, :class:`BadImageMapper`).
        """
        images_per_iter = cfg.SOLVER.IMS_PER_BATCH  # per optimizer step, all micro-batches together
        cfg = micro_batch_cfg(cfg)
        mapper = BadImageMapper(
            DatasetMapper(cfg, True),
            cfg.DATASETS.TRAIN,
            cfg.DATALOADER.SKIP_BAD_IMAGES,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
        )
        if not cfg.TRAINER.CURRICULUM.ENABLED:
            if cfg.DATALOADER.SAMPLER_TRAIN in INDEX_STREAM_REGISTRY:
                return build_resumable_train_loader(cfg, mapper=mapper)
            logger.info(
                "DATALOADER.SAMPLER_TRAIN={} has no resumable stream: --resume restarts its "
                "data stream".format(cfg.DATALOADER.SAMPLER_TRAIN)
            )
            return build_detection_train_loader(cfg, mapper=mapper)
        # the same records, in the same order, that Detectron2's loader would use
        dataset = train_dataset_dicts(cfg)
        cur = cfg.TRAINER.CURRICULUM
        sampler = CurriculumSampler(
            load_scores(cur.SCORES, dataset),
            cur.PHASE_ITERS,
            cur.PHASE_FRACTIONS,
            images_per_iter,
            seed=cfg.SEED if cfg.SEED >= 0 else None,
        )
        return build_detection_train_loader(cfg, dataset=dataset, sampler=sampler, mapper=mapper)

    def resume_or_load(self, resume=True):
        if comm.is_main_process():
            # temporary files of saves that a killed process left behind
            remove_leftover_temp_files(self.cfg.OUTPUT_DIR)
        super().resume_or_load(resume=resume)
        # the curriculum depends on the iteration: restart its stream where training resumes
        restart_curriculum(self._trainer, self.start_iter)
        restart_data_stream(self._trainer, self.start_iter)  # at the checkpoint's position

    def run_step(self):
        try:
            super().run_step()
        except FloatingPointError as e:
            raise non_finite_loss_error(e, self.checkpointer) from e

    @classmethod
    def build_evaluator(cls, cfg, dataset_name, output_folder=None):
        return build_evaluator(cfg, dataset_name, output_folder)

    @classmethod
    def build_optimizer(cls, cfg, model):
        """
        ``cfg.SOLVER.OPTIMIZER``: "SGD" (Detectron2's own) or "AdamW" (same parameter
        groups, weight decay and gradient clipping; momentum is unused).  AdamW lets
        the from-scratch synthetic configs learn in a CPU-sized number of iterations.
        """
        name = cfg.SOLVER.OPTIMIZER
        if name == "SGD":
            return build_sgd_optimizer(cfg, model)
        if name != "AdamW":
            raise ValueError("unknown SOLVER.OPTIMIZER {!r}; use 'SGD' or 'AdamW'".format(name))
        params = get_default_optimizer_params(
            model,
            base_lr=cfg.SOLVER.BASE_LR,
            weight_decay=cfg.SOLVER.WEIGHT_DECAY,
            weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
            bias_lr_factor=cfg.SOLVER.BIAS_LR_FACTOR,
            weight_decay_bias=cfg.SOLVER.WEIGHT_DECAY_BIAS,
        )
        return maybe_add_gradient_clipping(cfg, torch.optim.AdamW)(params, lr=cfg.SOLVER.BASE_LR)


def non_finite_loss_error(
    error: FloatingPointError,
    checkpointer,
    fixes: str = "Lower SOLVER.BASE_LR or the KD.* " "weights, or enable SOLVER.CLIP_GRADIENTS",
) -> FloatingPointError:
    """
    Detectron2's non-finite-loss error, saying what was kept and what to do. Detectron2
    raises it before optimizer.step(): the weights are those of the last good step, and
    every checkpoint on disk predates the bad loss.
    """
    last = checkpointer.get_checkpoint_file() if checkpointer.has_checkpoint() else "none yet"
    return FloatingPointError(
        "{}\nA loss term above is not finite (NaN/inf); training stopped before the optimizer "
        "step. Last complete checkpoint: {}. {}, then continue with --resume.".format(
            error, last, fixes
        )
    )


def get_trainer_class(cfg):
    """The trainer class named by ``cfg.TRAINER.NAME``, with a clear error for unknown names."""
    try:
        return TRAINER_REGISTRY.get(cfg.TRAINER.NAME)
    except KeyError:
        raise KeyError(
            "unknown TRAINER.NAME {!r}; registered trainers: {}".format(
                cfg.TRAINER.NAME, sorted(k for k, _ in TRAINER_REGISTRY)
            )
        ) from None

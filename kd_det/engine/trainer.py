"""Trainers, chosen by ``cfg.TRAINER.NAME`` from :data:`TRAINER_REGISTRY`."""

import torch
from detectron2.data import DatasetMapper, build_detection_train_loader, get_detection_dataset_dicts
from detectron2.engine import DefaultTrainer
from detectron2.solver import build_optimizer as build_sgd_optimizer
from detectron2.solver.build import get_default_optimizer_params, maybe_add_gradient_clipping
from detectron2.utils.registry import Registry

from ..checkpoint import AtomicDetectionCheckpointer
from ..data.bad_images import BadImageMapper, SkippedItemsHook
from ..data.curriculum import CurriculumSampler, load_scores
from ..evaluation import build_evaluator
from .accumulation import GradientAccumulationTrainer, micro_batch_cfg
from .curriculum import restart_curriculum
from .hooks import teacher_eval_hook

__all__ = ["TRAINER_REGISTRY", "KDTrainer", "get_trainer_class", "non_finite_loss_error"]

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
    teacher evaluated before training (``KD.TEACHER.EVAL_BEFORE_TRAIN``).

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
        hooks = super().build_hooks()
        teacher_eval = teacher_eval_hook(self.cfg)
        if teacher_eval is not None:
            hooks.insert(0, teacher_eval)
        if self.cfg.DATALOADER.SKIP_BAD_IMAGES:
            hooks.insert(0, SkippedItemsHook())  # before the writers: its count is in their line
        return hooks

    def state_dict(self):
        # Detectron2 v0.6's DefaultTrainer leaves out its inner SimpleTrainer, so the
        # optimizer state (momentum, AdamW moments) was not checkpointed and --resume
        # restarted it; later Detectron2 versions save it under the same key.
        ret = super().state_dict()
        ret["_trainer"] = self._trainer.state_dict()
        return ret

    def load_state_dict(self, state_dict):
        super().load_state_dict(state_dict)
        if "_trainer" in state_dict:
            self._trainer.load_state_dict(state_dict["_trainer"])

    @classmethod
    def build_train_loader(cls, cfg):
        """
        Detectron2's loader, of ``SOLVER.IMS_PER_BATCH / SOLVER.GRAD_ACCUM_STEPS`` images
        per step; with ``TRAINER.CURRICULUM.ENABLED`` its sampler is a :class:`CurriculumSampler`.
        Its mapper names a bad image's file and dataset, or skips it
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
            return build_detection_train_loader(cfg, mapper=mapper)
        # the same records, in the same order, that Detectron2's loader would use
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN,
            filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS,
            min_keypoints=(
                cfg.MODEL.ROI_KEYPOINT_HEAD.MIN_KEYPOINTS_PER_IMAGE if cfg.MODEL.KEYPOINT_ON else 0
            ),
            proposal_files=cfg.DATASETS.PROPOSAL_FILES_TRAIN if cfg.MODEL.LOAD_PROPOSALS else None,
        )
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
        super().resume_or_load(resume=resume)
        # the curriculum depends on the iteration: restart its stream where training resumes
        restart_curriculum(self._trainer, self.start_iter)

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

"""Pieces for training from Detectron2 LazyConfigs (``tools/lazyconfig_train_net.py``)."""

import copy
from typing import Iterable, Optional, Union

import torch
from detectron2.config import CfgNode, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.registry import locate

from ..config import get_kd_cfg
from ..modeling.lazy_student import kd_node
from ..config.lazy import dataset_names, is_call_of, lazy_get
from .accumulation import GradientAccumulationTrainer, micro_batch_size
from .hooks import TeacherEvalHook, teacher_eval_hook

__all__ = ["clipped_optimizer", "lazy_teacher_eval_hook", "build_lazy_trainer"]


def clipped_optimizer(optimizer_class: Union[str, type], params: Iterable, clip_type: str = "norm",
                      clip_value: float = 1.0, norm_type: float = 2.0, **optimizer_kwargs) -> torch.optim.Optimizer:
    """
    ``optimizer_class(params, **optimizer_kwargs)`` with Detectron2's gradient clipping
    (yacs ``SOLVER.CLIP_GRADIENTS``: "value" or "norm", per parameter), which a
    LazyConfig's ``optimizer`` otherwise cannot express::

        optimizer = L(clipped_optimizer)(optimizer_class="torch.optim.AdamW",
                                         params=L(get_default_optimizer_params)(), lr=1e-3,
                                         clip_type="norm", clip_value=5.0)

    Args:
        optimizer_class: a torch optimizer class, or its dotted name (which keeps the
            saved config.yaml loadable).
    """
    cls = locate(optimizer_class) if isinstance(optimizer_class, str) else optimizer_class
    if not (isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer)):
        raise ValueError("optimizer_class={!r} is not a torch.optim.Optimizer class".format(optimizer_class))
    if clip_type not in ("value", "norm"):
        raise ValueError("clip_type={!r}: Detectron2 clips gradients by 'value' or 'norm'".format(clip_type))
    clip = CfgNode({"SOLVER": {"CLIP_GRADIENTS": {"ENABLED": True, "CLIP_TYPE": clip_type,
                                                  "CLIP_VALUE": float(clip_value), "NORM_TYPE": float(norm_type)}}})
    return maybe_add_gradient_clipping(clip, cls)(params, **optimizer_kwargs)


def lazy_teacher_eval_hook(cfg) -> Optional[TeacherEvalHook]:
    """
    :func:`~kd_det.engine.hooks.teacher_eval_hook` for a LazyConfig student: the
    ``model.kd.TEACHER.EVAL_BEFORE_TRAIN``/``MIN_AP`` check on ``dataloader.test``'s
    sets (each teacher at its own test size, scored by the dataset's kd_det evaluator,
    logged as ``teacher/...`` in ``train.output_dir``'s metrics.json); None for a
    plain model or when not asked for.
    """
    kd = lazy_get(cfg, "model.kd")
    if kd is None:
        return None
    view = get_kd_cfg()
    view.KD = kd_node(kd, self_distillation=True)  # a self-distilled student's KD.SELF; it has no teachers
    view.DATASETS.TEST = dataset_names(lazy_get(cfg, "dataloader.test.dataset.names"))
    view.DATALOADER.NUM_WORKERS = int(lazy_get(cfg, "dataloader.test.num_workers", 0))
    view.OUTPUT_DIR = str(lazy_get(cfg, "train.output_dir", "./output"))
    view.freeze()
    return teacher_eval_hook(view)


def build_lazy_trainer(cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> SimpleTrainer:
    """
    The trainer of Detectron2's lazyconfig_train_net (``AMPTrainer`` with
    ``train.amp.enabled``, else ``SimpleTrainer``) over ``dataloader.train``; with
    ``train.grad_accum_steps`` = k > 1 (yacs ``SOLVER.GRAD_ACCUM_STEPS``), a
    :class:`GradientAccumulationTrainer` whose loader yields
    ``dataloader.train.total_batch_size / k`` images per step, so one iteration still
    sees the whole batch.  A ``curriculum_sampler`` of ``dataloader.train`` gets the
    images of one iteration.
    """
    steps = int(lazy_get(cfg, "train.grad_accum_steps", 1))
    loader_cfg = copy.deepcopy(cfg.dataloader.train)
    images_per_iter = int(loader_cfg.total_batch_size)
    if is_call_of(lazy_get(loader_cfg, "sampler"), "curriculum_sampler"):
        # the curriculum's phases count iterations: all micro-batches of one together
        loader_cfg.sampler.images_per_iter = images_per_iter
    if steps != 1:
        loader_cfg.total_batch_size = micro_batch_size(images_per_iter, steps, "dataloader.train.total_batch_size",
                                                       "train.grad_accum_steps")
    amp = bool(lazy_get(cfg, "train.amp.enabled", False))
    trainer = (AMPTrainer if amp else SimpleTrainer)(model, instantiate(loader_cfg), optimizer)
    return GradientAccumulationTrainer(trainer, steps, amp=amp) if steps > 1 else trainer

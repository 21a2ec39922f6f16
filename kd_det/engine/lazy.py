"""Pieces for training from Detectron2 LazyConfigs (``tools/lazyconfig_train_net.py``)."""

import copy
import functools
import sys
from typing import Dict, Iterable, Optional, Tuple, Union

import torch
from detectron2.config import CfgNode, LazyCall, instantiate
from detectron2.engine import AMPTrainer, SimpleTrainer
from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.utils.registry import locate

from ..config.lazy import dataset_names, is_call_of, lazy_get, single_short_edge, test_resizes
from ..data.bad_images import BadImageMapper
from ..data.stream import RepeatFactorPasses, build_resumable_train_loader
from .accumulation import GradientAccumulationTrainer, micro_batch_size
from .auto_weight import AutoWeightHook
from .health import DistillHealthMonitor, model_scheduled_terms
from .hooks import TeacherEvalHook, evaluate_teacher_on

__all__ = [
    "clipped_optimizer",
    "lazy_teacher_eval_hook",
    "evaluate_lazy_teacher",
    "build_lazy_trainer",
    "resumable_loader_call",
    "lazy_distillation_hooks",
    "lazy_settings",
]

# a LazyConfig's train.kd_monitor and train.auto_weight: yacs KD.MONITOR and KD.AUTO_WEIGHT
_MONITOR_DEFAULTS = dict(enabled=True, period=20, dominating=10.0, vanishing=1e-3, ap_drop=0.5)
_AUTO_WEIGHT_DEFAULTS = dict(enabled=False, fraction=0.5, iters=20)


def clipped_optimizer(
    optimizer_class: Union[str, type],
    params: Iterable,
    clip_type: str = "norm",
    clip_value: float = 1.0,
    norm_type: float = 2.0,
    **optimizer_kwargs
) -> torch.optim.Optimizer:
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
        raise ValueError(
            "optimizer_class={!r} is not a torch.optim.Optimizer class".format(optimizer_class)
        )
    if clip_type not in ("value", "norm"):
        raise ValueError(
            "clip_type={!r}: Detectron2 clips gradients by 'value' or 'norm'".format(clip_type)
        )
    clip = CfgNode(
        {
            "SOLVER": {
                "CLIP_GRADIENTS": {
                    "ENABLED": True,
                    "CLIP_TYPE": clip_type,
                    "CLIP_VALUE": float(clip_value),
                    "NORM_TYPE": float(norm_type),
                }
            }
        }
    )
    return maybe_add_gradient_clipping(clip, cls)(params, **optimizer_kwargs)


def _teacher_eval_settings(cfg) -> Tuple[bool, float, str]:
    """
    (enabled, min_ap, the min_ap key's name) of ``train.teacher_eval``.  A config of the
    deprecated ``kd={...}`` form (kd_det.modeling.lazy_student) says it in
    ``model.kd.TEACHER.EVAL_BEFORE_TRAIN``/``MIN_AP``, read here as the plain keys they are.
    """
    node = lazy_get(cfg, "train.teacher_eval")
    if node is not None:
        unknown = sorted(set(node.keys()) - {"enabled", "min_ap"})
        if unknown:
            raise ValueError(
                "train.teacher_eval takes enabled and min_ap (yacs "
                "KD.TEACHER.EVAL_BEFORE_TRAIN and MIN_AP), not {}".format(unknown)
            )
        return (
            bool(lazy_get(node, "enabled", False)),
            float(lazy_get(node, "min_ap", 0.0)),
            "train.teacher_eval.min_ap",
        )
    old = lazy_get(cfg, "model.kd.TEACHER")
    return (
        bool(lazy_get(old, "EVAL_BEFORE_TRAIN", False)),
        float(lazy_get(old, "MIN_AP", 0.0)),
        "model.kd.TEACHER.MIN_AP",
    )


def _lazy_test_size(cfg) -> Tuple[int, int]:
    """The student's test resize (dataloader.test's ResizeShortestEdge), else Detectron2's."""
    resize = test_resizes(cfg)
    short = single_short_edge(resize[0]) if resize else None
    if short is None:
        return 800, 1333
    return short, int(lazy_get(resize[0], "max_size", sys.maxsize))


def evaluate_lazy_teacher(cfg, teacher, output_dir: str) -> Dict[str, Dict]:
    """
    :func:`~kd_det.engine.hooks.evaluate_teacher_on` a LazyConfig student's test sets
    (``dataloader.test.dataset.names``), each scored by its ``dataloader.evaluator`` for
    that set, with its loader workers and (for a teacher without one) its test size.
    """
    names = dataset_names(lazy_get(cfg, "dataloader.test.dataset.names"))

    def build_evaluator(name: str, out: str):
        evaluator = copy.deepcopy(cfg.dataloader.evaluator)
        evaluator.dataset_name = name
        if "output_dir" in evaluator:  # COCOEvaluator's; others write nothing
            evaluator.output_dir = out
        return instantiate(evaluator)

    return evaluate_teacher_on(
        teacher,
        names,
        build_evaluator,
        output_dir,
        int(lazy_get(cfg, "dataloader.test.num_workers", 0)),
        _lazy_test_size(cfg),
    )


def lazy_teacher_eval_hook(cfg) -> Optional[TeacherEvalHook]:
    """
    The :class:`~kd_det.engine.hooks.TeacherEvalHook` that a LazyConfig's
    ``train.teacher_eval = dict(enabled=..., min_ap=...)`` asks for (yacs
    ``KD.TEACHER.EVAL_BEFORE_TRAIN``/``MIN_AP``; ``min_ap`` > 0 implies ``enabled``): every
    teacher of the built model (its ``teachers``, each at its own test size and input
    format) scored on ``dataloader.test``'s sets by ``dataloader.evaluator`` before the
    first step, logged as ``teacher/...`` in ``train.output_dir``'s metrics.json.  None
    when not asked for, or (without min_ap) there is no test set; a model without
    teachers evaluates none.

    Raises:
        ValueError when ``min_ap`` is set and there is no test set or evaluator to check it.
    """
    enabled, min_ap, min_ap_key = _teacher_eval_settings(cfg)
    if not (enabled or min_ap > 0):
        return None
    names = dataset_names(lazy_get(cfg, "dataloader.test.dataset.names"))
    has_evaluator = lazy_get(cfg, "dataloader.evaluator") is not None
    if min_ap > 0 and not (names and has_evaluator):
        raise ValueError(
            "{}={} is checked on the test sets (dataloader.test.dataset.names) with "
            "dataloader.evaluator, {}: name a test set and its evaluator, or set {} "
            "0".format(
                min_ap_key,
                min_ap,
                "which are empty" if not names else "which is missing",
                min_ap_key,
            )
        )
    if not (names and has_evaluator):
        return None
    keys = {
        "min_ap": min_ap_key,
        "teacher_config": "model.teacher.config",
        "input": "its config's input format and pixel mean/std",
    }
    return TeacherEvalHook(
        functools.partial(evaluate_lazy_teacher, cfg),
        str(lazy_get(cfg, "train.output_dir", "./output")),
        min_ap,
        keys,
    )


def build_lazy_trainer(
    cfg, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> SimpleTrainer:
    """
    The trainer of Detectron2's lazyconfig_train_net (``AMPTrainer`` with
    ``train.amp.enabled``, else ``SimpleTrainer``) over ``dataloader.train``; with
    ``train.grad_accum_steps`` = k > 1 (yacs ``SOLVER.GRAD_ACCUM_STEPS``), a
    :class:`GradientAccumulationTrainer` whose loader yields
    ``dataloader.train.total_batch_size / k`` images per step, so one iteration still
    sees the whole batch.  A ``curriculum_sampler`` of ``dataloader.train`` gets the
    images of one iteration. Detectron2's training loader becomes a resumable one
    (:func:`resumable_loader_call`). Its mapper names a bad image's file
    and dataset, or skips it with ``train.skip_bad_images`` (yacs ``DATALOADER.SKIP_BAD_IMAGES``,
    :class:`BadImageMapper`).
    """
    steps = int(lazy_get(cfg, "train.grad_accum_steps", 1))
    loader_cfg = resumable_loader_call(cfg.dataloader.train, int(lazy_get(cfg, "train.seed", -1)))
    images_per_iter = int(loader_cfg.total_batch_size)
    if is_call_of(lazy_get(loader_cfg, "sampler"), "curriculum_sampler"):
        # the curriculum's phases count iterations: all micro-batches of one together
        loader_cfg.sampler.images_per_iter = images_per_iter
    if steps != 1:
        loader_cfg.total_batch_size = micro_batch_size(
            images_per_iter, steps, "dataloader.train.total_batch_size", "train.grad_accum_steps"
        )
    if "mapper" in loader_cfg:  # a bad image's error names it, or it is skipped and counted
        loader_cfg.mapper = LazyCall(BadImageMapper)(
            mapper=loader_cfg.mapper,
            dataset_names=list(dataset_names(lazy_get(loader_cfg, "dataset.names"))),
            skip=bool(lazy_get(cfg, "train.skip_bad_images", False)),
            skip_key="train.skip_bad_images",
            filter_empty=bool(lazy_get(loader_cfg, "dataset.filter_empty", True)),
        )
    amp = bool(lazy_get(cfg, "train.amp.enabled", False))
    trainer = (AMPTrainer if amp else SimpleTrainer)(model, instantiate(loader_cfg), optimizer)
    return GradientAccumulationTrainer(trainer, steps, amp=amp) if steps > 1 else trainer


def resumable_loader_call(loader_cfg, seed: int = -1):
    """
    A copy of ``dataloader.train``; a ``build_detection_train_loader`` call whose sampler is
    the default (none) or a ``RepeatFactorTrainingSampler`` becomes the same call of
    :func:`~kd_det.data.stream.build_resumable_train_loader` with the run's ``seed``
    (``train.seed``), so that ``--resume`` continues its data stream exactly. Other loaders
    and samplers (a curriculum) are left as they are.
    """
    loader_cfg = copy.deepcopy(loader_cfg)
    if not is_call_of(loader_cfg, "build_detection_train_loader"):
        return loader_cfg
    sampler = lazy_get(loader_cfg, "sampler")
    if sampler is not None and not is_call_of(sampler, "RepeatFactorTrainingSampler"):
        return loader_cfg
    loader_cfg._target_ = build_resumable_train_loader
    if sampler is not None:
        loader_cfg.stream = LazyCall(RepeatFactorPasses)(repeat_factors=sampler.repeat_factors)
    loader_cfg.pop("sampler", None)
    loader_cfg.seed = seed
    return loader_cfg


def lazy_settings(cfg, key: str) -> Dict:
    """``train.kd_monitor`` or ``train.auto_weight`` of a LazyConfig, with the defaults."""
    defaults = {"train.kd_monitor": _MONITOR_DEFAULTS, "train.auto_weight": _AUTO_WEIGHT_DEFAULTS}[
        key
    ]
    node = lazy_get(cfg, key)
    given = dict(node) if node is not None else {}
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        raise ValueError("{} takes {}, not {}".format(key, sorted(defaults), unknown))
    return dict(defaults, **given)


def lazy_distillation_hooks(cfg, model: torch.nn.Module) -> list:
    """
    The automatic weights (``train.auto_weight = dict(enabled=..., fraction=..., iters=...)``,
    yacs ``KD.AUTO_WEIGHT``; off by default) and the health monitor (``train.kd_monitor =
    dict(enabled=..., period=..., dominating=..., vanishing=..., ap_drop=...)``, yacs
    ``KD.MONITOR``; on by default), in that order; a LAKD distiller's stage starts are read
    from the built ``model``.  Register them after the evaluation hook and before the writer.
    """
    auto = lazy_settings(cfg, "train.auto_weight")
    mon = lazy_settings(cfg, "train.kd_monitor")
    scheduled = model_scheduled_terms(model)
    hooks = []
    if auto.pop("enabled"):
        hooks.append(AutoWeightHook(start_iters=scheduled, **auto))
    if mon.pop("enabled"):
        hooks.append(DistillHealthMonitor(start_iters=scheduled, **mon))
    return hooks

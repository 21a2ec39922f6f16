"""
A distilled student written as a Detectron2 LazyConfig (``.py``), trained with
``tools/lazyconfig_train_net.py``.

In the config, a plain student model (``L(GeneralizedRCNN)(...)`` or
``L(RetinaNet)(...)``) becomes its distillation meta-architecture with
:func:`lazy_distilled_model`; the distillation settings are the keys of the yacs
``KD`` node, as a dict::

    model = lazy_distilled_model(
        student_model,
        kd={"TEACHER": {"CONFIG": "...", "WEIGHTS": "..."},
            "FEATURE": {"LOSS": "SSIMFeatureLoss", "WEIGHT": 2.0, "LEVEL_REDUCTION": "sum"}},
        train_datasets="${dataloader.train.dataset.names}",
    )

and ``model.kd.FEATURE.WEIGHT=1.0`` overrides them on the command line.  The model-level
``KD`` keys apply, and ``KD.TEACHER.EVAL_BEFORE_TRAIN``/``MIN_AP``, which
``tools/lazyconfig_train_net.py`` reads (:func:`kd_det.engine.lazy.lazy_teacher_eval_hook`).
The training keys (yacs ``TRAINER``, formerly ``KD.TRAINER``/``KD.CURRICULUM``) act on
tools/train_net.py's KDTrainer only, and a LazyConfig's curriculum is its loader's sampler
(:func:`kd_det.data.curriculum.curriculum_sampler`): both are refused here.  Old key names
are renamed as in a yacs config (:mod:`kd_det.config.renames`).  Teacher-free
self-distillation (FRSKD, ``KD.SELF``) is :func:`lazy_self_distilled_model`.
"""

import copy
from typing import Dict, Mapping, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY
from omegaconf import DictConfig, OmegaConf

from ..config import get_kd_cfg
from ..config.renames import RENAMED_KEYS, rename_config_dict
from .meta_arch import DistillMixin

__all__ = ["lazy_distilled_model", "build_distilled_model", "lazy_self_distilled_model", "build_self_distilled_model",
           "lazy_student_model", "kd_view_of_lazy_student", "kd_node"]

# KD keys that only the yacs training loop (KDTrainer, tools/train_net.py) reads (the old
# names of TRAINER.NAME and TRAINER.CURRICULUM), or whose meta-architecture (FRSKD
# self-distillation) is built from a yacs config only.
_YACS_ONLY_KEYS = ("TRAINER", "CURRICULUM", "SELF")
# where a LazyConfig says the same
_LAZY_FORM = {"CURRICULUM": " (in a LazyConfig the curriculum is the training loader's sampler: "
                            "dataloader.train.sampler = L(kd_det.data.curriculum.curriculum_sampler)(...))",
              "SELF": " (self-distillation, which has no teacher, is lazy_self_distilled_model(student, kd))"}


def _to_dict(node) -> Dict:
    if isinstance(node, DictConfig):
        return OmegaConf.to_container(node, resolve=True)
    return copy.deepcopy(dict(node))


def _dotted_keys(d: Mapping, prefix: str = ""):
    for k, v in d.items():
        yield prefix + str(k)
        if isinstance(v, Mapping):
            yield from _dotted_keys(v, prefix + str(k) + ".")


def _ints_as_floats(kd: Dict, defaults: CfgNode) -> Dict:
    """
    ``kd`` with an int where kd_det's default is a float made a float: yacs refuses the
    type change, but ``"WEIGHT": 2`` or ``model.kd.FEATURE.WEIGHT=1`` are what people write.
    """
    out = {}
    for key, value in kd.items():
        default = defaults.get(key, None) if isinstance(defaults, CfgNode) else None
        if isinstance(value, Mapping):
            value = _ints_as_floats(value, default)
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        out[key] = value
    return out


def kd_node(kd: Mapping, self_distillation: bool = False) -> CfgNode:
    """
    kd_det's default ``KD`` node with ``kd`` merged in; unknown and yacs-only keys are
    errors (``KD.SELF`` is taken for a ``self_distillation`` student).
    """
    kd = _to_dict(kd)
    refused = [k for k in _dotted_keys(kd) if k in _YACS_ONLY_KEYS and not (self_distillation and k == "SELF")]
    if refused:
        yacs_key = RENAMED_KEYS.get("KD." + refused[0], "KD." + refused[0])
        raise ValueError("kd={{...}} of a LazyConfig student sets KD.{}, which only "
                         "tools/train_net.py's KDTrainer reads (a yacs config's {}). Remove it{}, "
                         "or write the student as a yacs config".format(
                             refused[0], yacs_key, _LAZY_FORM.get(refused[0], "")))
    kd = rename_config_dict({"KD": kd}, source="kd={...} of a LazyConfig student")["KD"]
    node = get_kd_cfg().KD
    try:
        node.merge_from_other_cfg(CfgNode(_ints_as_floats(kd, node)))
    except (KeyError, ValueError) as e:
        raise ValueError("kd={{...}} of a LazyConfig student does not fit kd_det's KD keys ({}). It takes the keys "
                         "of the yacs KD node (kd_det/config/defaults.py), e.g. {{'TEACHER': {{'CONFIG': ..., 'WEIGHTS': ...}}, "
                         "'FEATURE': {{'LOSS': 'SSIMFeatureLoss'}}}}".format(e)) from e
    return node


def _distill_class(meta_architecture: str):
    try:
        cls = META_ARCH_REGISTRY.get(meta_architecture)
    except KeyError:
        cls = None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, DistillMixin)):
        names = sorted(k for k, c in META_ARCH_REGISTRY if isinstance(c, type) and issubclass(c, DistillMixin))
        raise ValueError("{!r} is not a kd_det distillation meta-architecture with a teacher; a LazyConfig student "
                         "is one of {}".format(meta_architecture, names))
    return cls


def _self_distill_class(meta_architecture: str):
    try:
        cls = META_ARCH_REGISTRY.get(meta_architecture)
    except KeyError:
        cls = None
    if cls is None or not hasattr(cls, "self_distill_kwargs"):
        names = sorted(k for k, c in META_ARCH_REGISTRY if hasattr(c, "self_distill_kwargs"))
        raise ValueError("{!r} is not a kd_det self-distillation meta-architecture; one of {}".format(
            meta_architecture, names))
    return cls


def _target_name(node) -> str:
    target = node.get("_target_", None) if hasattr(node, "get") else None
    if target is None:
        raise ValueError("lazy_distilled_model() takes the student's LazyCall, e.g. L(GeneralizedRCNN)(...), "
                         "got {}".format(type(node).__name__))
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else target.__name__


def lazy_distilled_model(student, kd: Mapping, train_datasets: Sequence[str] = (), meta_architecture: str = ""):
    """
    The LazyCall of the distilled student: ``student`` (a LazyCall of GeneralizedRCNN
    or RetinaNet, left unchanged) with the same arguments, built by
    :func:`build_distilled_model` as ``meta_architecture`` (default: "Distill" + the
    student's class, e.g. DistillRetinaNet).

    Args:
        kd: the ``KD`` settings, keyed as the yacs ``KD`` node (checked here, when the
            config loads).
        train_datasets: the student's training set names (a name, a list, or an
            interpolation such as "${dataloader.train.dataset.names}"), for
            ``KD.TEACHER.CHECK_CLASSES``.
    """
    name = _target_name(student)
    meta_architecture = meta_architecture or "Distill" + name
    cls = _distill_class(meta_architecture)
    if cls.student_meta_architecture != name:
        raise ValueError("meta_architecture {!r} distils a {} student, but the LazyCall builds a {}: leave "
                         "meta_architecture empty (Distill{}) or pass a {} student".format(
                             meta_architecture, cls.student_meta_architecture, name, name,
                             cls.student_meta_architecture))
    kd_node(kd)  # fail when the config loads, not after the student is built
    node = copy.deepcopy(student)
    node._target_ = build_distilled_model
    node.meta_architecture = meta_architecture
    node.kd = _to_dict(kd)
    node.train_datasets = train_datasets
    return node


# the self-teacher heads lazy_self_distilled_model adds: copies of the student's own
_SELF_HEADS = {"RetinaNet": ("head",), "GeneralizedRCNN": ("proposal_generator", "roi_heads")}


def lazy_self_distilled_model(student, kd: Mapping, meta_architecture: str = ""):
    """
    The LazyCall of a teacher-free self-distilled student (FRSKD, ``KD.SELF``):
    ``student`` (a LazyCall of GeneralizedRCNN or RetinaNet, left unchanged) built by
    :func:`build_self_distilled_model` as ``meta_architecture`` (default "SelfDistill" +
    the student's class).  The self-teacher's detection heads are copies of the
    student's own head LazyCalls (``self_head``; ``self_proposal_generator`` and
    ``self_roi_heads``), initialised on their own, so the refined maps keep the
    student's channels (``KD.SELF.WIDTH_MULTIPLIER`` 1.0).

    Args:
        kd: the ``KD`` settings, keyed as the yacs ``KD`` node: ``SELF`` and ``FEATURE``
            (``AttentionTransferLoss`` as in FRSKD, or ``SSIMFeatureLoss``).
    """
    name = _target_name(student)
    meta_architecture = meta_architecture or "SelfDistill" + name
    cls = _self_distill_class(meta_architecture)
    if cls.student_meta_architecture != name or name not in _SELF_HEADS:
        raise ValueError("meta_architecture {!r} self-distils a {} student, but the LazyCall builds a {}".format(
            meta_architecture, cls.student_meta_architecture, name))
    kd_node(kd, self_distillation=True)  # fail when the config loads
    node = copy.deepcopy(student)
    node._target_ = build_self_distilled_model
    node.meta_architecture = meta_architecture
    node.kd = _to_dict(kd)
    for head in _SELF_HEADS[name]:
        node["self_" + head] = copy.deepcopy(student[head])
    return node


def build_self_distilled_model(meta_architecture: str, kd: Mapping, **kwargs) -> torch.nn.Module:
    """
    The target of :func:`lazy_self_distilled_model`'s LazyCall: ``meta_architecture``
    (e.g. SelfDistillRetinaNet) from the student's built arguments, its self-teacher
    heads (``self_*``) and the self-teacher and feature target of ``kd``.
    """
    cls = _self_distill_class(meta_architecture)
    heads = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("self_")}
    cfg = kd_view_of_lazy_student(meta_architecture, kd, (), kwargs)
    return cls(**cls.self_distill_kwargs(cfg, dict(kwargs), **heads))


def kd_view_of_lazy_student(meta_architecture: str, kd: Mapping, train_datasets: Sequence[str],
                            student_kwargs: Mapping) -> CfgNode:
    """
    The yacs config kd_det's builders read, for a LazyConfig student: ``KD`` from
    ``kd``, and the few student settings they need (meta-architecture, class count,
    device, training sets), taken from the built arguments.
    """
    cfg = get_kd_cfg()
    cfg.KD = kd_node(kd, self_distillation=meta_architecture.startswith("SelfDistill"))
    cfg.MODEL.META_ARCHITECTURE = meta_architecture
    if "num_classes" in student_kwargs:  # RetinaNet
        cfg.MODEL.RETINANET.NUM_CLASSES = int(student_kwargs["num_classes"])
    else:
        cfg.MODEL.ROI_HEADS.NUM_CLASSES = int(student_kwargs["roi_heads"].num_classes)
    # a LazyConfig model is built on the CPU; the teacher follows the student's .to()
    params = list(student_kwargs["backbone"].parameters())
    cfg.MODEL.DEVICE = str(params[0].device) if params else "cpu"
    cfg.DATASETS.TRAIN = (train_datasets,) if isinstance(train_datasets, str) else tuple(train_datasets)
    cfg.freeze()
    return cfg


def build_distilled_model(meta_architecture: str, kd: Mapping, train_datasets: Sequence[str] = (),
                          **student_kwargs) -> torch.nn.Module:
    """
    The target of :func:`lazy_distilled_model`'s LazyCall: ``meta_architecture``
    (e.g. DistillGeneralizedRCNN) from the student's built arguments (backbone, heads,
    ...) and the teacher and distillation modules of ``kd``.
    """
    cls = _distill_class(meta_architecture)
    cfg = kd_view_of_lazy_student(meta_architecture, kd, train_datasets, student_kwargs)
    return cls(**cls.distill_kwargs(cfg, dict(student_kwargs)))


def lazy_student_model(model):
    """
    The LazyCall of the student alone (its plain meta-architecture, no teacher nor
    distillation modules) from a :func:`lazy_distilled_model` one: for evaluation and
    export, which need neither the teacher nor its weights. Other LazyCalls are
    returned unchanged.
    """
    target = model.get("_target_", None)
    builders = (build_distilled_model, build_self_distilled_model)
    if target not in builders and target not in [_qualname(b) for b in builders]:
        return model
    self_distilled = target in (build_self_distilled_model, _qualname(build_self_distilled_model))
    cls = (_self_distill_class if self_distilled else _distill_class)(model.meta_architecture)
    node = copy.deepcopy(model)
    for key in [k for k in node.keys() if k in ("meta_architecture", "kd", "train_datasets") or k.startswith("self_")]:
        del node[key]  # not pop(): it would resolve an interpolation that may point outside this node
    node._target_ = META_ARCH_REGISTRY.get(cls.student_meta_architecture)
    return node


def _qualname(fn) -> str:
    return fn.__module__ + "." + fn.__qualname__

"""
LazyConfig students: the deprecated ``kd={...}`` form of earlier kd_det versions (a
compatibility layer), and :data:`lazy_student_model`, the student alone of a distilled
model (:func:`kd_det.config.student.student_model_call`, kept here under its old name).

A LazyConfig student composes its distillation directly, as Detectron2's projects do: the
student's own LazyCall, retargeted to its distillation meta-architecture, with the
teacher and the distillers as further arguments (see ``configs/**/*_lazy.py``)::

    model = copy.deepcopy(student)            # L(GeneralizedRCNN)(...)
    model._target_ = DistillGeneralizedRCNN
    model.teacher = L(build_teacher)(config="teacher.yaml", weights="teacher.pth",
        expected_classes=L(thing_classes)(names="${dataloader.train.dataset.names}"))
    model.feature_distiller = L(FeatureDistiller)(levels=["p2", "p3", "p4", "p5", "p6"],
        student_channels=64, teacher_channels=128, loss=L(SSIMFeatureLoss)(), weight=2.0)

and ``model.feature_distiller.weight=1.0`` overrides one on the command line.  Arguments
are built in the order they are listed, so the teacher and distillers come after the
student's own (the yacs order, which sets the random initialisation).

**Compatibility layer (deprecated).** Before issue 31 a LazyConfig student was
``lazy_distilled_model(student, kd={...})`` (or :func:`lazy_self_distilled_model`), with
the distillation settings keyed as the yacs ``KD`` node, and its LazyCall targeted
:func:`build_distilled_model` / :func:`build_self_distilled_model`.  Runs saved such
configs (their ``config.yaml``, written by ``LazyConfig.save``) and users wrote such
``.py`` files, so these names still work, with one ``FutureWarning`` per process naming
the new form.  They translate ``kd`` into the explicit arguments through the yacs schema
they were written in: kd_det's default config merged with the dict (old key names renamed
by :mod:`kd_det.config.renames`), read by the meta-architecture's own yacs ``from_config``
pieces (``distill_kwargs`` / ``self_distill_kwargs``).  That is the one place outside a
``from_config`` that builds a yacs node for a LazyConfig, and it is only for this old form.
"""

import copy
import warnings
from typing import Dict, Mapping, Sequence

import torch
from detectron2.config import CfgNode
from detectron2.modeling import META_ARCH_REGISTRY
from omegaconf import DictConfig, OmegaConf

from ..config import get_kd_cfg
from ..config.renames import RENAMED_KEYS, rename_config_dict
from ..config.student import student_model_call
from .meta_arch import DistillMixin

__all__ = [
    "lazy_student_model",
    # the deprecated kd={...} form
    "lazy_distilled_model",
    "build_distilled_model",
    "lazy_self_distilled_model",
    "build_self_distilled_model",
    "kd_node",
]


#: The LazyCall of the student alone (:func:`kd_det.config.student.student_model_call`), for
#: evaluation, export and deployment, which need neither the teacher nor its weights: a
#: distillation meta-architecture's LazyCall (or the deprecated form's) with its vanilla
#: class as target and without the arguments only distillation takes.  Kept under this name
#: for LazyConfigs that import it from here.
lazy_student_model = student_model_call


# --- the deprecated kd={...} form -------------------------------------------------------

_NEW_FORM = (
    "compose the distillation directly, as configs/**/*_lazy.py do: "
    "model._target_ = DistillGeneralizedRCNN (or DistillRetinaNet, SelfDistill...); "
    "model.teacher = L(build_teacher)(config=..., weights=...); "
    "model.feature_distiller = L(FeatureDistiller)(...); and train.teacher_eval = "
    "dict(enabled=..., min_ap=...) for KD.TEACHER.EVAL_BEFORE_TRAIN/MIN_AP"
)
_WARNED = set()


def _warn_old_form() -> None:
    """One FutureWarning per process for the kd={...} form, whichever of its names is used."""
    if _WARNED:
        return
    _WARNED.add("kd")
    warnings.warn(
        "a LazyConfig student with kd={...} (kd_det.modeling.lazy_student."
        "lazy_distilled_model / build_distilled_model and their self-distillation "
        "twins) is deprecated and still builds; " + _NEW_FORM,
        FutureWarning,
        stacklevel=3,
    )


# KD keys that only the yacs training loop (KDTrainer, tools/train_net.py) reads (the old
# names of TRAINER.NAME and TRAINER.CURRICULUM), or whose meta-architecture (FRSKD
# self-distillation) is built from a yacs config only.
_YACS_ONLY_KEYS = ("TRAINER", "CURRICULUM", "SELF")
# where a LazyConfig says the same
_LAZY_FORM = {
    "CURRICULUM": " (in a LazyConfig the curriculum is the training loader's sampler: "
    "dataloader.train.sampler = L(kd_det.data.curriculum.curriculum_sampler)(...))",
    "SELF": " (self-distillation, which has no teacher, is lazy_self_distilled_model(student, kd))",
}


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
    The deprecated form's ``kd`` dict as kd_det's default ``KD`` node with it merged in;
    unknown and yacs-only keys are errors (``KD.SELF`` is taken for a
    ``self_distillation`` student).
    """
    kd = _to_dict(kd)
    refused = [
        k
        for k in _dotted_keys(kd)
        if k in _YACS_ONLY_KEYS and not (self_distillation and k == "SELF")
    ]
    if refused:
        yacs_key = RENAMED_KEYS.get("KD." + refused[0], "KD." + refused[0])
        raise ValueError(
            "kd={{...}} of a LazyConfig student sets KD.{}, which only "
            "tools/train_net.py's KDTrainer reads (a yacs config's {}). Remove it{}, "
            "or write the student as a yacs config".format(
                refused[0], yacs_key, _LAZY_FORM.get(refused[0], "")
            )
        )
    kd = rename_config_dict({"KD": kd}, source="kd={...} of a LazyConfig student")["KD"]
    node = get_kd_cfg().KD
    try:
        node.merge_from_other_cfg(CfgNode(_ints_as_floats(kd, node)))
    except (KeyError, ValueError) as e:
        raise ValueError(
            "kd={{...}} of a LazyConfig student does not fit kd_det's KD keys ({}). It takes the "
            "keys of the yacs KD node (kd_det/config/defaults.py), e.g. "
            "{{'TEACHER': {{'CONFIG': ..., 'WEIGHTS': ...}}, "
            "'FEATURE': {{'LOSS': 'SSIMFeatureLoss'}}}}".format(e)
        ) from e
    return node


def _distill_class(meta_architecture: str):
    try:
        cls = META_ARCH_REGISTRY.get(meta_architecture)
    except KeyError:
        cls = None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, DistillMixin)):
        names = sorted(
            k for k, c in META_ARCH_REGISTRY if isinstance(c, type) and issubclass(c, DistillMixin)
        )
        raise ValueError(
            "{!r} is not a kd_det distillation meta-architecture with a teacher; a LazyConfig "
            "student is one of {}".format(meta_architecture, names)
        )
    return cls


def _self_distill_class(meta_architecture: str):
    try:
        cls = META_ARCH_REGISTRY.get(meta_architecture)
    except KeyError:
        cls = None
    if cls is None or not hasattr(cls, "self_distill_kwargs"):
        names = sorted(k for k, c in META_ARCH_REGISTRY if hasattr(c, "self_distill_kwargs"))
        raise ValueError(
            "{!r} is not a kd_det self-distillation meta-architecture; one of {}".format(
                meta_architecture, names
            )
        )
    return cls


def _target_name(node) -> str:
    target = node.get("_target_", None) if hasattr(node, "get") else None
    if target is None:
        raise ValueError(
            "lazy_distilled_model() takes the student's LazyCall, e.g. L(GeneralizedRCNN)(...), "
            "got {}".format(type(node).__name__)
        )
    return target.rsplit(".", 1)[-1] if isinstance(target, str) else target.__name__


def lazy_distilled_model(
    student, kd: Mapping, train_datasets: Sequence[str] = (), meta_architecture: str = ""
):
    """
    Deprecated (see the module's docstring): the LazyCall of the distilled student,
    ``student`` (a LazyCall of GeneralizedRCNN or RetinaNet, left unchanged) built by
    :func:`build_distilled_model` as ``meta_architecture`` (default: "Distill" + the
    student's class, e.g. DistillRetinaNet).

    Args:
        kd: the ``KD`` settings, keyed as the yacs ``KD`` node (checked here, when the
            config loads).
        train_datasets: the student's training set names (a name, a list, or an
            interpolation such as "${dataloader.train.dataset.names}"), for
            ``KD.TEACHER.CHECK_CLASSES``.
    """
    _warn_old_form()
    name = _target_name(student)
    meta_architecture = meta_architecture or "Distill" + name
    cls = _distill_class(meta_architecture)
    if cls.student_meta_architecture != name:
        raise ValueError(
            "meta_architecture {!r} distils a {} student, but the LazyCall builds a {}: leave "
            "meta_architecture empty (Distill{}) or pass a {} student".format(
                meta_architecture,
                cls.student_meta_architecture,
                name,
                name,
                cls.student_meta_architecture,
            )
        )
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
    Deprecated (see the module's docstring): the LazyCall of a teacher-free
    self-distilled student (FRSKD, ``KD.SELF``), ``student`` (a LazyCall of
    GeneralizedRCNN or RetinaNet, left unchanged) built by
    :func:`build_self_distilled_model` as ``meta_architecture`` (default "SelfDistill" +
    the student's class).  The self-teacher's detection heads are copies of the
    student's own head LazyCalls (``self_head``; ``self_proposal_generator`` and
    ``self_roi_heads``), initialised on their own.

    Args:
        kd: the ``KD`` settings, keyed as the yacs ``KD`` node: ``SELF`` and ``FEATURE``.
    """
    _warn_old_form()
    name = _target_name(student)
    meta_architecture = meta_architecture or "SelfDistill" + name
    cls = _self_distill_class(meta_architecture)
    if cls.student_meta_architecture != name or name not in _SELF_HEADS:
        raise ValueError(
            "meta_architecture {!r} self-distils a {} student, but the LazyCall builds a {}".format(
                meta_architecture, cls.student_meta_architecture, name
            )
        )
    kd_node(kd, self_distillation=True)  # fail when the config loads
    node = copy.deepcopy(student)
    node._target_ = build_self_distilled_model
    node.meta_architecture = meta_architecture
    node.kd = _to_dict(kd)
    for head in _SELF_HEADS[name]:
        node["self_" + head] = copy.deepcopy(student[head])
    return node


def _kd_view(
    meta_architecture: str, kd: Mapping, train_datasets: Sequence[str], student_kwargs: Mapping
) -> CfgNode:
    """
    The yacs config the old form was written in: ``KD`` from ``kd``, and the few student
    settings its ``from_config`` pieces read (meta-architecture, class count, device,
    training sets), taken from the built arguments.
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
    cfg.DATASETS.TRAIN = (
        (train_datasets,) if isinstance(train_datasets, str) else tuple(train_datasets)
    )
    cfg.freeze()
    return cfg


def build_distilled_model(
    meta_architecture: str, kd: Mapping, train_datasets: Sequence[str] = (), **student_kwargs
) -> torch.nn.Module:
    """
    Deprecated (see the module's docstring): the target of :func:`lazy_distilled_model`'s
    LazyCall, ``meta_architecture`` (e.g. DistillGeneralizedRCNN) from the student's
    built arguments (backbone, heads, ...) and the teacher and distillation modules of
    ``kd``.
    """
    _warn_old_form()
    cls = _distill_class(meta_architecture)
    cfg = _kd_view(meta_architecture, kd, train_datasets, student_kwargs)
    return cls(**cls.distill_kwargs(cfg, dict(student_kwargs)))


def build_self_distilled_model(meta_architecture: str, kd: Mapping, **kwargs) -> torch.nn.Module:
    """
    Deprecated (see the module's docstring): the target of
    :func:`lazy_self_distilled_model`'s LazyCall, ``meta_architecture`` (e.g.
    SelfDistillRetinaNet) from the student's built arguments, its self-teacher heads
    (``self_*``) and the self-teacher and feature target of ``kd``.
    """
    _warn_old_form()
    cls = _self_distill_class(meta_architecture)
    heads = {k: kwargs.pop(k) for k in list(kwargs) if k.startswith("self_")}
    cfg = _kd_view(meta_architecture, kd, (), kwargs)
    return cls(**cls.self_distill_kwargs(cfg, dict(kwargs), **heads))

"""
The student-only config of a distillation config, of either kind: the config that builds
the student alone (no teacher, nor its weights, nor the distillation modules), to evaluate
and export it; and the config that releases it, which vanilla Detectron2 reads without
kd_det (saved as a yacs ``config.yaml``, or by ``LazyConfig.save``).

A distillation meta-architecture is known by its ``student_meta_architecture`` (the
vanilla Detectron2 one it becomes).  It is looked up by name in Detectron2's
``META_ARCH_REGISTRY``, never imported: the config layer sits below ``kd_det.modeling``.
"""

import copy
import inspect
from typing import Set

from detectron2.config import CfgNode, LazyConfig, get_cfg
from detectron2.modeling import META_ARCH_REGISTRY
from detectron2.utils.registry import locate

from .detector import DetectorConfig, is_lazy_config
from .lazy import lazy_get

__all__ = [
    "student_model_call",
    "student_model_config",
    "vanilla_student_config",
    "save_config",
    "load_student_config",
]


def _student_name(meta_architecture: str) -> str:
    """
    The registered name of the vanilla meta-architecture a registered distillation one
    becomes (``DistillRetinaNet`` -> ``RetinaNet``); "" for a vanilla one.
    """
    return getattr(META_ARCH_REGISTRY.get(meta_architecture), "student_meta_architecture", "")


def _registered(name: str) -> type:
    try:
        return META_ARCH_REGISTRY.get(name)
    except KeyError:
        names = sorted(
            k for k, c in META_ARCH_REGISTRY if getattr(c, "student_meta_architecture", "")
        )
        raise ValueError(
            "{!r} is not a registered meta-architecture; a kd_det student is one of "
            "{}".format(name, names)
        ) from None


def _keyword_names(fn) -> Set[str]:
    """The named parameters of ``fn`` (not ``self``, ``*args`` or ``**kwargs``)."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind in kinds and name != "self"
    }


def _distillation_arguments(distill_class, student_class) -> Set[str]:
    """
    The constructor arguments that are distillation's: those of ``distill_class`` (and of
    the mixins it adds) that ``student_class``'s constructor does not take.
    """
    own = set()
    for klass in distill_class.__mro__:
        if klass not in student_class.__mro__ and "__init__" in vars(klass):
            own |= _keyword_names(klass.__init__)
    return own - _keyword_names(student_class.__init__)


def _target(call):
    """The callable a LazyCall names (its ``_target_``, located where it is a string)."""
    target = lazy_get(call, "_target_")
    if isinstance(target, str):
        try:
            return locate(target)
        except Exception:  # not importable here: instantiate reports it, not this
            return None
    return target


def student_model_call(model):
    """
    The LazyCall of the student alone, from a LazyConfig's ``model``: its vanilla
    meta-architecture with its own arguments, for evaluation and export, which need
    neither the teacher nor its weights.  A distilled student is either

    - ``L(DistillRetinaNet)(teacher=..., feature_distiller=..., <RetinaNet's arguments>)``
      (any class with a ``student_meta_architecture``): the arguments its constructor
      takes and the vanilla one's does not are dropped; or
    - a builder's LazyCall with a ``meta_architecture`` argument naming such a class (kd_det's
      ``lazy_distilled_model``): the builder's own arguments are dropped as well.

    Any other LazyCall is returned unchanged.
    """
    target = _target(model)
    if target is None:
        return model
    builder_args: Set[str] = set()
    if isinstance(target, type):
        distill_class = target
    else:
        named = lazy_get(model, "meta_architecture")
        if not named or not callable(target):
            return model
        distill_class = _registered(str(named))
        builder_args = _keyword_names(target)
    student_name = getattr(distill_class, "student_meta_architecture", "")
    if not student_name:
        return model
    student_class = META_ARCH_REGISTRY.get(student_name)
    dropped = builder_args | _distillation_arguments(distill_class, student_class)
    node = copy.deepcopy(model)
    for key in [k for k in node.keys() if k in dropped]:
        # not pop(): it would resolve an interpolation that may point outside this node
        del node[key]
    node._target_ = student_class
    return node


def student_model_config(config: DetectorConfig) -> DetectorConfig:
    """
    ``config`` with the student alone as its model (see :func:`student_model_call`): yacs
    ``MODEL.META_ARCHITECTURE`` replaced by the vanilla one (a frozen copy), a LazyConfig's
    ``model`` by its student's LazyCall (a copy).  Every other key (datasets,
    ``TEST.EVALUATOR``, ...) is kept, as evaluation reads them.  A config whose model is
    not a distillation one is returned as it is.
    """
    if isinstance(config, CfgNode):
        student_name = _student_name(config.MODEL.META_ARCHITECTURE)
        if not student_name:
            return config
        out = config.clone()
        out.defrost()
        out.MODEL.META_ARCHITECTURE = student_name
        out.freeze()
        return out
    model = lazy_get(config, "model")
    student = student_model_call(model) if model is not None else None
    if student is None or student is model:
        return config
    out = copy.deepcopy(config)
    out.model = student
    return out


def _drop_unknown_keys(cfg: CfgNode, reference: CfgNode) -> CfgNode:
    """Copy of ``cfg`` without keys that ``reference`` (a vanilla Detectron2 config) lacks."""
    out = CfgNode()
    for key, value in cfg.items():
        if key not in reference:
            continue
        if isinstance(value, CfgNode) and isinstance(reference[key], CfgNode):
            out[key] = _drop_unknown_keys(value, reference[key])
        else:
            out[key] = value
    return out


def vanilla_student_config(config: DetectorConfig, weights: str = "") -> DetectorConfig:
    """
    The student's config as vanilla Detectron2 reads it, with ``weights`` as its weights.

    - yacs: the distillation meta-architecture replaced by the plain one
      (``DistillRetinaNet`` -> ``RetinaNet``), every kd_det key (``KD``, ``TRAINER``,
      ``TEST.EVALUATOR``, ...) removed, ``MODEL.WEIGHTS`` = ``weights``;
    - LazyConfig: a copy whose ``model`` is the student alone (:func:`student_model_call`)
      and whose ``train.init_checkpoint`` (where it has ``train``) is ``weights``, without
      kd_det's ``train.init_checkpoint_sha256``: vanilla
      Detectron2 builds it with ``instantiate(cfg.model)``.
    """
    if isinstance(config, CfgNode):
        student_name = _student_name(config.MODEL.META_ARCHITECTURE)
        out = _drop_unknown_keys(config, get_cfg())
        out.defrost()
        if student_name:
            out.MODEL.META_ARCHITECTURE = student_name
        out.MODEL.WEIGHTS = weights
        return out
    out = copy.deepcopy(config)
    out.model = student_model_call(out.model)
    if "train" in out:
        out.train.init_checkpoint = weights
        out.train.pop("init_checkpoint_sha256", None)  # kd_det's pin: Detectron2 has no such key
    return out


def save_config(config: DetectorConfig, path: str) -> None:
    """Write ``config`` to ``path``: a yacs config's ``dump()``, or ``LazyConfig.save``."""
    if isinstance(config, CfgNode):
        with open(path, "w") as f:
            f.write(config.dump())
    else:
        LazyConfig.save(config, path)


def load_student_config(path: str) -> DetectorConfig:
    """
    A released student's config (:func:`vanilla_student_config`, saved by
    :func:`save_config`) loaded as vanilla Detectron2 loads it: ``get_cfg()`` and
    ``merge_from_file`` (no kd_det keys, so a leftover one fails), or ``LazyConfig.load``.
    """
    if is_lazy_config(path):
        return LazyConfig.load(path)
    cfg = get_cfg()
    cfg.merge_from_file(path)
    return cfg

"""
Old kd_det config keys and their new names, applied wherever kd_det merges a config.

Users' configs, ``KD.TEACHER.OPTS``, command lines and the ``config.yaml`` of runs and
checkpoints written before the ``KD`` node was split keep loading: each old key is
renamed (and, where the old convention switched a method off with an empty name or a
zero weight, translated to ``ENABLED``) before yacs sees it, with one ``FutureWarning``
per old key and process that names the new key.  Unknown keys still fail with yacs'
own error.

Entry points load configs with :func:`merge_kd_config`::

    cfg = merge_kd_config(get_cfg(), args.config_file, args.opts)

which is Detectron2's ``merge_from_file`` (``_BASE_`` inheritance and config versions
included) and ``merge_from_list`` with the renames applied in between.
"""

import logging
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

from detectron2.config import CfgNode

__all__ = [
    "RENAMED_KEYS",
    "TRANSLATED_VALUES",
    "merge_kd_config",
    "rename_config_dict",
    "rename_opts",
]

# old key -> new key.  A key names a node too: every key under it moves with it
# (KD.CURRICULUM.SCORES -> TRAINER.CURRICULUM.SCORES).
RENAMED_KEYS: Dict[str, str] = {
    # training keys leave the model's KD node for a node beside SOLVER and DATALOADER
    "KD.TRAINER": "TRAINER.NAME",
    "KD.CURRICULUM": "TRAINER.CURRICULUM",
    # the self-teacher's soft label got a node with ENABLED, as the other methods have
    "KD.SELF.TEMPERATURE": "KD.SELF.SOFT_LABEL.TEMPERATURE",
}


def _feature_loss(value) -> Optional[List[Tuple[str, Any]]]:
    # "" switched feature imitation off; ENABLED does now, and LOSS keeps naming the loss (it
    # goes back to its default here: the name a _BASE_ gave was overwritten by "" already)
    return [("KD.FEATURE.ENABLED", False)] if value == "" else None


def _self_soft_label_weight(value) -> Optional[List[Tuple[str, Any]]]:
    # a weight of 0 switched the self-teacher's soft label off, any other weight on
    if value == 0:
        return [("KD.SELF.SOFT_LABEL.ENABLED", False)]
    return [("KD.SELF.SOFT_LABEL.ENABLED", True), ("KD.SELF.SOFT_LABEL.WEIGHT", value)]


# old key -> (what the warning names as its replacement, translation of its value into
# (new key, value) pairs; None where the value is not an old use and stays as it is)
TRANSLATED_VALUES: Dict[str, Tuple[str, Callable[[Any], Optional[List[Tuple[str, Any]]]]]] = {
    "KD.FEATURE.LOSS": ('KD.FEATURE.ENABLED False (for KD.FEATURE.LOSS "")', _feature_loss),
    "KD.SELF.SOFT_LABEL_WEIGHT": (
        "KD.SELF.SOFT_LABEL.WEIGHT and KD.SELF.SOFT_LABEL.ENABLED " "(False for a weight of 0)",
        _self_soft_label_weight,
    ),
}

# the old keys warned about in this process: once each, however many configs use them
_WARNED = set()


def _warn(old: str, new: str, source: str) -> None:
    if old in _WARNED:
        return
    _WARNED.add(old)
    warnings.warn(
        "kd_det config key {} is now {}; the old name still loads, rename it{}".format(
            old, new, " (seen in {})".format(source) if source else ""
        ),
        FutureWarning,
        stacklevel=3,
    )


def _parent(d: Dict, dotted: str):
    """(the dict holding "c", "c") for "a.b.c" in ``d``; (None, "c") where a or b is missing."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        d = d.get(key)
        if not isinstance(d, dict):
            return None, leaf
    return d, leaf


def _put(d: Dict, dotted: str, value) -> None:
    """``d[a][b][c] = value`` for "a.b.c"; a dict value merges into a dict already there."""
    *parents, leaf = dotted.split(".")
    for key in parents:
        d = d.setdefault(key, {})
    if isinstance(value, Mapping) and isinstance(d.get(leaf), dict):
        for k, v in value.items():
            _put(d[leaf], k, v)
    else:
        d[leaf] = value


def rename_config_dict(d: Dict, source: str = "") -> Dict:
    """
    ``d`` (a config as nested dicts, e.g. from ``load_yaml_with_base``) with the old keys
    renamed, in place; returns ``d``.  An old key wins over its new key when both are set:
    a file's old keys are renamed after its ``_BASE_`` was merged, so they are its own.
    """
    for old, new in RENAMED_KEYS.items():
        parent, leaf = _parent(d, old)
        if parent is not None and leaf in parent:
            _warn(old, new, source)
            _put(d, new, parent.pop(leaf))
    for old, (new, translate) in TRANSLATED_VALUES.items():
        parent, leaf = _parent(d, old)
        pairs = translate(parent[leaf]) if parent is not None and leaf in parent else None
        if pairs is not None:  # an old use of the key (other values are current ones)
            _warn(old, new, source)
            del parent[leaf]
            for key, value in pairs:
                _put(d, key, value)
    return d


def rename_opts(opts: Sequence, source: str = "") -> List:
    """
    A ``KEY VALUE ...`` list (command line, ``KD.TEACHER.OPTS``) with the old keys renamed;
    a list of odd length is returned as it is, for yacs to refuse.
    """
    opts = list(opts)
    if len(opts) % 2:
        return opts
    out = []
    for key, value in zip(opts[0::2], opts[1::2]):
        renamed = [(key, value)]
        for old, new in RENAMED_KEYS.items():
            if key == old or key.startswith(old + "."):
                _warn(old, new, source)
                renamed = [(new + key[len(old) :], value)]
        if key in TRANSLATED_VALUES:
            new, translate = TRANSLATED_VALUES[key]
            # command-line values are strings: compare what yacs will make of them
            pairs = translate(CfgNode._decode_cfg_value(value))
            if pairs is not None:
                _warn(key, new, source)
                renamed = pairs
        for k, v in renamed:
            out += [k, v]
    return out


class _RenamingLoader(CfgNode):
    """Detectron2's ``load_yaml_with_base`` renaming each file's keys once its ``_BASE_`` is in."""

    @classmethod
    def load_yaml_with_base(cls, filename: str, allow_unsafe: bool = False) -> Dict[str, Any]:
        # fvcore loads each _BASE_ through cls.load_yaml_with_base: bases come back renamed
        return rename_config_dict(
            super().load_yaml_with_base(filename, allow_unsafe=allow_unsafe), source=filename
        )


def _merge_from_file(cfg: CfgNode, path: str) -> None:
    """Detectron2's ``CfgNode.merge_from_file`` (v0.6) with the renames of each file applied."""
    from detectron2.config.compat import downgrade_config, guess_version, upgrade_config
    from detectron2.utils.file_io import PathManager

    assert PathManager.isfile(path), f"Config file '{path}' does not exist!"
    loaded = type(cfg)(_RenamingLoader.load_yaml_with_base(path, allow_unsafe=True))
    loaded_ver = loaded.get("VERSION", None)
    if loaded_ver is None:
        loaded_ver = guess_version(loaded, path)
    assert loaded_ver <= cfg.VERSION, "Cannot merge a v{} config into a v{} config.".format(
        loaded_ver, cfg.VERSION
    )
    if loaded_ver == cfg.VERSION:
        cfg.merge_from_other_cfg(loaded)
        return
    logging.getLogger(__name__).warning(
        "Loading an old v{} config file '{}' by automatically upgrading to v{}.".format(
            loaded_ver, path, cfg.VERSION
        )
    )
    old = downgrade_config(cfg, to_version=loaded_ver)
    old.merge_from_other_cfg(loaded)
    new = upgrade_config(old)
    cfg.clear()
    cfg.update(new)


def merge_kd_config(
    cfg: CfgNode,
    config_file: Optional[str] = None,
    opts: Sequence = (),
    opts_source: str = "the command line",
) -> CfgNode:
    """
    Merge a config file, then a ``KEY VALUE ...`` list, into ``cfg`` (kd_det's keys are
    added first if missing), renaming old kd_det keys in both (see :data:`RENAMED_KEYS`).

    Args:
        cfg: a Detectron2 yacs config, changed in place.
        config_file: a yacs ``.yaml`` (``_BASE_`` allowed), e.g. a run's saved config.yaml.
        opts: overrides, as ``merge_from_list`` takes them.
        opts_source: where ``opts`` come from, for the warnings (e.g. "KD.TEACHER.OPTS").
    Returns:
        ``cfg``.
    """
    from .defaults import add_kd_config

    add_kd_config(cfg)
    if config_file:
        _merge_from_file(cfg, config_file)
    if opts:
        cfg.merge_from_list(rename_opts(opts, source=opts_source))
    return cfg

"""
COCO-format datasets named on the command line or in a config, without writing Python::

    tools/train_net.py --config-file CFG --dataset my_train=data/train.json:data/images \\
        DATASETS.TRAIN '("my_train",)'

or, in a yacs config, ``DATASETS.COCO_FORMAT: ["my_train=data/train.json:data/images"]``
(a LazyConfig: ``train.coco_format = [...]``).  Each ``NAME=JSON:IMAGE_DIR`` registers NAME
in Detectron2's catalogs as ``register_coco_instances`` does (COCO evaluation), with the
classes of the json's ``categories`` (ordered by id, as ``load_coco_json`` orders them)
known at once, so that class counts and teachers are checked before training and the tools'
dataset validation (``DATASETS.VALIDATE``) covers it like the builtin datasets.

Detectron2's catalogs belong to one process: the tools register in their ``setup``, which
every worker process started by ``--num-gpus N`` runs, not only in the launcher.
"""

import json
import os
from dataclasses import dataclass
from typing import Iterable, List, Optional, Sequence

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_coco_json

__all__ = [
    "CocoFormatSpec",
    "parse_coco_format_spec",
    "register_coco_format_datasets",
    "register_config_datasets",
    "register_lazy_config_datasets",
    "add_dataset_argument",
]

_EXAMPLE = "my_train=data/annotations/train.json:data/images"


@dataclass(frozen=True)
class CocoFormatSpec:
    """One COCO-format dataset: its name, annotation file and image directory (absolute)."""

    name: str
    json_file: str
    image_root: str


def parse_coco_format_spec(spec: str, what: str = "--dataset") -> CocoFormatSpec:
    """
    ``NAME=JSON:IMAGE_DIR`` as a :class:`CocoFormatSpec` (paths made absolute). The json and
    the directory are split at ``.json:`` when the spec has it, else at the last ``:``.
    ``what`` names the setting in errors.

    Raises:
        ValueError: a malformed spec. FileNotFoundError: no such json file or directory.
    """
    name, sep, rest = str(spec).partition("=")
    name, rest = name.strip(), rest.strip()
    at = rest.find(".json:")
    json_file, image_root = (
        (rest[: at + 5], rest[at + 6 :]) if at >= 0 else (rest.rpartition(":")[::2])
    )
    if not sep or not name or not json_file or not image_root:
        raise ValueError(
            "{} {!r} is not NAME=JSON:IMAGE_DIR (a dataset name, its COCO-format annotation "
            "file and its image directory, e.g. {})".format(what, spec, _EXAMPLE)
        )
    if not os.path.isfile(json_file):
        raise FileNotFoundError(
            "{} {!r}: annotation file {} not found (the path is read from the current "
            "directory, {})".format(what, spec, json_file, os.getcwd())
        )
    if not os.path.isdir(image_root):
        raise FileNotFoundError(
            "{} {!r}: image directory {} not found (the path is read from the current "
            "directory, {})".format(what, spec, image_root, os.getcwd())
        )
    return CocoFormatSpec(name, os.path.abspath(json_file), os.path.abspath(image_root))


def _category_names(json_file: str, what: str) -> List[str]:
    """The json's category names, ordered by category id (``load_coco_json``'s class order)."""
    try:
        with open(json_file) as f:
            categories = json.load(f).get("categories")
        ordered = sorted(categories, key=lambda c: c["id"])
        names = [str(c["name"]) for c in ordered]
    except Exception as e:
        raise ValueError(
            "{}: {} has no readable COCO 'categories' list of {{'id', 'name'}} ({}: {}); "
            "the classes of a --dataset come from it".format(what, json_file, type(e).__name__, e)
        ) from e
    if not names:
        raise ValueError("{}: {} lists no categories".format(what, json_file))
    return names


def _registered_source(name: str) -> Optional[str]:
    meta = MetadataCatalog.get(name)
    json_file, image_root = meta.get("json_file", None), meta.get("image_root", None)
    if json_file and image_root:
        return "{}:{}".format(os.path.abspath(json_file), os.path.abspath(image_root))
    return None


def register_coco_format_datasets(specs: Iterable[str], what: str = "--dataset") -> List[str]:
    """
    Register each ``NAME=JSON:IMAGE_DIR`` of ``specs`` (see :func:`parse_coco_format_spec`) in
    Detectron2's DatasetCatalog/MetadataCatalog (``json_file``, ``image_root``,
    ``evaluator_type`` "coco", ``thing_classes`` from the json).  A name registered before with
    the same json and directory is left as it is (setup may run twice in one process).
    Returns the names.

    Raises:
        ValueError: a malformed spec, an unreadable ``categories`` list, or a name already
        registered with another source (a builtin such as ``coco_2017_train``, or another
        --dataset). FileNotFoundError: a missing json or directory.
    """
    names = []
    for text in specs:
        spec = parse_coco_format_spec(text, what)
        source = "{}:{}".format(spec.json_file, spec.image_root)
        if spec.name in DatasetCatalog.list():
            registered = _registered_source(spec.name)
            if registered == source:
                names.append(spec.name)
                continue
            raise ValueError(
                "{} {!r}: dataset {!r} is already registered{}; choose another NAME".format(
                    what,
                    text,
                    spec.name,
                    " with {}".format(registered) if registered else " (a builtin or custom one)",
                )
            )
        classes = _category_names(spec.json_file, "{} {!r}".format(what, text))

        def load(spec=spec):
            return load_coco_json(spec.json_file, spec.image_root, spec.name)

        DatasetCatalog.register(spec.name, load)
        MetadataCatalog.get(spec.name).set(
            json_file=spec.json_file,
            image_root=spec.image_root,
            evaluator_type="coco",
            thing_classes=classes,
        )
        names.append(spec.name)
    return names


def register_config_datasets(cfg, extra: Sequence[str] = ()) -> List[str]:
    """
    A yacs ``cfg`` (not frozen): ``DATASETS.COCO_FORMAT`` extended by ``extra`` (the tools'
    ``--dataset`` values, so that the run's saved config.yaml names them too), then every
    entry registered (:func:`register_coco_format_datasets`).  Returns the names.
    """
    cfg.DATASETS.COCO_FORMAT = list(cfg.DATASETS.COCO_FORMAT) + [
        s for s in extra if s not in cfg.DATASETS.COCO_FORMAT
    ]
    return register_coco_format_datasets(
        cfg.DATASETS.COCO_FORMAT, "DATASETS.COCO_FORMAT (or --dataset) entry"
    )


def register_lazy_config_datasets(cfg, extra: Sequence[str] = ()) -> List[str]:
    """As :func:`register_config_datasets` for a LazyConfig, whose key is
    ``train.coco_format`` (a list of ``NAME=JSON:IMAGE_DIR``; absent: none)."""
    train = cfg.get("train", None)  # absent: the tool names the missing key afterwards
    specs = list((train.get("coco_format", None) if train is not None else None) or [])
    specs += [s for s in extra if s not in specs]
    if specs and train is not None:
        train.coco_format = specs
    return register_coco_format_datasets(specs, "train.coco_format (or --dataset) entry")


def add_dataset_argument(parser) -> None:
    """The tools' repeatable ``--dataset NAME=JSON:IMAGE_DIR`` (into ``args.dataset``)."""
    parser.add_argument(
        "--dataset",
        action="append",
        default=[],
        metavar="NAME=JSON:IMAGE_DIR",
        help="register a COCO-format dataset NAME (classes from the json), then name it in "
        "DATASETS.TRAIN/TEST (LazyConfig: dataloader.*.dataset.names); repeatable; the same as "
        "the config key DATASETS.COCO_FORMAT (train.coco_format), e.g. --dataset " + _EXAMPLE,
    )

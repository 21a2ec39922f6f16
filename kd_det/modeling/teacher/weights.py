"""A teacher's trained weights: fetched where they are a URL, loaded strictly into its model."""

import os

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from ...config.detector import train_command

__all__ = ["load_teacher_weights", "train_command"]


def _local_weights_file(path: str, config_path: str) -> str:
    """
    A local file for ``KD.TEACHER.WEIGHTS``: a path as it is, or a URL that Detectron2's
    PathManager resolves (``detectron2://`` for its model zoo, ``https://``), fetched
    once into iopath's cache ($FVCORE_CACHE, default ~/.torch/iopath_cache).
    """
    if "://" not in path:
        if not os.path.isfile(path):
            raise FileNotFoundError(
                "teacher weights KD.TEACHER.WEIGHTS={!r} not found. Train the "
                "teacher with {} or fix the path".format(path, train_command(config_path))
            )
        return path
    try:
        return PathManager.get_local_path(path)
    except Exception as e:
        raise FileNotFoundError(
            "teacher weights KD.TEACHER.WEIGHTS={!r} could not be fetched ({}: {}). Without "
            "network access, download the file elsewhere and set KD.TEACHER.WEIGHTS to its local "
            "path".format(path, type(e).__name__, e)
        ) from e


def load_teacher_weights(model: torch.nn.Module, path: str, config_path: str) -> None:
    """
    Load the checkpoint ``path`` (a file, or a ``detectron2://`` / ``https://`` URL) into
    the teacher ``model`` built from ``config_path``: every key must be there, with its
    shape, and none may be left over (a teacher that silently did not load is the most
    common cause of a distillation run that teaches nothing).

    Raises:
        ValueError / FileNotFoundError naming the fix: no path, no file, an unreadable file,
        or weights of another model.
    """
    if not path:
        raise ValueError(
            "KD.TEACHER.WEIGHTS is empty: a distilled student needs a trained "
            "teacher. Train one with {} and point KD.TEACHER.WEIGHTS at its "
            "model_final.pth".format(train_command(config_path))
        )
    local = _local_weights_file(path, config_path)
    checkpointer = DetectionCheckpointer(model)
    # fvcore's public Checkpointer.load only logs the keys that do not fit; its _load_file
    # (Detectron2's .pkl/.pth reader) and _load_model (which returns them) give the strict check.
    # Issue 32 replaces these two calls with kd_det's own safe loader.
    try:
        checkpoint = checkpointer._load_file(local)
    except Exception as e:
        raise ValueError(
            "teacher weights {!r} are unreadable ({}: {}); re-save or re-train the "
            "teacher".format(path, type(e).__name__, e)
        ) from e
    incompatible = checkpointer._load_model(checkpoint)
    problems = []
    if incompatible.missing_keys:
        problems.append("missing keys: " + ", ".join(incompatible.missing_keys[:10]))
    if incompatible.unexpected_keys:
        problems.append("unexpected keys: " + ", ".join(incompatible.unexpected_keys[:10]))
    if incompatible.incorrect_shapes:
        problems.append(
            "shape mismatch: "
            + ", ".join(
                "{} {}->{}".format(k, tuple(a), tuple(b))
                for k, a, b in incompatible.incorrect_shapes[:10]
            )
        )
    if problems:
        raise ValueError(
            "teacher weights {!r} do not fit the teacher config {!r} ({}). Use the "
            "config the teacher was trained with".format(path, config_path, "; ".join(problems))
        )

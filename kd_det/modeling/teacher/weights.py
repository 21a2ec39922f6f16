"""A teacher's trained weights, read by :mod:`kd_det.checkpoint.loading` and loaded strictly into
its model."""

import os

import torch

from ...checkpoint import (
    SafeDetectionCheckpointer,
    UnsafeCheckpointError,
    WeightsMismatchError,
    check_sha256,
    incompatible_keys_problems,
    resolve_weights,
)
from ...config.detector import train_command

__all__ = ["load_teacher_weights", "train_command"]


def load_teacher_weights(
    model: torch.nn.Module, path: str, config_path: str, sha256: str = ""
) -> None:
    """
    Load the checkpoint ``path`` (a file, or a URL of a registered scheme such as
    ``detectron2://`` / ``https://``) into the teacher ``model`` built from ``config_path``,
    after checking it against ``sha256`` (``KD.TEACHER.WEIGHTS_SHA256``; empty: not pinned).
    Every key must be there, with its shape, and none may be left over (a teacher that
    silently did not load is the most common cause of a distillation run that teaches
    nothing).  Nothing in the file is run (:func:`kd_det.checkpoint.read_checkpoint`).

    Raises:
        ValueError / FileNotFoundError naming the fix: no path, no file, a file that does not
        match its pin, refers to code or is unreadable, or weights of another model.
    """
    if not path:
        raise ValueError(
            "KD.TEACHER.WEIGHTS is empty: a distilled student needs a trained "
            "teacher. Train one with {} and point KD.TEACHER.WEIGHTS at its "
            "model_final.pth".format(train_command(config_path))
        )
    if "://" not in path and not os.path.isfile(path):
        raise FileNotFoundError(
            "teacher weights KD.TEACHER.WEIGHTS={!r} not found. Train the teacher with {} or fix "
            "the path".format(path, train_command(config_path))
        )
    local = resolve_weights(path, "KD.TEACHER.WEIGHTS")  # a URL: fetched, or a clear error
    check_sha256(local, sha256, "KD.TEACHER.WEIGHTS_SHA256", path)
    checkpointer = SafeDetectionCheckpointer(model)
    # fvcore's public Checkpointer.load only logs the keys that do not fit; _load_file (kd_det's
    # safe reader) and _load_model (which returns them) give the strict check
    try:
        checkpoint = checkpointer._load_file(local)
    except (UnsafeCheckpointError, WeightsMismatchError):
        raise
    except Exception as e:
        raise ValueError(
            "teacher weights {!r} are unreadable ({}: {}); re-save or re-train the "
            "teacher".format(path, type(e).__name__, e)
        ) from e
    problems = incompatible_keys_problems(checkpointer._load_model(checkpoint))
    if problems:
        raise ValueError(
            "teacher weights {!r} do not fit the teacher config {!r} ({}). Use the "
            "config the teacher was trained with".format(path, config_path, "; ".join(problems))
        )

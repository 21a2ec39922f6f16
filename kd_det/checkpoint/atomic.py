"""Crash-safe checkpoints: a file is complete or absent, and ``last_checkpoint`` names a complete
file."""

import errno
import os
from typing import Any

import torch

from .leftovers import temp_path
from .loading import SafeDetectionCheckpointer

__all__ = ["AtomicDetectionCheckpointer", "atomic_write_bytes"]


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # some filesystems do not open directories
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_replace(tmp: str, final: str) -> None:
    os.replace(tmp, final)
    _fsync_dir(os.path.dirname(os.path.abspath(final)))


class _WriteErrorRecorder:
    """
    Binary file wrapper that remembers the first ``OSError`` of ``write``. torch.save's
    zip writer swallows it and raises ``RuntimeError: ... unexpected pos`` instead, which
    hides the real cause (a full disk, a quota).
    """

    def __init__(self, f):
        self._f = f
        self.error = None

    def write(self, data):
        try:
            return self._f.write(data)
        except OSError as e:
            self.error = self.error or e
            raise

    def flush(self):
        return self._f.flush()


def atomic_write_bytes(path: str, write) -> None:
    """
    Call ``write(file)`` on a temporary file next to ``path``, fsync it, rename it over
    ``path``. An ``OSError`` raised by a write is re-raised as itself, with ``path``'s
    temporary file name, whatever ``write`` turned it into. The temporary file names its
    writer (:func:`~kd_det.checkpoint.leftovers.temp_path`), so that one left by a killed
    process is recognised and removed later (:func:`remove_leftover_temp_files`).
    """
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            recorder = _WriteErrorRecorder(f)
            try:
                write(recorder)
            except Exception as e:
                if recorder.error is None or recorder.error is e:
                    raise
                raise OSError(recorder.error.errno, recorder.error.strerror, tmp) from e
            f.flush()
            os.fsync(f.fileno())
        _atomic_replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


class AtomicDetectionCheckpointer(SafeDetectionCheckpointer):
    """
    A :class:`~kd_det.checkpoint.loading.SafeDetectionCheckpointer` (what it reads runs no
    code) whose ``save`` writes to a temporary file, fsyncs and renames it (atomic on POSIX),
    then points ``last_checkpoint`` at it the same way.
    A process killed at any moment leaves the previous checkpoint and tag intact; a full
    disk raises an ``OSError`` that names the last complete checkpoint and how to resume.
    Remote save dirs (``scheme://``) fall back to Detectron2's behaviour.
    """

    def _is_local(self) -> bool:
        return "://" not in str(self.save_dir)

    def save(self, name: str, **kwargs: Any) -> None:
        if not self.save_dir or not self.save_to_disk or not self._is_local():
            return super().save(name, **kwargs)
        data = {"model": self.model.state_dict()}
        for key, obj in self.checkpointables.items():
            data[key] = obj.state_dict()
        data.update(kwargs)
        basename = "{}.pth".format(name)
        save_file = os.path.join(self.save_dir, basename)
        self.logger.info("Saving checkpoint to {}".format(save_file))
        try:
            atomic_write_bytes(save_file, lambda f: torch.save(data, f))
            self.tag_last_checkpoint(basename)
        except OSError as e:
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise OSError(e.errno, self._disk_full_message(save_file, e)) from e

    def _disk_full_message(self, save_file: str, error: OSError) -> str:
        # the partial file is already gone (atomic_write_bytes); say what is still there
        # and how to go on, instead of torch.save's bare errno text
        last = "none yet"
        if self.has_checkpoint():
            last = self.get_checkpoint_file()
        return (
            "{} while saving {}. Nothing was lost: the last complete checkpoint is {}. "
            "Free space in {} (or set OUTPUT_DIR to a larger disk and copy the run there), "
            "then continue with --resume."
        ).format(error.strerror or "disk full", save_file, last, self.save_dir)

    def tag_last_checkpoint(self, last_filename_basename: str) -> None:
        if not self._is_local():
            return super().tag_last_checkpoint(last_filename_basename)
        atomic_write_bytes(
            os.path.join(self.save_dir, "last_checkpoint"),
            lambda f: f.write(last_filename_basename.encode()),
        )

"""How many periodic checkpoints a run keeps (``SOLVER.CHECKPOINT_KEEP``)."""

import logging
import os
import re
from typing import List

__all__ = ["periodic_checkpoints", "prune_checkpoints"]

logger = logging.getLogger(__name__)


def periodic_checkpoints(save_dir: str, prefix: str = "model") -> List[str]:
    """
    The periodic checkpoints in ``save_dir`` (``<prefix>_<iteration>.pth``), oldest first,
    by iteration. Scanning the folder finds those of earlier runs of a resumed training too,
    which fvcore's ``max_to_keep`` (a list kept in memory) forgets.
    """
    pattern = re.compile(r"^{}_(\d+)\.pth$".format(re.escape(prefix)))
    found = []
    for name in os.listdir(save_dir):
        m = pattern.match(name)
        if m:
            found.append((int(m.group(1)), name))
    return [name for _, name in sorted(found)]


def _tagged(save_dir: str) -> str:
    try:
        with open(os.path.join(save_dir, "last_checkpoint")) as f:
            return os.path.basename(f.read().strip())
    except OSError:
        return ""


def prune_checkpoints(save_dir: str, keep: int, prefix: str = "model") -> List[str]:
    """
    Delete all but the newest ``keep`` periodic checkpoints of ``save_dir``; ``keep`` = 0
    keeps all. Never deletes the file ``last_checkpoint`` names (the one ``--resume``
    loads, even where a kill left the tag on an older file), nor ``<prefix>_final.pth``
    (not a periodic checkpoint). Call it from the main process only, after a save has
    written its file and tag.

    Returns:
        the paths deleted.
    """
    if keep < 0:
        raise ValueError("SOLVER.CHECKPOINT_KEEP must be >= 0 (0 keeps all), got {}".format(keep))
    if keep == 0 or not os.path.isdir(save_dir):
        return []
    # the tag is read after the list: a save that lands in between only adds a newer file
    names = periodic_checkpoints(save_dir, prefix)
    protected = {_tagged(save_dir)}
    removed = []
    for name in names[:-keep]:
        if name in protected:
            continue
        path = os.path.join(save_dir, name)
        try:
            os.remove(path)
        except FileNotFoundError:
            continue
        removed.append(path)
    if removed:
        logger.info(
            "Deleted {} old checkpoint(s) (SOLVER.CHECKPOINT_KEEP={}): {}".format(
                len(removed), keep, ", ".join(os.path.basename(p) for p in removed)
            )
        )
    return removed

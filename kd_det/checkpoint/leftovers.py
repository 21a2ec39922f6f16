"""
Temporary files of interrupted saves: their names, and removing those whose writer is gone.

:func:`~kd_det.checkpoint.atomic.atomic_write_bytes` writes ``<path>.tmp.<host>.<pid>.<start>``
(``start``: the writer process's start, milliseconds since the epoch), then renames it to
``<path>``. A process killed inside a save leaves that file behind;
:func:`remove_leftover_temp_files` removes it at the next start. Host, process id and start
time together name the writer: on a shared filesystem another host's process ids mean nothing
here, and a process id may be reused by a later process.
"""

import logging
import os
import re
import socket
import time
from typing import List, NamedTuple, Optional

__all__ = [
    "WriterId",
    "current_writer",
    "temp_path",
    "parse_temp_name",
    "writer_is_gone",
    "remove_leftover_temp_files",
]

logger = logging.getLogger(__name__)

# /proc/stat's boot time is recomputed from the clock and can move by a second, so the same
# process's start time may read a little differently at two moments
_START_TOLERANCE_MS = 2000
_NEW = re.compile(r"^(?P<target>.+)\.tmp\.(?P<host>[A-Za-z0-9-]+)\.(?P<pid>\d+)\.(?P<start>\d+)$")
# kd_det before issue 36 wrote `<path>.tmp.<pid>`: no host, no start time
_OLD = re.compile(r"^(?P<target>.+)\.tmp\.(?P<pid>\d+)$")
_IMPORT_TIME_MS = int(time.time() * 1000)


class WriterId(NamedTuple):
    """The process that wrote a temporary file: host name (sanitised), pid, start (ms)."""

    host: str
    pid: int
    start_ms: int


def _host() -> str:
    # dots separate the name's fields; a host name keeps letters, digits and dashes
    return re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname()) or "unknown-host"


def _boot_time_s() -> Optional[float]:
    try:
        with open("/proc/stat") as f:
            for line in f:
                if line.startswith("btime "):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def process_start_ms(pid: int) -> Optional[int]:
    """
    Start time of process ``pid`` on this host (ms since the epoch), from /proc; None
    when it does not exist or /proc cannot tell (not Linux).
    """
    try:
        with open("/proc/{}/stat".format(pid)) as f:
            stat = f.read()
    except OSError:
        return None
    boot = _boot_time_s()
    if boot is None:
        return None
    # the command name (field 2) may hold spaces and parentheses: fields start after the last ")"
    ticks = int(stat[stat.rindex(")") + 2 :].split()[19])  # field 22, starttime
    return int((boot + ticks / os.sysconf("SC_CLK_TCK")) * 1000)


def current_writer() -> WriterId:
    """This process as a writer of temporary files."""
    start = process_start_ms(os.getpid())
    return WriterId(_host(), os.getpid(), _IMPORT_TIME_MS if start is None else start)


def temp_path(path: str, writer: Optional[WriterId] = None) -> str:
    """The temporary file next to ``path`` that ``writer`` (default: this process) writes."""
    w = writer or current_writer()
    return "{}.tmp.{}.{}.{}".format(path, w.host, w.pid, w.start_ms)


def parse_temp_name(name: str):
    """
    ``(target name, WriterId)`` of a temporary file name; the WriterId is None for the
    older ``<name>.tmp.<pid>`` form. None when ``name`` is no temporary file.
    """
    m = _NEW.match(name)
    if m:
        return m["target"], WriterId(m["host"], int(m["pid"]), int(m["start"]))
    m = _OLD.match(name)
    if m:
        return m["target"], None
    return None


def _pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def writer_is_gone(
    writer: Optional[WriterId], mtime_s: float, run_start_ms: int, host: Optional[str] = None
) -> bool:
    """
    Whether a temporary file's writer can no longer finish it.

    On this host: no process has its id, or the one that has started at another time (a
    reused id). On another host, whose processes cannot be seen from here: it started before
    this run, and the file has not been written since this run started (a save in progress
    keeps writing). A file of the older form (no writer) is judged by the second rule alone.
    """
    written_before_run = mtime_s * 1000 < run_start_ms
    if writer is None:
        return written_before_run
    if writer.host == (host or _host()):
        if not _pid_exists(writer.pid):
            return True
        start = process_start_ms(writer.pid)
        return start is not None and abs(start - writer.start_ms) > _START_TOLERANCE_MS
    return writer.start_ms < run_start_ms and written_before_run


def remove_leftover_temp_files(directory: str, run_start_ms: Optional[int] = None) -> List[str]:
    """
    Remove the temporary files in ``directory`` (not its subfolders) that interrupted saves
    left behind, i.e. whose writer :func:`writer_is_gone`; a save in progress by a live
    process is left alone. Logs what was removed and the space freed.

    Args:
        run_start_ms: the start of this run (ms since the epoch); default this process's.
    Returns:
        the paths removed.
    """
    if not directory or not os.path.isdir(directory):
        return []
    if run_start_ms is None:
        run_start_ms = current_writer().start_ms
    removed, freed = [], 0
    for name in sorted(os.listdir(directory)):
        parsed = parse_temp_name(name)
        path = os.path.join(directory, name)
        if parsed is None or not os.path.isfile(path):
            continue
        try:
            st = os.stat(path)
            if not writer_is_gone(parsed[1], st.st_mtime, run_start_ms):
                logger.info("Keeping {}: a live process is writing it".format(path))
                continue
            os.remove(path)
        except FileNotFoundError:  # renamed or removed meanwhile: nothing left over
            continue
        removed.append(path)
        freed += st.st_size
        logger.info("Removed {} ({}), left by an interrupted save".format(path, _size(st.st_size)))
    if removed:
        logger.info(
            "Removed {} temporary file(s) of interrupted saves from {}: {} freed".format(
                len(removed), directory, _size(freed)
            )
        )
    return removed


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB"):
        if n < 1024:
            return "{:.1f} {}".format(n, unit)
        n /= 1024.0
    return "{:.1f} GB".format(n)

"""
Live progress of a ``tools/train_net.py`` subprocess, read from Detectron2's own log lines.

Detectron2 prints, every 20 iterations (``CommonMetricPrinter``)::

    [12/04 16:23:39 d2.utils.events]:  eta: 0:06:31  iter: 19  total_loss: 1.391  ...

and, while it evaluates (``inference_on_dataset``, every 5 s)::

    [12/04 16:31:02 d2.evaluation.evaluator]: Inference done 61/150. ... ETA=0:00:21

:func:`parse_progress` turns such a line into a :class:`Progress` (stage, iterations done, total,
ETA); :class:`ProgressDisplay` shows it as a one-line bar redrawn in place on a terminal, and as
plain lines otherwise (a pipe, a CI log). ``iter: 19`` is Detectron2's index of the last finished
iteration, so 20 are done. The total comes from the run's ``config.yaml`` (``SOLVER.MAX_ITER``),
which ``default_setup`` writes before training starts.
"""

import datetime
import os
import re
import time
from typing import NamedTuple, Optional, TextIO

__all__ = ["Progress", "ProgressDisplay", "parse_progress", "strip_log_prefix", "read_max_iter"]

# Detectron2's logger prefix, "[12/04 16:23:39 d2.utils.events]: " (colours off in a pipe)
_PREFIX = re.compile(r"^\[\d\d/\d\d \d\d:\d\d:\d\d [\w.]+\]: ")
# CommonMetricPrinter: " eta: 0:06:31  iter: 19  total_loss: 1.391  ..." (eta absent at first;
# timedelta's form is "1 day, 2:03:04" beyond a day); matched at the message's start only
_TRAIN = re.compile(
    r"(?:\beta: (?P<eta>(?:\d+ days?, )?\d+:\d\d:\d\d)\s+)?\biter: (?P<iter>\d+)\s"
    r"(?:.*?\btotal_loss: (?P<loss>\S+))?"
)
# inference_on_dataset: "Inference done 61/150. Dataloading: ... ETA=0:00:21"
_EVAL = re.compile(
    r"\bInference done (?P<done>\d+)/(?P<total>\d+)\..*?ETA=(?P<eta>(?:\d+ days?, )?\d+:\d\d:\d\d)"
)


class Progress(NamedTuple):
    stage: str  # "train" or "eval"
    done: int  # iterations (images, for "eval") finished
    total: Optional[int]  # None: not known (yet)
    eta: Optional[float]  # seconds; None: Detectron2 has no estimate yet
    loss: Optional[float] = None  # total_loss (median of the last 20 iterations)


def _seconds(text: Optional[str]) -> Optional[float]:
    if not text:
        return None
    days = 0
    if "day" in text:
        head, text = text.split(",", 1)
        days = int(head.split()[0])
    h, m, s = (int(x) for x in text.strip().split(":"))
    return float(days * 86400 + h * 3600 + m * 60 + s)


def strip_log_prefix(line: str) -> str:
    """The message of a Detectron2 log line, without its ``[date time logger]: `` prefix."""
    return _PREFIX.sub("", line.rstrip("\n")).strip()


def parse_progress(line: str, max_iter: Optional[int] = None) -> Optional[Progress]:
    """A training or evaluation progress line of Detectron2 as :class:`Progress`, else None."""
    message = strip_log_prefix(line)
    m = _EVAL.search(message)
    if m:
        return Progress("eval", int(m["done"]), int(m["total"]), _seconds(m["eta"]))
    m = _TRAIN.match(message)
    if not m:
        return None
    loss = None
    if m["loss"]:
        try:
            loss = float(m["loss"])
        except ValueError:
            pass
    return Progress("train", int(m["iter"]) + 1, max_iter, _seconds(m["eta"]), loss)


def read_max_iter(output_dir: str) -> Optional[int]:
    """``SOLVER.MAX_ITER`` of the run's ``config.yaml`` in ``output_dir``, None where unreadable."""
    import yaml

    try:
        with open(os.path.join(output_dir, "config.yaml")) as f:
            return int(yaml.safe_load(f)["SOLVER"]["MAX_ITER"])
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def _clock(seconds: Optional[float]) -> str:
    return "--:--" if seconds is None else str(datetime.timedelta(seconds=int(seconds)))


def format_progress(name: str, p: Progress, width: int = 24, bar: bool = False) -> str:
    """``[teacher] train |#####-----| 40/200  20%  eta 0:06:31  total_loss 1.391`` (bar=False:
    without the bar)."""
    count = "{}/{}".format(p.done, p.total) if p.total else str(p.done)
    parts = ["[{}] {}".format(name, p.stage)]
    if p.total:
        fraction = min(1.0, p.done / p.total)
        if bar:
            filled = int(round(fraction * width))
            parts.append("|" + "#" * filled + "-" * (width - filled) + "|")
        parts.append(count)
        parts.append("{:3.0f}%".format(100 * fraction))
    else:
        parts.append(count)
    parts.append("eta " + _clock(p.eta))
    if p.loss is not None:
        parts.append("total_loss {:.4g}".format(p.loss))
    return "  ".join(parts)


class ProgressDisplay:
    """
    Shows one run's progress on ``stream``: on a terminal a bar redrawn in place (``\\r``), which
    other lines (:meth:`line`) interrupt; otherwise one plain line per Detectron2 training print
    (every 20 iterations) and per ``eval_period`` seconds of evaluation.
    """

    def __init__(
        self, name: str, stream: TextIO, tty: Optional[bool] = None, eval_period: float = 30.0
    ):
        self.name = name
        self.stream = stream
        self.tty = stream.isatty() if tty is None else tty
        self.eval_period = eval_period
        self._open = False  # a bar is drawn and the cursor is after it
        self._width = 0  # the drawn bar's length, blanked by a shorter one
        self._last_eval = None

    def update(self, p: Progress) -> None:
        if self.tty:
            text = format_progress(self.name, p, bar=True)
            self.stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
            self._open = True
        else:
            if p.stage == "eval":
                now = time.monotonic()
                last = p.total is not None and p.done >= p.total
                if self._last_eval is not None and now - self._last_eval < self.eval_period:
                    if not last:
                        return
                self._last_eval = now
            self.stream.write(format_progress(self.name, p) + "\n")
        self.stream.flush()

    def line(self, text: str) -> None:
        """A line of its own (results, errors), below the bar."""
        self.close()
        self.stream.write("[{}] {}\n".format(self.name, text))
        self.stream.flush()

    def close(self) -> None:
        if self._open:
            self.stream.write("\n")
            self.stream.flush()
            self._open = False
            self._width = 0

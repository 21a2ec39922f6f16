"""Running ``tools/train_net.py`` of a given checkout in a subprocess, as a user would."""

import os
import subprocess
import sys
import time
from typing import Dict, Sequence, Tuple

from .metrics import last_box_ap, load_metrics
from .progress import ProgressDisplay, parse_progress, read_max_iter, strip_log_prefix

__all__ = ["train_and_evaluate", "parse_copypaste_bbox"]

# lines of train_net's output shown live besides the progress (the full output goes to the run's
# log), whole, without Detectron2's "[date time logger]: " prefix
_SHOW = (
    "Total training time",
    "Total inference time",
    "copypaste: ",
    "Traceback",
    "Error",
    "error:",
)


def train_and_evaluate(
    name: str,
    config: str,
    output_dir: str,
    opts: Sequence[str] = (),
    reuse: bool = False,
    log_name: str = "train_net.log",
    eval_only: bool = False,
    *,
    root: str,
) -> Tuple[Dict[str, float], float]:
    """
    Train and evaluate one config with ``root/tools/train_net.py`` in ``output_dir``.

    Args:
        name: label for the live output.
        config: config file (relative to ``root`` or absolute).
        opts: "KEY VALUE" overrides.
        reuse: return the finished run's evaluation if ``model_final.pth`` and a COCO
            evaluation are already in ``output_dir``.
        eval_only: only evaluate (``--eval-only``; pass ``MODEL.WEIGHTS`` in ``opts``); the
            metrics are then read from the printed "copypaste" lines.
        root: the kd_det checkout whose ``tools/train_net.py`` runs, in ``root`` (the caller's
            own checkout: the installed package need not be one).
    Returns:
        (the last COCO box metrics {"AP": .., "AP50": .., ...}, wall seconds; 0 when reused)
    Raises:
        SystemExit: when train_net.py fails, with the log's path (its tail goes to stderr).
    """
    metrics_file = os.path.join(output_dir, "metrics.json")
    final = os.path.join(output_dir, "model_final.pth")
    if reuse and not eval_only and os.path.isfile(final) and os.path.isfile(metrics_file):
        try:
            ap = last_box_ap(load_metrics(metrics_file))
            print("[{}] reusing the finished run in {}".format(name, output_dir))
            return ap, 0.0
        except KeyError:
            pass
    os.makedirs(output_dir, exist_ok=True)
    cmd = (
        [sys.executable, os.path.join(root, "tools", "train_net.py"), "--config-file", config]
        + (["--eval-only"] if eval_only else [])
        + ["OUTPUT_DIR", output_dir]
        + list(opts)
    )
    print(
        "[{}] {}".format(
            name, " ".join(os.path.relpath(c, root) if c.startswith(root) else c for c in cmd)
        ),
        flush=True,
    )
    # a fresh metrics.json: Detectron2 appends, and the result must be this run's only
    if os.path.exists(metrics_file):
        os.remove(metrics_file)
    log_path = os.path.join(output_dir, log_name)
    start = time.time()
    with open(log_path, "w") as log:
        env = dict(os.environ, PYTHONUNBUFFERED="1")  # live progress through the pipe
        proc = subprocess.Popen(
            cmd, cwd=root, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env
        )
        display = ProgressDisplay(name, sys.stdout)
        max_iter = None
        for line in proc.stdout:
            log.write(line)
            if max_iter is None and " iter: " in line:  # config.yaml is written by then
                max_iter = read_max_iter(output_dir)
            progress = parse_progress(line, max_iter)
            if progress is not None:
                display.update(progress)
            elif any(s in line for s in _SHOW):
                display.line(strip_log_prefix(line))
        rc = proc.wait()
        display.close()
    seconds = time.time() - start
    if rc != 0:
        with open(log_path) as f:
            sys.stderr.write("".join(f.readlines()[-30:]))
        raise SystemExit(
            "[{}] tools/train_net.py failed (exit {}); full log: {}".format(name, rc, log_path)
        )
    if eval_only:
        with open(log_path) as f:
            return parse_copypaste_bbox(f.read()), seconds
    return last_box_ap(load_metrics(metrics_file)), seconds


def parse_copypaste_bbox(log: str) -> Dict[str, float]:
    """
    The last COCO box metrics Detectron2 printed with ``print_csv_format``::

        copypaste: Task: bbox
        copypaste: AP,AP50,AP75,APs,APm,APl
        copypaste: 5.3012,13.6389,2.9113,5.7012,5.4123,nan
    """
    lines = [
        ln.split("copypaste: ", 1)[1].strip() for ln in log.splitlines() if "copypaste: " in ln
    ]
    for i in range(len(lines) - 3, -1, -1):
        if lines[i] == "Task: bbox":
            keys, values = lines[i + 1].split(","), lines[i + 2].split(",")
            return {k: float(v) for k, v in zip(keys, values)}
    raise KeyError("no COCO box metrics ('copypaste: Task: bbox') in the log")

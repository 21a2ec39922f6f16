#!/usr/bin/env python
"""
Plot Detectron2 metrics.json files as PNG curves: total loss, each detection loss,
each ``loss_kd_*`` term, and box AP over iterations, one line per run.

    tools/plot_metrics.py output/run/metrics.json -o curves.png
    tools/plot_metrics.py a/metrics.json b/metrics.json --labels teacher student -o curves.png
"""

import argparse
import os

from kd_det.utils.metrics import load_metrics, metric_series


def plot_runs(runs, output, smooth=1):
    """
    Args:
        runs: list of (label, records) with records from :func:`load_metrics`.
        output: PNG path.
        smooth: moving-average window over logged points (1: none).
    Returns:
        the list of plotted metric keys.
    """
    import matplotlib

    matplotlib.use("Agg")  # no display on training machines
    import matplotlib.pyplot as plt

    keys = set()
    for _, records in runs:
        for rec in records:
            keys.update(k for k in rec if k.startswith("loss_") or k in ("total_loss", "bbox/AP"))
    # total loss first, then the KD terms, then detection losses, AP last
    order = sorted(
        keys, key=lambda k: (k != "total_loss", not k.startswith("loss_kd"), k == "bbox/AP", k)
    )
    if not order:
        raise ValueError("no loss or AP values to plot in the given metrics files")
    cols = min(3, len(order))
    rows = (len(order) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.2 * rows), squeeze=False)
    for ax, key in zip(axes.flat, order):
        for label, records in runs:
            its, vals = metric_series(records, key)
            if not its:
                continue
            if smooth > 1 and key != "bbox/AP":
                vals = [
                    sum(vals[max(0, i - smooth + 1) : i + 1])
                    / len(vals[max(0, i - smooth + 1) : i + 1])
                    for i in range(len(vals))
                ]
            ax.plot(its, vals, marker="o" if len(its) < 3 else None, label=label)
        ax.set_title(key)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(order) :]:
        ax.axis("off")
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    fig.savefig(output, dpi=90)
    plt.close(fig)
    return order


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "metrics", nargs="+", help="metrics.json files (or the output folders holding them)"
    )
    parser.add_argument(
        "--labels", nargs="*", help="one label per file (default: the folder names)"
    )
    parser.add_argument("-o", "--output", default="metrics.png")
    parser.add_argument(
        "--smooth", type=int, default=1, help="moving average over this many logged points"
    )
    args = parser.parse_args(argv)
    paths = [os.path.join(p, "metrics.json") if os.path.isdir(p) else p for p in args.metrics]
    labels = args.labels or [os.path.basename(os.path.dirname(os.path.abspath(p))) for p in paths]
    if len(labels) != len(paths):
        parser.error(
            "--labels needs one label per metrics file ({} files, {} labels)".format(
                len(paths), len(labels)
            )
        )
    for p in paths:
        if not os.path.isfile(p):
            parser.error(
                "no metrics file at {}; pass a training OUTPUT_DIR or its metrics.json".format(p)
            )
    keys = plot_runs(
        [(lab, load_metrics(p)) for lab, p in zip(labels, paths)], args.output, args.smooth
    )
    print("wrote {} ({})".format(args.output, ", ".join(keys)))


if __name__ == "__main__":
    main()

"""Reading Detectron2's ``metrics.json`` (one JSON record per line, written by JSONWriter)."""

import json
import math
from typing import Dict, List, Tuple

__all__ = ["COCO_BOX_KEYS", "load_metrics", "metric_series", "last_box_ap"]

# the COCO box metrics Detectron2's COCOEvaluator logs as "bbox/<key>"
COCO_BOX_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


def load_metrics(path: str) -> List[Dict]:
    """
    Records of a metrics.json, sorted by iteration.  A resumed run appends records
    for iterations it repeats: the later record of an iteration wins for each key.
    Lines that are not complete JSON (a run killed mid-write) are skipped.
    """
    by_iter: Dict[int, Dict] = {}
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            it = int(rec.get("iteration", -1))
            by_iter.setdefault(it, {}).update(rec)
    return [by_iter[k] for k in sorted(by_iter)]


def metric_series(records: List[Dict], key: str) -> Tuple[List[int], List[float]]:
    """(iterations, values) of ``key`` over the records that have it."""
    its, vals = [], []
    for rec in records:
        if key in rec and isinstance(rec[key], (int, float)):
            its.append(int(rec["iteration"]))
            vals.append(float(rec[key]))
    return its, vals


def last_box_ap(records: List[Dict]) -> Dict[str, float]:
    """The last COCO box evaluation in the records: {"AP": .., "AP50": .., ...} (NaN where
    absent)."""
    for rec in reversed(records):
        if "bbox/AP" in rec:
            return {k: float(rec.get("bbox/" + k, math.nan)) for k in COCO_BOX_KEYS}
    raise KeyError("no COCO box evaluation ('bbox/AP') in these metrics; was the model evaluated?")

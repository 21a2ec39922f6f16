from .metrics import COCO_BOX_KEYS, last_box_ap, load_metrics, metric_series

__all__ = ["COCO_BOX_KEYS", "last_box_ap", "load_metrics", "metric_series"]

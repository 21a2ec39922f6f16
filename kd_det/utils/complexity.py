"""
Size and inference cost of a detector, counted the way Detectron2's
``tools/analyze_model.py`` does: fvcore's operator counts (one multiply-add counts as
one flop) on real test images, preprocessed as at test time.
"""

import itertools
import warnings
from typing import Dict

import torch
from detectron2.utils.analysis import FlopCountAnalysis, parameter_count

from ..config.detector import DetectorConfig
from ..config.loaders import test_loader

__all__ = ["model_complexity"]


def model_complexity(
    cfg: DetectorConfig, model: torch.nn.Module, num_images: int = 5
) -> Dict[str, float]:
    """
    Args:
        cfg: the model's config, yacs (its ``DATASETS.TEST[0]`` supplies the images,
            preprocessed as at test time) or LazyConfig (its ``dataloader.test`` does).
        model: the detector (its weights matter: R-CNN heads' cost follows the proposals).
        num_images: images to average the flops over.
    Returns:
        {"params_m": parameters in millions, "gflops": mean per image, in 1e9
        multiply-adds, "images": how many were counted, "size": mean "HxW" input}.
    """
    try:
        loader, test_set = test_loader(cfg)
    except ValueError as e:
        raise ValueError("counting flops needs test images: {}".format(e)) from e
    was_training = model.training
    model.eval()
    counts, heights, widths = [], [], []
    try:
        with warnings.catch_warnings():
            # the count traces the model: TorchScript's deprecation and Detectron2's
            # shape asserts (tensor -> bool) warn each time, harmlessly for a count
            warnings.simplefilter("ignore", FutureWarning)
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            for batch in itertools.islice(loader, num_images):
                analysis = FlopCountAnalysis(model, batch)
                # fvcore warns once per op it does not count (elementwise ops, NMS) and per
                # module the trace did not reach: expected here, and noise in a report
                analysis.unsupported_ops_warnings(False)
                analysis.uncalled_modules_warnings(False)
                counts.append(analysis.total())
                heights.append(batch[0]["image"].shape[1])
                widths.append(batch[0]["image"].shape[2])
    finally:
        model.train(was_training)
    if not counts:
        raise ValueError("test set {!r} has no images to count flops on".format(test_set))
    return {
        "params_m": parameter_count(model)[""] / 1e6,
        "gflops": sum(counts) / len(counts) / 1e9,
        "images": len(counts),
        "size": "{:.0f}x{:.0f}".format(sum(heights) / len(heights), sum(widths) / len(widths)),
    }

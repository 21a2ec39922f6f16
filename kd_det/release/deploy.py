"""
Deployment: TorchScript and ONNX export of a released student
(:mod:`kd_det.release.student`), by Detectron2's tracing route (``TracingAdapter`` +
``torch.jit.trace`` / ``torch.onnx.export``, as in Detectron2's ``tools/deploy``).

The exported file takes one preprocessed image and returns its detections.  ``model.ts``
loads with ``torch.jit.load`` in Python or C++ (libtorch) with torch and torchvision
only; ``model.onnx`` runs in ONNX Runtime without torch.  Neither needs Detectron2 or
kd_det.  Input sizes may vary from call to call; the batch is one image.  A sidecar
JSON says how to preprocess and what comes out.  Each export is checked against the
eager model on the sample image and on two crops of other sizes: their detections are
matched one to one, within bounds derived from float32 rounding, and a detection only one
side has must sit at a cutoff (score threshold, cap, NMS) that rounding can move it across
(:func:`match_detections`).

The student's config (``release_student``'s config.yaml, yacs or LazyConfig) reduces to
:class:`DeploySettings`.
"""

import contextlib
import io
import json
import logging
import math
import os
import sys
import warnings
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.data import DatasetCatalog, MetadataCatalog, detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import GeneralizedRCNN
from detectron2.structures import Boxes, pairwise_iou

from ..checkpoint import atomic_write_bytes, file_sha256
from ..config.detector import (
    DetectorConfig,
    build_detector,
    detector_settings,
    fixed_test_resize,
)
from ..config.student import student_model_config
from .student import StudentCheckpointer

__all__ = [
    "OUTPUT_NAMES",
    "DeploySettings",
    "deploy_settings",
    "detections",
    "preprocess",
    "load_sample_image",
    "load_student",
    "trace_student",
    "rounding_error",
    "DetectionBounds",
    "detection_bounds",
    "relaxed_test_settings",
    "DetectionMatch",
    "match_detections",
    "compare_detections",
    "compare_traced",
    "export_torchscript",
    "export_onnx",
]

OUTPUT_NAMES = ("boxes", "scores", "classes")

# How far two float32 runs of one student on one image may differ and still give the same
# detections.  Kernels that sum in another order (PyTorch's scalar, AVX2 or AVX512 code,
# oneDNN's convolution algorithms, per-thread partial sums; ONNX Runtime's MLAS kernels) move
# every sum by rounding errors.  The score threshold, NMS and the cap per image turn those
# into different sets of detections near their cutoffs, which match_detections allows for;
# the bounds below are on the values of one detection.
#
# Logits and box deltas (rounding_error): one output of a convolution or linear layer of n
# terms summed in any order is off by at most gamma(n) sum|w x| (Higham, Accuracy and
# Stability of Numerical Algorithms, 2002, eq. 3.5), n u relative to the terms' size (u =
# 2**-24); rounding errors behave as independent variables, which gives about sqrt(n) u
# instead (Higham & Mary, SIAM J. Sci. Comput. 41, 2019).  Adding one such error per layer,
# over all the model's convolutions and linear layers (parallel branches too, which only
# overcounts), with terms of order one (normalised activations, weights of norm ~1):
#     |dz| <= sum_l sqrt(n_l) u,
# 1.2e-4 for Detectron2's R-50-FPN Faster R-CNN (COCO), 1.4e-4 for its RetinaNet, 2.2e-4
# for R-101, 6.3e-5 for the tests' R-18 students.  This is a model of the rounding, not a
# proof: the worst case, n u per layer, is sqrt(n) times larger (68 at n = 512 * 9), and a
# network whose layers cancel (large terms, small sums) exceeds the model.  Measured on the
# tests' untrained R-18 students (4 initialisations, images of 64 to 640 px), PyTorch's
# scalar kernels on one thread against its AVX512 ones on two differ by at most 14% of the
# score bound below and 17% of the box bound; float32 against float64, and eager against ONNX
# Runtime (under the ONNX bound), by at most 4% and 1.3% (images of 64 to 1216 px).
_U32 = 2.0**-24  # float32's unit roundoff
# Scores are sigmoid(z) (RetinaNet; slope at most 1/4) or softmax(z)_c (R-CNN; it moves by
# at most 2 p (1 - p) max|dz| <= max|dz| / 2), in [0, 1]: |dp| <= |dz| / 2.
SCORE_PER_LOGIT = 0.5
# Boxes are decoded from an anchor or proposal (centre x_a, width w_a) and deltas (dx, dw):
# x0 = x_a + w_a dx - w / 2 with w = w_a exp(dw), so |d x0| <= w_a |d dx| + w |d dw| / 2, the
# exponentiated delta's error times the box's own width; 1.5 S |dz| for anchors and boxes of
# at most S = max(H, W) pixels (the box transform's weights, R-CNN's 10, 10, 5, 5, divide the
# deltas, which only helps).  R-CNN decodes twice (its proposals are the box head's anchors,
# their RoIAlign features moving with them): counted as twice that, 3 S |dz|, for both kinds.
# Anchors or unclipped boxes larger than the image (RetinaNet's 512 px anchors on a 64 px
# test image) scale it by their size over S: there the bound assumes rather than derives.
# The rounding of the coordinates themselves, a few u S, is far below.  For the R-50-FPN
# R-CNN on a 1333 px COCO input this is 0.49 px (0.88 px for R-101), for the tests' students
# on their 64 px images 0.012 px.
BOX_PER_LOGIT = 3.0
# ONNX Runtime computes with its own kernels (MLAS convolutions, BatchNorm folded into the
# convolution weights, fused activations), which no ATEN_CPU_CAPABILITY / ONEDNN_MAX_CPU_ISA
# setting of PyTorch reproduces: an engineering bound, twice the above for scores and boxes
# (0.98 px for the R-50-FPN R-CNN at 1333 px, 0.024 px for the tests' students at 64 px).
ONNX_FACTOR = 2.0
ONNX_OPSET = 17


@dataclass(frozen=True)
class DeploySettings:
    """
    What an export reads from the student's config besides the model: the test-time
    preprocessing a deployment must repeat, and the datasets that give the sample image
    and the class names.
    """

    input_format: str  # channel order of the model's input, "BGR" or "RGB"
    min_size_test: int  # shortest edge resized to this (DefaultPredictor's ResizeShortestEdge)
    max_size_test: int  # ... with the longest edge at most this
    test_datasets: Tuple[str, ...] = ()
    train_datasets: Tuple[str, ...] = ()


def deploy_settings(cfg: Union[DetectorConfig, DeploySettings]) -> DeploySettings:
    """
    The :class:`DeploySettings` of a student's config (returned as is when already one):
    its test-time resize, which must be one fixed-size bilinear ``ResizeShortestEdge``
    (:func:`~kd_det.config.detector.fixed_test_resize`: what the sidecar JSON can
    describe), its input format and its datasets.
    """
    if isinstance(cfg, DeploySettings):
        return cfg
    min_size, max_size = fixed_test_resize(cfg)
    settings = detector_settings(cfg)
    return DeploySettings(
        settings.input_format, min_size, max_size, settings.test_datasets, settings.train_datasets
    )


def detections(
    model: torch.nn.Module, image: torch.Tensor
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Detections of a GeneralizedRCNN or RetinaNet (eval mode) on one preprocessed image.

    Args:
        image: (3, H, W) float, pixel values 0-255 in ``cfg.INPUT.FORMAT``, already resized.
    Returns:
        boxes (N, 4) XYXY in the pixels of ``image``, scores (N,), classes (N,) int64.
    """
    inputs = [{"image": image}]
    if isinstance(model, GeneralizedRCNN):
        # no rescaling: the image is already the network's input
        instances = model.inference(inputs, do_postprocess=False)[0]
    else:
        # RetinaNet rescales to the input's own size (a no-op) and drops empty boxes
        instances = model(inputs)[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def preprocess(cfg, image: np.ndarray) -> torch.Tensor:
    """
    What ``DefaultPredictor`` does before the network: shortest edge to
    ``min_size_test`` (longest at most ``max_size_test``), HWC -> CHW float.

    Args:
        cfg: the student's config (yacs or LazyConfig) or its :class:`DeploySettings`.
        image: (H, W, 3) uint8 in the config's input format.
    Returns:
        (3, H', W') float32.
    """
    settings = deploy_settings(cfg)
    resize = T.ResizeShortestEdge([settings.min_size_test] * 2, settings.max_size_test)
    resized = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))


def load_sample_image(cfg, path: str = "") -> Tuple[np.ndarray, str]:
    """
    The image to trace with: ``path``, or else the first image of the first test set
    (``DATASETS.TEST``, a LazyConfig's ``dataloader.test.dataset.names``).

    Args:
        cfg: the student's config (yacs or LazyConfig) or its :class:`DeploySettings`.
    Returns:
        (H, W, 3) uint8 in the config's input format, and the file it came from.
    Raises:
        ValueError naming the fix when there is no image to use.
    """
    settings = deploy_settings(cfg)
    if not path:
        if not settings.test_datasets:
            raise ValueError(
                "tracing needs a sample image: pass --sample-image PATH (the config has no "
                "test set to take one from)"
            )
        name = settings.test_datasets[0]
        try:
            records = DatasetCatalog.get(name)
        except Exception as e:
            raise ValueError(
                "tracing needs a sample image and test set {!r} cannot be loaded ({}: {}): pass "
                "--sample-image PATH".format(name, type(e).__name__, e)
            ) from e
        if not records:
            raise ValueError("test set {!r} is empty: pass --sample-image PATH".format(name))
        path = records[0]["file_name"]
    if not os.path.isfile(path):
        raise FileNotFoundError("sample image {!r} does not exist".format(path))
    return detection_utils.read_image(path, format=settings.input_format), path


def trace_student(model: torch.nn.Module, image: torch.Tensor) -> torch.jit.ScriptModule:
    """
    Trace ``model`` (eval mode) on one preprocessed image (3, H, W); the result maps an
    image tensor to ``(boxes, scores, classes)`` as :func:`detections` does.
    """
    from detectron2.export import TracingAdapter  # needs the installer's fix on pure-Python v0.6

    adapter = TracingAdapter(model, image, detections)
    with warnings.catch_warnings():
        # PyTorch deprecates TorchScript (FutureWarning); Detectron2's shape asserts and
        # empty-input checks convert tensors to bools (TracerWarning): both expected, and
        # the traced graph is checked against the eager model on other sizes instead.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)


def _other_sizes(image: torch.Tensor) -> List[torch.Tensor]:
    """``image`` and two crops of other sizes: a traced graph that baked in a shape fails on
    them."""
    _, h, w = image.shape
    return [
        image,
        image[:, : max(h * 3 // 4, 32), :].contiguous(),
        image[:, :, : max(w * 5 // 8, 32)].contiguous(),
    ]


def _test_settings(model: torch.nn.Module) -> Tuple[torch.nn.Module, Tuple[str, str, str]]:
    """
    The module that holds the model's test-time score threshold, NMS threshold and cap on
    detections per image, and the names of those attributes (R-CNN: its box predictor's).
    """
    if isinstance(model, GeneralizedRCNN):
        names = ("test_score_thresh", "test_nms_thresh", "test_topk_per_image")
        return model.roi_heads.box_predictor, names
    return model, ("test_score_thresh", "test_nms_thresh", "max_detections_per_image")


@dataclass(frozen=True)
class DetectionBounds:
    """
    How far two runs of one detector on one image may differ in a detection's box and
    score (:func:`detection_bounds`), and the model's test-time cutoffs, near which the
    runs may keep different detections.
    """

    image_size: Tuple[int, int]  # (H, W) of the pixels the boxes are in
    box: float  # pixels: largest difference of one box coordinate
    score: float  # largest difference of one score
    score_thresh: float = 0.0  # detections score above this
    nms_thresh: Optional[float] = None  # IoU threshold of the per-class NMS (None: no NMS)
    max_detections: int = -1  # cap on detections per image (negative: none)
    nms_before_clip: bool = False  # NMS saw the boxes before their clipping (RetinaNet)
    drops_empty: bool = False  # boxes of no width or height are dropped (detector_postprocess)


def rounding_error(model: torch.nn.Module) -> float:
    """
    The modelled float32 error of one of ``model``'s logits or box deltas when its kernels
    sum in another order (see ``SCORE_PER_LOGIT`` above): sum_l sqrt(n_l) u over its
    convolutions and linear layers, n_l the terms of one output (the bias is one).
    """
    total = 0.0
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
            total += math.sqrt(fan_in + 1)
        elif isinstance(module, torch.nn.Linear):
            total += math.sqrt(module.in_features + 1)
    return total * _U32


def detection_bounds(
    model: torch.nn.Module,
    image_size: Sequence[int],
    box: Optional[float] = None,
    score: Optional[float] = None,
    factor: float = 1.0,
    postprocessed: bool = False,
) -> DetectionBounds:
    """
    :class:`DetectionBounds` of a GeneralizedRCNN or RetinaNet (a DenseDetector) on an
    image of ``image_size`` (H, W): its test-time cutoffs, and unless given, the bounds
    derived from its :func:`rounding_error` ``dz``: ``SCORE_PER_LOGIT * dz`` on a score,
    ``BOX_PER_LOGIT * dz * max(H, W)`` pixels on a box coordinate.

    Args:
        factor: multiplies the derived bounds (``ONNX_FACTOR`` for ONNX Runtime's kernels).
        postprocessed: the detections went through ``detector_postprocess`` (the model's
            ``forward``; :func:`detections` of an R-CNN skips it), which drops empty boxes.
    """
    owner, names = _test_settings(model)
    score_thresh, nms_thresh, cap = (getattr(owner, name) for name in names)
    rcnn = isinstance(model, GeneralizedRCNN)
    size = (int(image_size[0]), int(image_size[1]))
    dz = factor * rounding_error(model)
    box = BOX_PER_LOGIT * dz * max(size) if box is None else float(box)
    score = SCORE_PER_LOGIT * dz if score is None else float(score)
    return DetectionBounds(
        size,
        box,
        score,
        float(score_thresh),
        float(nms_thresh),
        int(cap),
        nms_before_clip=not rcnn,
        drops_empty=postprocessed or not rcnn,
    )


@contextlib.contextmanager
def relaxed_test_settings(model: torch.nn.Module, score: float):
    """
    Within this context ``model`` keeps every detection another run of it could keep: its
    score threshold lowered by ``score``, no NMS, no cap per image.  What it detects then
    are the ``candidates`` of :func:`match_detections`.
    """
    owner, names = _test_settings(model)
    saved = [getattr(owner, name) for name in names]
    # NMS suppresses a box whose IoU with a kept one is above the threshold: above 1, none
    relaxed = [saved[0] - score, 2.0, sys.maxsize]
    try:
        for name, value in zip(names, relaxed):
            setattr(owner, name, value)
        yield model
    finally:
        for name, value in zip(names, saved):
            setattr(owner, name, value)


@dataclass
class DetectionMatch:
    """What :func:`match_detections` found."""

    pairs: List[Tuple[int, int]]  # (index in a, index in b) of the detections that agree
    unmatched: List[str] = field(default_factory=list)  # why each unmatched one is allowed
    disagreements: List[str] = field(default_factory=list)  # each one nothing explains
    max_box_diff: float = 0.0  # over the pairs, pixels
    max_score_diff: float = 0.0


# (boxes (N, 4) XYXY pixels, scores (N,), classes (N,)), tensors or arrays
Detections = Sequence[Union[torch.Tensor, np.ndarray]]


def _as_detections(dets: Detections) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Boxes (N, 4) and scores (N,) in float64, classes (N,) int64, on the CPU."""
    boxes, scores, classes = (torch.as_tensor(t).detach().cpu() for t in dets)
    return boxes.double().reshape(-1, 4), scores.double().reshape(-1), classes.long().reshape(-1)


def _box_diff(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N, M): the largest difference of a coordinate of a[i] (N, 4) and b[j] (M, 4)."""
    if not len(a) or not len(b):
        return a.new_zeros(len(a), len(b))
    return (a[:, None] - b[None]).abs().amax(dim=2)


def _agree(a, b, bounds: DetectionBounds) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(N, M) IoU, largest coordinate difference, and whether a[i] and b[j] agree."""
    iou = pairwise_iou(Boxes(a[0]), Boxes(b[0]))
    box_diff = _box_diff(a[0], b[0])
    agree = (
        (a[2][:, None] == b[2][None])
        & (box_diff <= bounds.box)
        & ((a[1][:, None] - b[1][None]).abs() <= bounds.score)
    )
    return iou, box_diff, agree


def _iou_bound(a: torch.Tensor, b: torch.Tensor, delta: float) -> torch.Tensor:
    """
    (N, M): how far IoU(a[i], b[j]) can move when each coordinate of a[i] moves by up to
    ``delta`` pixels.  Widths of the intersection and of a[i] move by up to 2 delta, so the
    intersection I by dI = 2 delta (w_I + h_I) + 4 delta^2, a[i]'s area alike by dA, the
    union U by dU = dA + dI, and I / U by (dI + IoU dU) / (U - dU); unbounded once dU >= U.
    """
    delta = max(float(delta), 0.0)
    wa, ha = (a[:, 2] - a[:, 0]).clamp(min=0), (a[:, 3] - a[:, 1]).clamp(min=0)
    wb, hb = (b[:, 2] - b[:, 0]).clamp(min=0), (b[:, 3] - b[:, 1]).clamp(min=0)
    wi = torch.min(a[:, None, 2], b[None, :, 2]) - torch.max(a[:, None, 0], b[None, :, 0])
    hi = torch.min(a[:, None, 3], b[None, :, 3]) - torch.max(a[:, None, 1], b[None, :, 1])
    wi, hi = wi.clamp(min=0), hi.clamp(min=0)
    inter = wi * hi
    union = (wa * ha)[:, None] + (wb * hb)[None] - inter
    d_inter = 2 * delta * (wi + hi) + 4 * delta**2
    d_union = (2 * delta * (wa + ha) + 4 * delta**2)[:, None] + d_inter
    iou = torch.where(inter > 0, inter / union.clamp(min=1e-300), torch.zeros_like(inter))
    low = union - d_union
    bound = (d_inter + iou * d_union) / low.clamp(min=1e-300)
    return torch.where(low > 0, bound, torch.full_like(low, math.inf))


def _describe(dets, i: int, name: str) -> str:
    boxes, scores, classes = dets
    box = ", ".join("{:.2f}".format(float(v)) for v in boxes[i])
    return "detection {} of {} (class {}, score {:.6g}, box [{}])".format(
        i, name, int(classes[i]), float(scores[i]), box
    )


def _nearest(
    dets,
    i: int,
    others,
    iou: torch.Tensor,
    box_diff: torch.Tensor,
    bounds: DetectionBounds,
    where: str,
) -> str:
    """What differs between detection ``i`` and the nearest of ``others`` (by IoU, then box)."""
    if not len(others[0]):
        return "{} has no detections".format(where)
    j = int(torch.argmax(iou[i])) if float(iou[i].max()) > 0 else int(torch.argmin(box_diff[i]))
    differs = []
    if int(others[2][j]) != int(dets[2][i]):
        differs.append("class {} (not {})".format(int(others[2][j]), int(dets[2][i])))
    if float(box_diff[i, j]) > bounds.box:
        differs.append(
            "box by {:.3g} px (bound {:.3g} px)".format(float(box_diff[i, j]), bounds.box)
        )
    score_diff = abs(float(others[1][j]) - float(dets[1][i]))
    if score_diff > bounds.score:
        differs.append("score by {:.3g} (bound {:.3g})".format(score_diff, bounds.score))
    nearest = "the nearest in {}, its detection {} (IoU {:.3f}), ".format(
        where, j, float(iou[i, j])
    )
    if not differs:
        return nearest + "agrees but is the counterpart of another"
    return nearest + "differs: " + ", ".join(differs)


def _on_border(boxes: torch.Tensor, bounds: DetectionBounds) -> torch.Tensor:
    """Whether each box (..., 4) touches the image's border, within the box bound."""
    h, w = bounds.image_size
    margin = bounds.box
    return (
        (boxes[..., 0] <= margin)
        | (boxes[..., 1] <= margin)
        | (boxes[..., 2] >= w - margin)
        | (boxes[..., 3] >= h - margin)
    )


def _why_absent(
    dets,
    i: int,
    others,
    iou: torch.Tensor,
    iou_bound: torch.Tensor,
    bounds: DetectionBounds,
    where: str,
) -> Optional[str]:
    """
    Why detection ``i`` of one run may be absent from ``others``, the other run's, given
    that its box and score may differ there by the bounds; None where nothing explains it.

    Args:
        iou, iou_bound: (N, M) IoU of the two runs' boxes, and its :func:`_iou_bound`.
    """
    boxes, scores, classes = dets
    score = float(scores[i])
    if score <= bounds.score_thresh + bounds.score:
        return "its score is within {:.2g} of the threshold {:.4g}".format(
            bounds.score, bounds.score_thresh
        )
    full = 0 < len(others[1]) and 0 <= bounds.max_detections <= len(others[1])
    if full and score <= float(others[1].min()) + bounds.score:
        return "it ranks near the cap of {} detections in {}".format(bounds.max_detections, where)
    width, height = (boxes[i, 2:] - boxes[i, :2]).tolist()
    if bounds.drops_empty and min(width, height) <= bounds.box:
        return "its box is empty within {:.2g} px, and empty boxes are dropped".format(bounds.box)
    if bounds.nms_thresh is None or not len(others[0]):
        return None
    # NMS in the other run can suppress it by a kept box of its class scoring at least as high
    # (within the score bound) whose IoU with it is above the threshold, less how far the box
    # bound moves the IoU: an IoU at the threshold, or a swap of two boxes whose scores tie
    overlaps = iou[i] > bounds.nms_thresh - iou_bound[i]
    if bounds.nms_before_clip and bool(_on_border(boxes[i], bounds)):
        # RetinaNet's NMS sees boxes before clipping: of two boxes both cut by the border, the
        # output does not tell the IoU it saw (for one cut box, its IoU is the larger)
        overlaps |= _on_border(others[0], bounds)
    suppressors = (others[2] == classes[i]) & (others[1] >= score - bounds.score) & overlaps
    if not suppressors.any():
        return None
    j = int(torch.nonzero(suppressors)[0])
    return "NMS in {} may suppress it by its detection {} (IoU {:.4f}, threshold {:.4g})".format(
        where, j, float(iou[i, j]), bounds.nms_thresh
    )


def match_detections(
    a: Detections,
    b: Detections,
    bounds: DetectionBounds,
    candidates: Union[None, Detections, Callable[[], Detections]] = None,
    names: Tuple[str, str] = ("the model", "the export"),
) -> DetectionMatch:
    """
    Match the detections of two runs of one detector on one image one to one, and explain
    the rest.

    Two detections agree when their classes are equal and their box coordinates and scores
    differ by at most ``bounds.box`` and ``bounds.score``; agreeing pairs are matched
    greedily by IoU (Detectron2's ``pairwise_iou``), then by box difference (which pairs
    boxes of no area too), in whatever order the runs list them.  A detection of one run
    without a match is allowed where another float32 run may drop it: its score is within
    the score bound of the threshold; the other run is full and it ranks at the cap; its
    box is empty within the box bound where empty boxes are dropped; or NMS may suppress
    it in the other run, by a detection there of the same class, scoring at least as high
    within the score bound, whose IoU with it exceeds the NMS threshold less how far the box
    bound moves the IoU (an IoU at the threshold, or a kept/suppressed swap of two boxes
    whose scores tie).  A detection of ``b`` without a match must moreover agree with one of
    ``candidates``, what ``a``'s model detects with its cutoffs relaxed
    (:func:`relaxed_test_settings`): a moved box is no NMS swap.  Without ``candidates``
    the explanations alone are checked.  Cutoffs inside the model that its outputs do not
    show are not allowed for: RetinaNet's per-level top-k candidates, and R-CNN's proposals
    (the RPN's top-k and NMS), where a tie changes what the box head sees.

    Args:
        a, b: boxes (N, 4) XYXY in pixels, scores (N,), classes (N,) of the two runs; ``a``
            is the reference (the eager model).
        bounds: :func:`detection_bounds` of the model on the image.
        candidates: as ``a``, or a function that returns them (called only when needed).
        names: of the runs, for the messages.
    Returns:
        a :class:`DetectionMatch`, whose ``disagreements`` name each detection nothing
        explains and what differs from the nearest one in the other run.
    """
    a, b = _as_detections(a), _as_detections(b)
    iou, box_diff, agree = _agree(a, b, bounds)
    pairs, used_a, used_b = [], set(), set()
    ranked = sorted(
        torch.nonzero(agree).tolist(),
        key=lambda ij: (-float(iou[ij[0], ij[1]]), float(box_diff[ij[0], ij[1]])),
    )
    for i, j in ranked:
        if i not in used_a and j not in used_b:
            pairs.append((i, j))
            used_a.add(i)
            used_b.add(j)
    match = DetectionMatch(sorted(pairs))
    if pairs:
        index_a, index_b = (torch.tensor(t) for t in zip(*pairs))
        match.max_box_diff = float(box_diff[index_a, index_b].max())
        match.max_score_diff = float((a[1][index_a] - b[1][index_b]).abs().max())

    iou_bound = _iou_bound(a[0], b[0], bounds.box)
    for i in range(len(a[0])):
        if i in used_a:
            continue
        why = _why_absent(a, i, b, iou, iou_bound, bounds, names[1])
        missing = "{} is not in {}: ".format(_describe(a, i, names[0]), names[1])
        if why is None:
            match.disagreements.append(missing + _nearest(a, i, b, iou, box_diff, bounds, names[1]))
        else:
            match.unmatched.append(missing + why)

    unmatched_b = [j for j in range(len(b[0])) if j not in used_b]
    if unmatched_b and callable(candidates):
        candidates = candidates()
    if unmatched_b and candidates is not None:
        candidates = _as_detections(candidates)
    iou_bound = _iou_bound(b[0], a[0], bounds.box)
    for j in unmatched_b:
        missing = "{} is not in {}: ".format(_describe(b, j, names[1]), names[0])
        width, height = (b[0][j, 2:] - b[0][j, :2]).tolist()
        if bounds.drops_empty and min(width, height) <= bounds.box:
            # which the candidates, dropping it too, cannot show
            match.unmatched.append(
                missing + "its box is empty within {:.2g} px, and empty boxes "
                "are dropped".format(bounds.box)
            )
            continue
        if candidates is not None:
            # one row at a time: the candidates of a low threshold without NMS are many
            row = tuple(t[j : j + 1] for t in b)
            cand_iou, cand_box_diff, cand_agree = _agree(row, candidates, bounds)
            if not cand_agree.any():
                nearest = _nearest(row, 0, candidates, cand_iou, cand_box_diff, bounds, "them")
                match.disagreements.append(
                    "{} is not among what {} detects without NMS, cap or "
                    "threshold: {}".format(_describe(b, j, names[1]), names[0], nearest)
                )
                continue
        why = _why_absent(b, j, a, iou.t(), iou_bound, bounds, names[0])
        if why is None:
            match.disagreements.append(
                missing + _nearest(b, j, a, iou.t(), box_diff.t(), bounds, names[0])
            )
        else:
            match.unmatched.append(missing + why)
    return match


def compare_detections(
    model: torch.nn.Module,
    run: Callable[[torch.Tensor], Sequence[torch.Tensor]],
    images: Sequence[torch.Tensor],
    what: str = "the traced student",
    box_atol: Optional[float] = None,
    score_atol: Optional[float] = None,
    factor: float = 1.0,
) -> List[Dict[str, object]]:
    """
    Run the eager model and an exported one (``run``: image -> boxes, scores, classes) on
    each image and match their detections (:func:`match_detections`, with what the model
    detects under :func:`relaxed_test_settings` as the candidates); one row per image.

    Args:
        images: preprocessed images, (3, H, W) each.
        box_atol, score_atol: bounds on the difference of a box coordinate (pixels) and of a
            score; unless given, derived from the model (:func:`detection_bounds`).
        factor: multiplies the derived bounds.
    Returns:
        rows {"size": [H, W], "detections": the model's count, "exported": the export's,
        "matched", "unmatched": why each unmatched detection is allowed, "max_box_diff" and
        "max_score_diff" over the matched, "box_bound", "score_bound"}.
    Raises:
        RuntimeError naming ``what``, the image size and the first detection that disagrees.
    """
    rows = []
    for image in images:
        with torch.no_grad():
            eager = detections(model, image)
            out = list(run(image))
        size = [int(image.shape[1]), int(image.shape[2])]
        if len(out) != 3:
            raise RuntimeError(
                "{} gives {} outputs on a {}x{} image, not boxes, scores and "
                "classes".format(what, len(out), size[0], size[1])
            )
        bounds = detection_bounds(model, size, box_atol, score_atol, factor)

        def candidates():
            with torch.no_grad(), relaxed_test_settings(model, bounds.score):
                return detections(model, image)

        match = match_detections(eager, out, bounds, candidates, ("the model", what))
        if match.disagreements:
            more = len(match.disagreements) - 1
            raise RuntimeError(
                "{} disagrees with the model on a {}x{} image, where it gives {} "
                "detections and the model {}: {}{}".format(
                    what,
                    size[0],
                    size[1],
                    len(out[0]),
                    len(eager[0]),
                    match.disagreements[0],
                    " (and {} more)".format(more) if more else "",
                )
            )
        rows.append(
            {
                "size": size,
                "detections": len(eager[0]),
                "exported": len(out[0]),
                "matched": len(match.pairs),
                "unmatched": match.unmatched,
                "max_box_diff": match.max_box_diff,
                "max_score_diff": match.max_score_diff,
                "box_bound": bounds.box,
                "score_bound": bounds.score,
            }
        )
    return rows


def compare_traced(
    model: torch.nn.Module, traced: torch.jit.ScriptModule, images: Sequence[torch.Tensor]
) -> List[Dict[str, object]]:
    """:func:`compare_detections` for a traced TorchScript student."""
    return compare_detections(model, traced, images)


def _class_names(settings: DeploySettings) -> Optional[List[str]]:
    for name in settings.test_datasets + settings.train_datasets:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes:
            return list(classes)
    return None


def load_student(cfg, weights: str, device: str = "cpu") -> torch.nn.Module:
    """
    The student of ``cfg`` (eval mode, on ``device``) with ``weights``: a student-only or a
    training checkpoint (``kd_*`` and teacher weights are ignored).

    Args:
        cfg: the student's config, or its distillation config (the student is taken:
            :func:`~kd_det.config.student.student_model_config`).
    Raises:
        FileNotFoundError / ValueError naming the fix when the weights are missing or are not this
            student's.
    """
    # the student alone: exporting it never builds the teacher nor needs its weights
    model = build_detector(student_model_config(cfg), device).eval()
    if not os.path.isfile(weights):
        raise FileNotFoundError(
            "no checkpoint at {!r}: pass the exported student's weights (export_student's "
            "model_final.pth) or the training run's".format(weights)
        )
    checkpointer = StudentCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(weights))
    if incompatible.missing_keys:
        raise ValueError(
            "{!r} lacks {} weights of the student (e.g. {!r}): "
            "pass this student's own checkpoint".format(
                weights, len(incompatible.missing_keys), incompatible.missing_keys[0]
            )
        )
    return model


def _check_images(
    cfg: DeploySettings, sample_image: str, device: str
) -> Tuple[List[torch.Tensor], str]:
    """The preprocessed sample image and two crops of other sizes; and the sample's file."""
    image, image_path = load_sample_image(cfg, sample_image)
    return _other_sizes(preprocess(cfg, image).to(device)), image_path


def _warn_if_nothing_detected(checked: List[Dict[str, object]], image_path: str, what: str) -> None:
    if not any(row["detections"] for row in checked):
        logging.getLogger(__name__).warning(
            "%s was checked on %s and two crops, where it detects nothing: the check compared "
            "empty outputs only. Pass --sample-image with objects the student finds.",
            what,
            image_path,
        )


def _score_thresh(model: torch.nn.Module) -> float:
    """The score threshold the model applies at test time (its box predictor's, for R-CNN)."""
    owner, names = _test_settings(model)
    return float(getattr(owner, names[0]))


def _metadata(
    settings: DeploySettings,
    model: torch.nn.Module,
    path: str,
    image_path: str,
    checked: List[Dict[str, object]],
    tensor: str,
) -> Dict[str, object]:
    """What a deployment needs to know beside the exported file: preprocessing, outputs, classes."""
    return {
        "file": os.path.basename(path),
        "sha256": file_sha256(path),
        "meta_architecture": type(model).__name__,
        "torch": torch.__version__,
        "input": {
            "tensor": tensor,
            "format": settings.input_format,
            "resize": "shortest edge to min_size_test, longest at most max_size_test (bilinear), "
            "as Detectron2's DefaultPredictor; the model normalises and pads itself",
            "min_size_test": settings.min_size_test,
            "max_size_test": settings.max_size_test,
        },
        "outputs": {
            "boxes": "(N, 4) float32, x0 y0 x1 y1 in the pixels of the input tensor: divide by "
            "the resize scale for the original image",
            "scores": "(N,) float32",
            "classes": "(N,) int64, indices into 'classes'",
        },
        "classes": _class_names(settings),
        "score_thresh_test": _score_thresh(model),
        "traced_on": image_path,
        "checked": checked,
    }


def _write_metadata(output_dir: str, name: str, metadata: Dict[str, object]) -> str:
    path = os.path.join(output_dir, name)
    with open(path, "w") as f:
        json.dump(metadata, f, indent=2)
    return path


def export_torchscript(
    cfg, weights: str, output_dir: str, sample_image: str = "", device: str = "cpu"
) -> Dict[str, object]:
    """
    Write ``model.ts`` (the traced student) and ``torchscript.json`` to ``output_dir``.

    Args:
        cfg: the student's vanilla Detectron2 config (``release_student``'s config.yaml), or
            its training config.
        weights: student-only or training checkpoint (``kd_*`` weights are ignored).
        sample_image: image file to trace with (default: the first of ``DATASETS.TEST[0]``).
        device: where the traced model runs; tracing records the device, so a CPU trace
            runs on the CPU and a ``cuda`` trace on the GPU.
    Returns:
        {"torchscript": path, "metadata": path, "sha256": ..., "checked": rows of
            :func:`compare_detections`}.
    """
    settings = deploy_settings(cfg)  # a config the sidecar cannot describe fails before any work
    model = load_student(cfg, weights, device)
    images, image_path = _check_images(settings, sample_image, device)
    traced = trace_student(model, images[0])
    checked = compare_traced(model, traced, images)
    _warn_if_nothing_detected(checked, image_path, "the traced student")

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model.ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        buffer = traced.save_to_buffer()
    atomic_write_bytes(path, lambda f: f.write(buffer))
    metadata = _metadata(
        settings,
        model,
        path,
        image_path,
        checked,
        "(3, H, W) float32 on the device above, pixel values 0-255, channels in 'format'; one "
        "image per call, any H and W",
    )
    metadata["device"] = device
    metadata_path = _write_metadata(output_dir, "torchscript.json", metadata)
    return {
        "torchscript": path,
        "metadata": metadata_path,
        "sha256": metadata["sha256"],
        "checked": checked,
    }


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError(
            "ONNX export needs the onnx and onnxruntime packages ({}): pip install -e '.[onnx]' "
            "in the kd_det checkout, or pip install onnx onnxruntime".format(e)
        ) from e
    return onnx, onnxruntime


def export_onnx(
    cfg, weights: str, output_dir: str, sample_image: str = "", opset: int = ONNX_OPSET
) -> Dict[str, object]:
    """
    Write ``model.onnx`` (the student traced and converted by PyTorch's TorchScript-based
    ONNX exporter) and ``onnx.json`` to ``output_dir``; the file is checked with
    ``onnx.checker`` and, in ONNX Runtime (CPU), against the eager model on the sample
    image and two crops of other sizes.

    Args:
        cfg, weights, sample_image: as :func:`export_torchscript`.
        opset: ONNX opset; at least 16, where RoiAlign gained Detectron2's half-pixel
            (``aligned=True``) coordinates.
    Returns:
        {"onnx": path, "metadata": path, "sha256": ..., "checked": rows of
            :func:`compare_detections`}.
    """
    if opset < 16:
        raise ValueError(
            "ONNX opset {} has no half-pixel RoiAlign (Detectron2's ROIAlignV2): use opset 16 or "
            "later".format(opset)
        )
    onnx, onnxruntime = _import_onnx()
    from detectron2.export import TracingAdapter

    settings = deploy_settings(cfg)
    model = load_student(cfg, weights, "cpu")
    images, image_path = _check_images(settings, sample_image, "cpu")
    # eval(): the exporter restores the wrapper's mode afterwards, and a new wrapper is in training
    # mode
    adapter = TracingAdapter(model, images[0], detections).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript-based exporter is deprecated (DeprecationWarning), but torch.export cannot
        # capture Detectron2 v0.6 models (docs/deployment.md); tracer warnings as in trace_student
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # advanced indexing with negative indices would export wrongly: the ONNX Runtime check below
        # would see it
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        torch.onnx.export(
            adapter,
            adapter.flattened_inputs,
            buffer,
            dynamo=False,
            opset_version=opset,
            input_names=["image"],
            output_names=list(OUTPUT_NAMES),
            dynamic_axes={
                "image": {1: "height", 2: "width"},
                "boxes": {0: "detections"},
                "scores": {0: "detections"},
                "classes": {0: "detections"},
            },
        )
    # checked before it is written: a file that disagrees with the model is never left behind
    onnx.checker.check_model(onnx.load_model_from_string(buffer.getvalue()))
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    checked = compare_detections(
        model,
        lambda image: session.run(None, {"image": image.numpy()}),
        images,
        "the ONNX student (ONNX Runtime)",
        factor=ONNX_FACTOR,
    )
    _warn_if_nothing_detected(checked, image_path, "the ONNX student")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model.onnx")
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))
    metadata = _metadata(
        settings,
        model,
        path,
        image_path,
        checked,
        "'image': (3, H, W) float32, pixel values 0-255, channels in 'format'; one image per call, "
        "any H and W",
    )
    metadata.update(
        {"opset": opset, "onnx": onnx.__version__, "onnxruntime_checked": onnxruntime.__version__}
    )
    metadata_path = _write_metadata(output_dir, "onnx.json", metadata)
    return {
        "onnx": path,
        "metadata": metadata_path,
        "sha256": metadata["sha256"],
        "checked": checked,
    }

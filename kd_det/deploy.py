"""
TorchScript export of a released student, by Detectron2's tracing route
(``TracingAdapter`` + ``torch.jit.trace``, as in Detectron2's ``tools/deploy``).

The traced file takes one preprocessed image and returns its detections; it loads
with ``torch.jit.load`` in Python or C++ (libtorch) with torch and torchvision only:
no Detectron2, no kd_det.  Input sizes may vary from call to call; the batch is one
image.  A sidecar ``torchscript.json`` says how to preprocess and what comes out.
"""

import json
import logging
import os
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import GeneralizedRCNN, build_model

from .checkpoint import atomic_write_bytes
from .export import StudentCheckpointer, file_sha256

__all__ = ["OUTPUT_NAMES", "detections", "preprocess", "load_sample_image", "trace_student", "compare_traced",
           "export_torchscript"]

OUTPUT_NAMES = ("boxes", "scores", "classes")

# Differences between the traced graph and the eager model on the same image that
# still count as equal: float reassociation in fused ops, not a different detection.
BOX_ATOL = 1e-3  # pixels
SCORE_ATOL = 1e-4


def detections(model: torch.nn.Module, image: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
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


def preprocess(cfg: CfgNode, image: np.ndarray) -> torch.Tensor:
    """
    What ``DefaultPredictor`` does before the network: shortest edge to
    ``INPUT.MIN_SIZE_TEST`` (longest at most ``MAX_SIZE_TEST``), HWC -> CHW float.

    Args:
        image: (H, W, 3) uint8 in ``cfg.INPUT.FORMAT``.
    Returns:
        (3, H', W') float32.
    """
    resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MIN_SIZE_TEST], cfg.INPUT.MAX_SIZE_TEST)
    resized = resize.get_transform(image).apply_image(image)
    return torch.as_tensor(np.ascontiguousarray(resized.astype("float32").transpose(2, 0, 1)))


def load_sample_image(cfg: CfgNode, path: str = "") -> Tuple[np.ndarray, str]:
    """
    The image to trace with: ``path``, or else the first image of ``cfg.DATASETS.TEST[0]``.

    Returns:
        (H, W, 3) uint8 in ``cfg.INPUT.FORMAT``, and the file it came from.
    Raises:
        ValueError naming the fix when there is no image to use.
    """
    if not path:
        if not cfg.DATASETS.TEST:
            raise ValueError("tracing needs a sample image: pass --sample-image PATH (the config has no "
                             "DATASETS.TEST to take one from)")
        name = cfg.DATASETS.TEST[0]
        try:
            records = DatasetCatalog.get(name)
        except Exception as e:
            raise ValueError("tracing needs a sample image and test set {!r} cannot be loaded ({}: {}): pass "
                             "--sample-image PATH".format(name, type(e).__name__, e)) from e
        if not records:
            raise ValueError("test set {!r} is empty: pass --sample-image PATH".format(name))
        path = records[0]["file_name"]
    if not os.path.isfile(path):
        raise FileNotFoundError("sample image {!r} does not exist".format(path))
    return detection_utils.read_image(path, format=cfg.INPUT.FORMAT), path


def trace_student(model: torch.nn.Module, image: torch.Tensor) -> torch.jit.ScriptModule:
    """
    Trace ``model`` (eval mode) on one preprocessed image (3, H, W); the result maps an
    image tensor to ``(boxes, scores, classes)`` as :func:`detections` does.
    """
    from detectron2.export import TracingAdapter  # needs kd_det.compat's fix on pure-Python v0.6

    adapter = TracingAdapter(model, image, detections)
    with warnings.catch_warnings():
        # PyTorch deprecates TorchScript (FutureWarning); Detectron2's shape asserts and
        # empty-input checks convert tensors to bools (TracerWarning): both expected, and
        # the traced graph is checked against the eager model on other sizes instead.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        return torch.jit.trace(adapter, adapter.flattened_inputs, check_trace=False)


def _other_sizes(image: torch.Tensor) -> List[torch.Tensor]:
    """``image`` and two crops of other sizes: a traced graph that baked in a shape fails on them."""
    _, h, w = image.shape
    return [image, image[:, : max(h * 3 // 4, 32), :].contiguous(), image[:, :, : max(w * 5 // 8, 32)].contiguous()]


def compare_traced(model: torch.nn.Module, traced: torch.jit.ScriptModule,
                   images: Sequence[torch.Tensor]) -> List[Dict[str, object]]:
    """
    Run eager and traced on each image; one row per image (size, detections, largest
    differences).  Raises RuntimeError when they disagree (count, class, or beyond
    ``BOX_ATOL``/``SCORE_ATOL``).
    """
    rows = []
    for image in images:
        with torch.no_grad():
            eager = detections(model, image)
            out = traced(image)
        size = list(image.shape[1:])
        if len(out) != 3 or any(a.shape != b.shape for a, b in zip(eager, out)):
            raise RuntimeError("the traced student gives {} detections on a {}x{} image where the model gives {}: "
                               "tracing baked in something input-dependent".format(
                                   len(out[0]), size[0], size[1], len(eager[0])))
        box_diff = float((eager[0] - out[0]).abs().max()) if len(eager[0]) else 0.0
        score_diff = float((eager[1] - out[1]).abs().max()) if len(eager[0]) else 0.0
        if box_diff > BOX_ATOL or score_diff > SCORE_ATOL or not torch.equal(eager[2], out[2]):
            raise RuntimeError("the traced student disagrees with the model on a {}x{} image: boxes differ by up to "
                               "{:.3g} px, scores by {:.3g}, classes equal: {}".format(
                                   size[0], size[1], box_diff, score_diff, torch.equal(eager[2], out[2])))
        rows.append({"size": size, "detections": len(eager[0]), "max_box_diff": box_diff,
                     "max_score_diff": score_diff})
    return rows


def _class_names(cfg: CfgNode) -> Optional[List[str]]:
    for name in list(cfg.DATASETS.TEST) + list(cfg.DATASETS.TRAIN):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes:
            return list(classes)
    return None


def export_torchscript(cfg: CfgNode, weights: str, output_dir: str, sample_image: str = "",
                       device: str = "cpu") -> Dict[str, object]:
    """
    Write ``model.ts`` (the traced student) and ``torchscript.json`` to ``output_dir``.

    Args:
        cfg: the student's vanilla Detectron2 config (``export_student``'s config.yaml).
        weights: student-only or training checkpoint (``kd_*`` weights are ignored).
        sample_image: image file to trace with (default: the first of ``DATASETS.TEST[0]``).
        device: where the traced model runs; tracing records the device, so a CPU trace
            runs on the CPU and a ``cuda`` trace on the GPU.
    Returns:
        {"torchscript": path, "metadata": path, "sha256": ..., "checked": rows of :func:`compare_traced`}.
    """
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.DEVICE = device
    model = build_model(cfg).eval()
    if not os.path.isfile(weights):
        raise FileNotFoundError("no checkpoint at {!r}: pass the exported student's weights (export_student's "
                                "model_final.pth) or the training run's".format(weights))
    checkpointer = StudentCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(weights))
    if incompatible.missing_keys:
        raise ValueError("{!r} lacks {} weights of the student (e.g. {!r}): pass this student's own checkpoint".format(
            weights, len(incompatible.missing_keys), incompatible.missing_keys[0]))
    image, image_path = load_sample_image(cfg, sample_image)
    tensor = preprocess(cfg, image).to(device)
    traced = trace_student(model, tensor)
    checked = compare_traced(model, traced, _other_sizes(tensor))
    if not any(row["detections"] for row in checked):
        logging.getLogger(__name__).warning(
            "the traced student was checked on %s and two crops, where it detects nothing: the check compared "
            "empty outputs only. Pass --sample-image with objects the student finds.", image_path)

    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model.ts")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        buffer = traced.save_to_buffer()
    atomic_write_bytes(path, lambda f: f.write(buffer))
    metadata = {
        "file": "model.ts",
        "sha256": file_sha256(path),
        "meta_architecture": cfg.MODEL.META_ARCHITECTURE,
        "device": device,
        "torch": torch.__version__,
        "input": {
            "tensor": "(3, H, W) float32 on the device above, pixel values 0-255, channels in 'format'; one image "
                      "per call, any H and W",
            "format": cfg.INPUT.FORMAT,
            "resize": "shortest edge to min_size_test, longest at most max_size_test (bilinear), as Detectron2's "
                      "DefaultPredictor; the model normalises and pads itself",
            "min_size_test": cfg.INPUT.MIN_SIZE_TEST,
            "max_size_test": cfg.INPUT.MAX_SIZE_TEST,
        },
        "outputs": {
            "boxes": "(N, 4) float32, x0 y0 x1 y1 in the pixels of the input tensor: divide by the resize scale "
                     "for the original image",
            "scores": "(N,) float32",
            "classes": "(N,) int64, indices into 'classes'",
        },
        "classes": _class_names(cfg),
        "score_thresh_test": (cfg.MODEL.ROI_HEADS.SCORE_THRESH_TEST if isinstance(model, GeneralizedRCNN)
                              else cfg.MODEL.RETINANET.SCORE_THRESH_TEST),
        "traced_on": image_path,
        "checked": checked,
    }
    metadata_path = os.path.join(output_dir, "torchscript.json")
    with open(metadata_path, "w") as f:
        json.dump(metadata, f, indent=2)
    return {"torchscript": path, "metadata": metadata_path, "sha256": metadata["sha256"], "checked": checked}

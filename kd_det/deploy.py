"""
TorchScript and ONNX export of a released student, by Detectron2's tracing route
(``TracingAdapter`` + ``torch.jit.trace`` / ``torch.onnx.export``, as in Detectron2's
``tools/deploy``).

The exported file takes one preprocessed image and returns its detections.  ``model.ts``
loads with ``torch.jit.load`` in Python or C++ (libtorch) with torch and torchvision
only; ``model.onnx`` runs in ONNX Runtime without torch.  Neither needs Detectron2 or
kd_det.  Input sizes may vary from call to call; the batch is one image.  A sidecar
JSON says how to preprocess and what comes out.  Each export is checked against the
eager model on the sample image and on two crops of other sizes.

The student's config is a yacs ``CfgNode`` (``export_student``'s config.yaml) or a
LazyConfig (``export_lazy_student``'s); both reduce to :class:`DeploySettings`.
"""

import io
import json
import logging
import os
import sys
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import detection_utils
from detectron2.data import transforms as T
from detectron2.modeling import GeneralizedRCNN, build_model
from omegaconf import DictConfig
from PIL import Image

from .checkpoint import atomic_write_bytes
from .export import StudentCheckpointer, file_sha256
from .utils.lazy import dataset_names, lazy_get, other_test_augmentations, single_short_edge, test_resizes

__all__ = ["OUTPUT_NAMES", "DeploySettings", "deploy_settings", "detections", "preprocess", "load_sample_image",
           "load_student", "trace_student", "compare_detections", "compare_traced", "export_torchscript",
           "export_onnx"]

OUTPUT_NAMES = ("boxes", "scores", "classes")

# Differences between the traced graph and the eager model on the same image that
# still count as equal: float reassociation in fused ops, not a different detection.
BOX_ATOL = 1e-3  # pixels
SCORE_ATOL = 1e-4
# ONNX Runtime's own kernels reassociate more: 1.5e-3 px seen on 800x1216 inputs
ONNX_BOX_ATOL = 1e-2
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


def _lazy_deploy_settings(lazy) -> DeploySettings:
    """
    :class:`DeploySettings` of a LazyConfig student: the resize of
    ``dataloader.test.mapper.augmentations``, which must be one fixed-size
    ``ResizeShortestEdge`` (what Detectron2's LazyConfigs use, and what the sidecar JSON
    can describe), and the input format of ``model.input_format`` or the test mapper.
    """
    if lazy_get(lazy, "dataloader.test") is None:
        raise ValueError("the LazyConfig has no dataloader.test: the export takes the test-time resize from "
                         "dataloader.test.mapper.augmentations (a ResizeShortestEdge, as in Detectron2's configs) "
                         "and the sample image and class names from dataloader.test.dataset.names; add it")
    resizes, others = test_resizes(lazy), other_test_augmentations(lazy)
    if len(resizes) != 1 or others:
        raise ValueError("dataloader.test.mapper.augmentations of the LazyConfig is {} ResizeShortestEdge and {}: an "
                         "exported model's preprocessing (its sidecar JSON, predict_exported.py) is one "
                         "ResizeShortestEdge(short_edge_length=N, max_size=M), as DefaultPredictor's".format(
                             len(resizes), others or "nothing else"))
    short = single_short_edge(resizes[0])
    if short is None:
        raise ValueError("the test ResizeShortestEdge of the LazyConfig draws its short edge from {}: a deployed model "
                         "needs one size; set dataloader.test.mapper.augmentations.0.short_edge_length=N".format(
                             list(lazy_get(resizes[0], "short_edge_length"))))
    interp = lazy_get(resizes[0], "interp", Image.BILINEAR)
    if int(interp) != int(Image.BILINEAR):
        raise ValueError("the test ResizeShortestEdge of the LazyConfig uses interp={}; exports describe bilinear "
                         "resizing (DefaultPredictor's) only".format(interp))
    input_format = lazy_get(lazy, "model.input_format") or lazy_get(lazy, "dataloader.test.mapper.image_format")
    if input_format is None:
        raise ValueError("the LazyConfig names no input format: set model.input_format (or "
                         "dataloader.test.mapper.image_format) to the channel order the student was trained on")
    return DeploySettings(str(input_format), short, int(lazy_get(resizes[0], "max_size", sys.maxsize)),
                          dataset_names(lazy_get(lazy, "dataloader.test.dataset.names")),
                          dataset_names(lazy_get(lazy, "dataloader.train.dataset.names")))


def deploy_settings(cfg: Union[CfgNode, DictConfig, DeploySettings]) -> DeploySettings:
    """The :class:`DeploySettings` of a yacs config or a LazyConfig (returned as is when already one)."""
    if isinstance(cfg, DeploySettings):
        return cfg
    if isinstance(cfg, CfgNode):
        return DeploySettings(cfg.INPUT.FORMAT, cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST,
                              tuple(cfg.DATASETS.TEST), tuple(cfg.DATASETS.TRAIN))
    return _lazy_deploy_settings(cfg)


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
            raise ValueError("tracing needs a sample image: pass --sample-image PATH (the config has no "
                             "test set to take one from)")
        name = settings.test_datasets[0]
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
    return detection_utils.read_image(path, format=settings.input_format), path


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


def compare_detections(model: torch.nn.Module, run: Callable[[torch.Tensor], Sequence[torch.Tensor]],
                       images: Sequence[torch.Tensor], what: str = "the traced student", box_atol: float = BOX_ATOL,
                       score_atol: float = SCORE_ATOL) -> List[Dict[str, object]]:
    """
    Run the eager model and an exported one (``run``: image -> boxes, scores, classes) on
    each image; one row per image (size, detections, largest differences).

    Raises:
        RuntimeError naming ``what`` when they disagree (count, class, or beyond the tolerances).
    """
    rows = []
    for image in images:
        with torch.no_grad():
            eager = detections(model, image)
            out = [torch.as_tensor(t) for t in run(image)]
        size = list(image.shape[1:])
        if len(out) != 3 or any(a.shape != b.shape for a, b in zip(eager, out)):
            raise RuntimeError("{} gives {} detections on a {}x{} image where the model gives {}: the export baked "
                               "in something input-dependent".format(what, len(out[0]), size[0], size[1],
                                                                      len(eager[0])))
        box_diff = float((eager[0] - out[0]).abs().max()) if len(eager[0]) else 0.0
        score_diff = float((eager[1] - out[1]).abs().max()) if len(eager[0]) else 0.0
        classes_equal = torch.equal(eager[2], out[2].to(eager[2].dtype))
        if box_diff > box_atol or score_diff > score_atol or not classes_equal:
            raise RuntimeError("{} disagrees with the model on a {}x{} image: boxes differ by up to {:.3g} px, scores "
                               "by {:.3g}, classes equal: {}".format(what, size[0], size[1], box_diff, score_diff,
                                                                      classes_equal))
        rows.append({"size": size, "detections": len(eager[0]), "max_box_diff": box_diff,
                     "max_score_diff": score_diff})
    return rows


def compare_traced(model: torch.nn.Module, traced: torch.jit.ScriptModule,
                   images: Sequence[torch.Tensor]) -> List[Dict[str, object]]:
    """:func:`compare_detections` for a traced TorchScript student."""
    return compare_detections(model, traced, images)


def _class_names(settings: DeploySettings) -> Optional[List[str]]:
    for name in settings.test_datasets + settings.train_datasets:
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        if classes:
            return list(classes)
    return None


def _build_student(cfg, device: str) -> torch.nn.Module:
    if isinstance(cfg, CfgNode):
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.DEVICE = device
        return build_model(cfg)
    from detectron2.config import instantiate

    from .modeling.lazy_student import lazy_student_model

    if "model" not in cfg:
        raise ValueError("the LazyConfig has no `model` to export")
    return instantiate(lazy_student_model(cfg.model)).to(torch.device(device))


def load_student(cfg, weights: str, device: str = "cpu") -> torch.nn.Module:
    """
    The student of ``cfg`` (eval mode, on ``device``) with ``weights``: a student-only or a
    training checkpoint (``kd_*`` and teacher weights are ignored).

    Args:
        cfg: a yacs config, or a LazyConfig whose ``model`` is the student (plain, or the
            :func:`~kd_det.modeling.lazy_student.lazy_distilled_model` of one: its student is taken).
    Raises:
        FileNotFoundError / ValueError naming the fix when the weights are missing or are not this student's.
    """
    model = _build_student(cfg, device).eval()
    if not os.path.isfile(weights):
        raise FileNotFoundError("no checkpoint at {!r}: pass the exported student's weights (export_student's "
                                "model_final.pth) or the training run's".format(weights))
    checkpointer = StudentCheckpointer(model)
    incompatible = checkpointer._load_model(checkpointer._load_file(weights))
    if incompatible.missing_keys:
        raise ValueError("{!r} lacks {} weights of the student (e.g. {!r}): pass this student's own checkpoint".format(
            weights, len(incompatible.missing_keys), incompatible.missing_keys[0]))
    return model


def _check_images(cfg: DeploySettings, sample_image: str, device: str) -> Tuple[List[torch.Tensor], str]:
    """The preprocessed sample image and two crops of other sizes; and the sample's file."""
    image, image_path = load_sample_image(cfg, sample_image)
    return _other_sizes(preprocess(cfg, image).to(device)), image_path


def _warn_if_nothing_detected(checked: List[Dict[str, object]], image_path: str, what: str) -> None:
    if not any(row["detections"] for row in checked):
        logging.getLogger(__name__).warning(
            "%s was checked on %s and two crops, where it detects nothing: the check compared empty outputs only. "
            "Pass --sample-image with objects the student finds.", what, image_path)


def _score_thresh(model: torch.nn.Module) -> float:
    """The score threshold the model applies at test time (its box predictor's, for R-CNN)."""
    if isinstance(model, GeneralizedRCNN):
        return float(model.roi_heads.box_predictor.test_score_thresh)
    return float(model.test_score_thresh)


def _metadata(settings: DeploySettings, model: torch.nn.Module, path: str, image_path: str,
              checked: List[Dict[str, object]], tensor: str) -> Dict[str, object]:
    """What a deployment needs to know beside the exported file: preprocessing, outputs, classes."""
    return {
        "file": os.path.basename(path),
        "sha256": file_sha256(path),
        "meta_architecture": type(model).__name__,
        "torch": torch.__version__,
        "input": {
            "tensor": tensor,
            "format": settings.input_format,
            "resize": "shortest edge to min_size_test, longest at most max_size_test (bilinear), as Detectron2's "
                      "DefaultPredictor; the model normalises and pads itself",
            "min_size_test": settings.min_size_test,
            "max_size_test": settings.max_size_test,
        },
        "outputs": {
            "boxes": "(N, 4) float32, x0 y0 x1 y1 in the pixels of the input tensor: divide by the resize scale "
                     "for the original image",
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


def export_torchscript(cfg, weights: str, output_dir: str, sample_image: str = "",
                       device: str = "cpu") -> Dict[str, object]:
    """
    Write ``model.ts`` (the traced student) and ``torchscript.json`` to ``output_dir``.

    Args:
        cfg: the student's vanilla Detectron2 config (``export_student``'s config.yaml), or
            its LazyConfig (``export_lazy_student``'s config.yaml, or the training one).
        weights: student-only or training checkpoint (``kd_*`` weights are ignored).
        sample_image: image file to trace with (default: the first of ``DATASETS.TEST[0]``).
        device: where the traced model runs; tracing records the device, so a CPU trace
            runs on the CPU and a ``cuda`` trace on the GPU.
    Returns:
        {"torchscript": path, "metadata": path, "sha256": ..., "checked": rows of :func:`compare_detections`}.
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
    metadata = _metadata(settings, model, path, image_path, checked,
                         "(3, H, W) float32 on the device above, pixel values 0-255, channels in 'format'; one "
                         "image per call, any H and W")
    metadata["device"] = device
    metadata_path = _write_metadata(output_dir, "torchscript.json", metadata)
    return {"torchscript": path, "metadata": metadata_path, "sha256": metadata["sha256"], "checked": checked}


def _import_onnx():
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ImportError("ONNX export needs the onnx and onnxruntime packages ({}): pip install -e '.[onnx]' in the "
                          "kd_det checkout, or pip install onnx onnxruntime".format(e)) from e
    return onnx, onnxruntime


def export_onnx(cfg, weights: str, output_dir: str, sample_image: str = "",
                opset: int = ONNX_OPSET) -> Dict[str, object]:
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
        {"onnx": path, "metadata": path, "sha256": ..., "checked": rows of :func:`compare_detections`}.
    """
    if opset < 16:
        raise ValueError("ONNX opset {} has no half-pixel RoiAlign (Detectron2's ROIAlignV2): use opset 16 or "
                         "later".format(opset))
    onnx, onnxruntime = _import_onnx()
    from detectron2.export import TracingAdapter

    settings = deploy_settings(cfg)
    model = load_student(cfg, weights, "cpu")
    images, image_path = _check_images(settings, sample_image, "cpu")
    # eval(): the exporter restores the wrapper's mode afterwards, and a new wrapper is in training mode
    adapter = TracingAdapter(model, images[0], detections).eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # the TorchScript-based exporter is deprecated (DeprecationWarning), but torch.export cannot
        # capture Detectron2 v0.6 models (README, "Tools"); tracer warnings as in trace_student
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        # advanced indexing with negative indices would export wrongly: the ONNX Runtime check below would see it
        warnings.filterwarnings("ignore", "Exporting aten::index operator", UserWarning)
        torch.onnx.export(adapter, adapter.flattened_inputs, buffer, dynamo=False, opset_version=opset,
                          input_names=["image"], output_names=list(OUTPUT_NAMES),
                          dynamic_axes={"image": {1: "height", 2: "width"}, "boxes": {0: "detections"},
                                        "scores": {0: "detections"}, "classes": {0: "detections"}})
    # checked before it is written: a file that disagrees with the model is never left behind
    onnx.checker.check_model(onnx.load_model_from_string(buffer.getvalue()))
    session = onnxruntime.InferenceSession(buffer.getvalue(), providers=["CPUExecutionProvider"])
    checked = compare_detections(model, lambda image: session.run(None, {"image": image.numpy()}), images,
                                 "the ONNX student (ONNX Runtime)", ONNX_BOX_ATOL, SCORE_ATOL)
    _warn_if_nothing_detected(checked, image_path, "the ONNX student")
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, "model.onnx")
    atomic_write_bytes(path, lambda f: f.write(buffer.getvalue()))
    metadata = _metadata(settings, model, path, image_path, checked,
                         "'image': (3, H, W) float32, pixel values 0-255, channels in 'format'; one image per call, "
                         "any H and W")
    metadata.update({"opset": opset, "onnx": onnx.__version__, "onnxruntime_checked": onnxruntime.__version__})
    metadata_path = _write_metadata(output_dir, "onnx.json", metadata)
    return {"onnx": path, "metadata": metadata_path, "sha256": metadata["sha256"], "checked": checked}

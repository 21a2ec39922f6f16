#!/usr/bin/env python
"""
Detect objects in image files with an exported student (``model.onnx`` or ``model.ts``
from ``tools/export_student.py``), without Detectron2 or kd_det: what a deployment
does, written out.  It follows the sidecar JSON beside the model (``onnx.json`` or
``torchscript.json``): read the image in the model's channel order, resize it as
Detectron2's ``DefaultPredictor`` does (shortest edge to ``min_size_test``, longest at
most ``max_size_test``, PIL bilinear), run the model, and map the boxes back to the
image's own pixels (scale, clip, drop empty boxes, as ``detector_postprocess``).

    tools/predict_exported.py --model release/ssim_kd/model.onnx --input a.jpg b.jpg \\
        [--min-score 0.5] [--output-dir vis/]

Needs numpy and Pillow, and onnxruntime for ``.onnx`` or torch + torchvision for
``.ts``.  Prints one JSON object per image: its file, size and detections (class,
score, box x0 y0 x1 y1).
"""

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageDraw, ImageOps

SIDECARS = {".onnx": "onnx.json", ".ts": "torchscript.json"}


def load_metadata(model_path, metadata_path=""):
    """The sidecar JSON of ``model_path`` (``onnx.json`` / ``torchscript.json`` beside it)."""
    ext = os.path.splitext(model_path)[1]
    if ext not in SIDECARS:
        raise ValueError(
            "{!r} is neither an ONNX (.onnx) nor a TorchScript (.ts) model".format(model_path)
        )
    path = metadata_path or os.path.join(
        os.path.dirname(os.path.abspath(model_path)), SIDECARS[ext]
    )
    if not os.path.isfile(path):
        raise FileNotFoundError(
            "no {} beside {!r}: export_student.py writes it with the model; pass --metadata "
            "if it was moved".format(SIDECARS[ext], model_path)
        )
    with open(path) as f:
        return json.load(f)


def resized_shape(height, width, min_size, max_size):
    """Detectron2's ResizeShortestEdge output size (new_h, new_w) for one test size."""
    scale = min_size / min(height, width)
    new_h, new_w = (min_size, scale * width) if height < width else (scale * height, min_size)
    if max(new_h, new_w) > max_size:
        scale = max_size / max(new_h, new_w)
        new_h, new_w = new_h * scale, new_w * scale
    return int(new_h + 0.5), int(new_w + 0.5)


def preprocess(image, metadata):
    """
    Args:
        image: a PIL image (any mode), EXIF orientation already applied.
    Returns:
        (3, H', W') float32 array in the model's channel order, pixel values 0-255.
    """
    spec = metadata["input"]
    rgb = image.convert("RGB")
    new_h, new_w = resized_shape(
        rgb.height, rgb.width, spec["min_size_test"], spec["max_size_test"]
    )
    array = np.asarray(rgb.resize((new_w, new_h), Image.BILINEAR))
    if spec["format"] == "BGR":
        array = array[:, :, ::-1]
    elif spec["format"] != "RGB":
        raise ValueError("input format {!r} is not handled here (RGB, BGR)".format(spec["format"]))
    return np.ascontiguousarray(array.transpose(2, 0, 1).astype(np.float32))


def postprocess(boxes, scores, classes, input_shape, image_shape):
    """
    Boxes from the model's input pixels to the image's: scale, clip to the image, and
    drop boxes left with no width or height (Detectron2's ``detector_postprocess``).

    Args:
        boxes (N, 4), scores (N,), classes (N,): the model's outputs.
        input_shape, image_shape: (height, width) of the model's input and of the image.
    """
    boxes = np.array(boxes, dtype=np.float32).reshape(-1, 4)
    boxes[:, 0::2] *= np.float32(image_shape[1] / input_shape[1])
    boxes[:, 1::2] *= np.float32(image_shape[0] / input_shape[0])
    boxes[:, 0::2] = boxes[:, 0::2].clip(0, image_shape[1])
    boxes[:, 1::2] = boxes[:, 1::2].clip(0, image_shape[0])
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return boxes[keep], np.asarray(scores)[keep], np.asarray(classes)[keep]


def load_runner(model_path, metadata):
    """A function (3, H, W) float32 array -> (boxes, scores, classes) arrays."""
    if model_path.endswith(".onnx"):
        import onnxruntime

        session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
        return lambda array: session.run(None, {"image": array})
    import torch
    import torchvision  # noqa: F401  (registers the nms / roi_align ops the graph calls)

    model = torch.jit.load(model_path, map_location=metadata.get("device", "cpu"))
    device = metadata.get("device", "cpu")

    def run(array):
        with torch.no_grad():
            return [t.cpu().numpy() for t in model(torch.from_numpy(array).to(device))]

    return run


def predict(run, metadata, image_path, min_score=0.0):
    """Detections on one image file, in its own pixels, as a JSON-ready dict."""
    image = ImageOps.exif_transpose(Image.open(image_path))
    array = preprocess(image, metadata)
    boxes, scores, classes = postprocess(*run(array), array.shape[1:], (image.height, image.width))
    names = metadata.get("classes") or []
    dets = [
        {
            "class": names[c] if c < len(names) else int(c),
            "class_id": int(c),
            "score": float(s),
            "box": [float(v) for v in b],
        }
        for b, s, c in zip(boxes, scores, classes)
        if s >= min_score
    ]
    return {"file": image_path, "height": image.height, "width": image.width, "detections": dets}


def draw(image_path, result, out_path):
    image = ImageOps.exif_transpose(Image.open(image_path)).convert("RGB")
    canvas = ImageDraw.Draw(image)
    for det in result["detections"]:
        canvas.rectangle(det["box"], outline=(255, 64, 0), width=2)
        canvas.text(
            (det["box"][0] + 2, det["box"][1] + 1),
            "{} {:.2f}".format(det["class"], det["score"]),
            fill=(255, 64, 0),
        )
    image.save(out_path)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", required=True, help="model.onnx or model.ts")
    parser.add_argument(
        "--metadata", default="", help="its sidecar JSON (default: beside the model)"
    )
    parser.add_argument("--input", nargs="+", required=True, help="image files")
    parser.add_argument(
        "--min-score",
        type=float,
        default=0.0,
        help="drop detections below this score (the model already applies the config's test "
        "threshold)",
    )
    parser.add_argument(
        "--output-dir", default="", help="write each image with its boxes drawn here"
    )
    args = parser.parse_args(argv)

    metadata = load_metadata(args.model, args.metadata)
    run = load_runner(args.model, metadata)
    results = []
    for path in args.input:
        if not os.path.isfile(path):
            raise FileNotFoundError("image {!r} does not exist".format(path))
        result = predict(run, metadata, path, args.min_score)
        results.append(result)
        print(json.dumps(result))
        if args.output_dir:
            os.makedirs(args.output_dir, exist_ok=True)
            draw(path, result, os.path.join(args.output_dir, os.path.basename(path)))
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)

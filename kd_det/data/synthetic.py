"""A deterministic synthetic detection dataset (kd_det's embedded default data).

Shapes of five classes on textured backgrounds, with scale variation (small objects
of a few pixels to large ones), occlusion (later shapes cover earlier ones; boxes
are those of the visible part, objects mostly hidden are dropped), clutter
(unlabelled outlines and lines) and colour jitter.  Circle vs hexagon and square
vs diamond are told apart only by fine structure, which rewards a larger model.

One image store serves both formats::

    ROOT/JPEGImages/{id}.jpg
    ROOT/annotations/instances_{split}.json       COCO format
    ROOT/Annotations/{id}.xml                      PASCAL VOC format
    ROOT/ImageSets/Main/{split}.txt
    ROOT/SPEC.json                                 what was generated

Generation is seeded per image, so the same spec gives identical files, and it is
atomic (written to a temporary folder, then renamed) so concurrent processes are safe.
"""

import json
import math
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from typing import Dict, List, Tuple
from xml.etree import ElementTree as ET

import numpy as np
from PIL import Image, ImageDraw

__all__ = ["SyntheticSpec", "CLASS_NAMES", "generate_synthetic_dataset", "ensure_synthetic_dataset"]

CLASS_NAMES = ("circle", "square", "triangle", "cross", "hexagon")
GENERATOR_VERSION = 2


@dataclass(frozen=True)
class SyntheticSpec:
    num_train: int = 600
    num_val: int = 150
    image_size: int = 128
    min_object_size: float = 6.0
    max_object_size: float = 52.0
    max_objects: int = 8
    seed: int = 0

    def split_sizes(self) -> Dict[str, int]:
        return {"train": self.num_train, "val": self.num_val}


def _polygon(
    cx: float, cy: float, radius: float, sides: int, angle: float
) -> List[Tuple[float, float]]:
    return [
        (
            cx + radius * math.cos(angle + 2 * math.pi * k / sides),
            cy + radius * math.sin(angle + 2 * math.pi * k / sides),
        )
        for k in range(sides)
    ]


def _draw_shape(draw: ImageDraw.ImageDraw, cls: int, cx, cy, size, angle, fill) -> None:
    r = size / 2.0
    if cls == 0:  # circle
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif cls == 1:  # square, close to axis-aligned
        draw.polygon(_polygon(cx, cy, r * math.sqrt(2), 4, math.pi / 4 + angle * 0.25), fill=fill)
    elif cls == 2:  # triangle
        draw.polygon(_polygon(cx, cy, r * 1.1, 3, -math.pi / 2 + angle), fill=fill)
    elif cls == 3:  # cross: two bars
        t = max(1.0, size * 0.16)
        ca, sa = math.cos(angle * 0.5), math.sin(angle * 0.5)
        for dx, dy in ((ca, sa), (-sa, ca)):
            px, py = -dy * t, dx * t
            draw.polygon(
                [
                    (cx - dx * r + px, cy - dy * r + py),
                    (cx + dx * r + px, cy + dy * r + py),
                    (cx + dx * r - px, cy + dy * r - py),
                    (cx - dx * r - px, cy - dy * r - py),
                ],
                fill=fill,
            )
    elif cls == 4:  # hexagon
        draw.polygon(_polygon(cx, cy, r, 6, angle), fill=fill)
    else:
        raise ValueError(cls)


def _background(rng: np.random.RandomState, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(40, 200, size=3)
    slope = rng.uniform(-60, 60, size=(2, 3))
    img = base + xx[..., None] * slope[0] + yy[..., None] * slope[1]
    img += rng.normal(0, rng.uniform(4, 18), size=(size, size, 3))
    return np.clip(img, 0, 255).astype(np.uint8)


def _random_color(rng: np.random.RandomState) -> Tuple[int, int, int]:
    return tuple(int(c) for c in rng.randint(0, 256, size=3))


def render_image(spec: SyntheticSpec, index: int, split: str) -> Tuple[np.ndarray, List[Dict]]:
    """
    Render one image.

    Returns:
        (H, W, 3) uint8 RGB image, and its objects as dicts with ``category_id``
        (0-based) and ``bbox`` [x0, y0, x1, y1] (absolute, exclusive x1/y1).
    """
    split_offset = {"train": 0, "val": 1_000_003}[split]
    rng = np.random.RandomState((spec.seed * 7_919 + split_offset + index) % (2**32))
    size = spec.image_size
    image = Image.fromarray(_background(rng, size))
    ids = Image.new("I", (size, size), 0)
    draw, draw_ids = ImageDraw.Draw(image), ImageDraw.Draw(ids)

    # Unlabelled clutter under the objects: outlines and arcs.
    for _ in range(rng.randint(1, 5)):
        x, y = rng.uniform(0, size, 2)
        r = rng.uniform(3, size / 4)
        draw.ellipse(
            [x - r, y - r * rng.uniform(0.4, 1), x + r, y + r],
            outline=_random_color(rng),
            width=int(rng.randint(1, 3)),
        )

    objects = []
    log_min, log_max = math.log(spec.min_object_size), math.log(spec.max_object_size)
    for k in range(rng.randint(1, spec.max_objects + 1)):
        cls = int(rng.randint(len(CLASS_NAMES)))
        obj_size = math.exp(rng.uniform(log_min, log_max))
        cx, cy = rng.uniform(0, size, 2)
        angle = rng.uniform(-math.pi / 6, math.pi / 6)
        _draw_shape(draw, cls, cx, cy, obj_size, angle, _random_color(rng))
        _draw_shape(draw_ids, cls, cx, cy, obj_size, angle, k + 1)
        objects.append(cls)

    # Clutter over the objects: thin lines that partly occlude them.
    for _ in range(rng.randint(0, 4)):
        x0, y0, x1, y1 = rng.uniform(0, size, 4)
        draw.line([x0, y0, x1, y1], fill=_random_color(rng), width=1)

    id_map = np.asarray(ids)
    annotations = []
    for k, cls in enumerate(objects):
        ys, xs = np.nonzero(id_map == k + 1)
        if len(xs) < 6:  # hidden (or nearly) behind later shapes or outside the image
            continue
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        if len(xs) < 0.35 * (x1 - x0) * (y1 - y0) and cls != 3:
            continue  # mostly occluded: the visible part no longer shows the shape
        annotations.append(
            {"category_id": cls, "bbox": [float(x0), float(y0), float(x1), float(y1)]}
        )
    return np.asarray(image), annotations


def _voc_xml(image_id: str, size: int, annotations: List[Dict]) -> bytes:
    root = ET.Element("annotation")
    ET.SubElement(root, "filename").text = image_id + ".jpg"
    sz = ET.SubElement(root, "size")
    for tag, value in (("width", size), ("height", size), ("depth", 3)):
        ET.SubElement(sz, tag).text = str(value)
    for ann in annotations:
        obj = ET.SubElement(root, "object")
        ET.SubElement(obj, "name").text = CLASS_NAMES[ann["category_id"]]
        ET.SubElement(obj, "pose").text = "Unspecified"
        ET.SubElement(obj, "truncated").text = "0"
        ET.SubElement(obj, "difficult").text = "0"
        box = ET.SubElement(obj, "bndbox")
        x0, y0, x1, y1 = ann["bbox"]
        # VOC boxes are 1-based and inclusive; Detectron2's loader subtracts 1 from xmin/ymin.
        for tag, value in (("xmin", x0 + 1), ("ymin", y0 + 1), ("xmax", x1), ("ymax", y1)):
            ET.SubElement(box, tag).text = str(int(value))
    return ET.tostring(root)


def generate_synthetic_dataset(root: str, spec: SyntheticSpec = SyntheticSpec()) -> None:
    """Write the dataset described by ``spec`` to ``root`` (replacing what is there)."""
    parent = os.path.dirname(os.path.abspath(root))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".kd_synthetic_", dir=parent)
    try:
        for sub in ("JPEGImages", "annotations", "Annotations", os.path.join("ImageSets", "Main")):
            os.makedirs(os.path.join(tmp, sub))
        categories = [{"id": i + 1, "name": n} for i, n in enumerate(CLASS_NAMES)]
        for split, count in spec.split_sizes().items():
            images, annotations, ids = [], [], []
            for index in range(count):
                image_id = "{}_{:06d}".format(split, index)
                pixels, objects = render_image(spec, index, split)
                Image.fromarray(pixels).save(
                    os.path.join(tmp, "JPEGImages", image_id + ".jpg"), quality=95
                )
                with open(os.path.join(tmp, "Annotations", image_id + ".xml"), "wb") as f:
                    f.write(_voc_xml(image_id, spec.image_size, objects))
                ids.append(image_id)
                images.append(
                    {
                        "id": index + 1,
                        "file_name": image_id + ".jpg",
                        "height": spec.image_size,
                        "width": spec.image_size,
                    }
                )
                for obj in objects:
                    x0, y0, x1, y1 = obj["bbox"]
                    annotations.append(
                        {
                            "id": len(annotations) + 1,
                            "image_id": index + 1,
                            "category_id": obj["category_id"] + 1,
                            "bbox": [x0, y0, x1 - x0, y1 - y0],
                            "area": (x1 - x0) * (y1 - y0),
                            "iscrowd": 0,
                        }
                    )
            with open(
                os.path.join(tmp, "annotations", "instances_{}.json".format(split)), "w"
            ) as f:
                json.dump(
                    {"images": images, "annotations": annotations, "categories": categories}, f
                )
            with open(os.path.join(tmp, "ImageSets", "Main", split + ".txt"), "w") as f:
                f.write("\n".join(ids) + "\n")
        with open(os.path.join(tmp, "SPEC.json"), "w") as f:
            json.dump(dict(asdict(spec), version=GENERATOR_VERSION), f, indent=1)
        if os.path.exists(root):
            shutil.rmtree(root)
        os.rename(tmp, root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _generated_spec(root: str):
    try:
        with open(os.path.join(root, "SPEC.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ensure_synthetic_dataset(root: str, spec: SyntheticSpec = SyntheticSpec()) -> str:
    """Generate the dataset at ``root`` unless the same spec is already there. Returns ``root``."""
    wanted = dict(asdict(spec), version=GENERATOR_VERSION)
    if _generated_spec(root) == wanted:
        return root
    try:
        generate_synthetic_dataset(root, spec)
    except OSError:
        # Another process may have finished the same generation first.
        if _generated_spec(root) != wanted:
            raise
    return root

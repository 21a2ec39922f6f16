"""
torchvision detectors as teachers: ``KD.TEACHER.CONFIG torchvision://NAME``.

The teacher sees the student's batch as the student's backbone does (resized by the student's
data pipeline, padded to the student's size), converted to torchvision's input (RGB, ImageNet
mean/std of [0, 1] pixels) and resized by ``KD.TEACHER.INPUT_SCALE``.  torchvision's own
``GeneralizedRCNNTransform`` (its resize to 800-1333 px) is not used: feeding the student's
batch keeps the teacher's levels on the student's grid.  Only torchvision's own modules run
(its backbone, its head); their FPN outputs are renamed to Detectron2's levels by stride
(``'0'..'3', 'pool'`` -> p2..p6; RetinaNet/FCOS ``'0'..'2', 'p6', 'p7'`` -> p3..p7).

For per-anchor KD with a torchvision RetinaNet (:meth:`TorchvisionTeacher.map_dense_student`),
classes map by name (the weights' category list against the student's classes) and anchors by
their shape at each position.  A torchvision Faster R-CNN's RoI head runs on the student's RoIs
for soft-label and box KD of a two-stage student (:meth:`TorchvisionTeacher.roi_predictions`),
classes again by name.  FCOS (anchor-free) teaches features only.
"""

import ast
import logging
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from detectron2.layers import ShapeSpec
from detectron2.modeling.anchor_generator import BufferList, DefaultAnchorGenerator
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.postprocessing import detector_postprocess
from detectron2.structures import Boxes, Instances

from ...checkpoint import check_sha256, read_checkpoint, resolve_weights
from ...checkpoint.torchvision_weights import SCHEME, is_torchvision_url, torchvision_weights
from ..recorders import ModuleOutputRecorder, Source
from .frozen import FrozenTeacher
from .kinds import register_teacher_kind
from .torchvision_models import TORCHVISION_DETECTOR_REGISTRY, build_torchvision_detector

__all__ = [
    "TorchvisionTeacher",
    "TorchvisionInference",
    "build_torchvision_teacher",
    "map_classes",
    "map_cell_anchors",
    "parse_builder_opts",
]

logger = logging.getLogger(__name__)

#: entries of torchvision's COCO category lists that name no class
NON_CLASSES = ("__background__", "N/A")
#: side of the blank image the backbone's level strides are measured on
_PROBE_SIZE = 256


def map_classes(teacher_categories: Sequence[str], student_classes: Sequence[str]) -> List[int]:
    """
    For each student class (index k), the index of the teacher's category of that name.

    Raises:
        ValueError naming the student classes the teacher lacks.
    """
    index = {c: i for i, c in enumerate(teacher_categories) if c not in NON_CLASSES}
    missing = [c for c in student_classes if c not in index]
    if missing:
        raise ValueError(
            "the teacher's categories have no class named {} (student classes {}, teacher "
            "categories {}): per-anchor KD needs every student class in the teacher's label "
            "space; keep feature KD (KD.FEATURE) only".format(
                missing, list(student_classes), [c for c in teacher_categories]
            )
        )
    return [index[c] for c in student_classes]


def map_cell_anchors(
    teacher_cells: torch.Tensor, student_cells: torch.Tensor, min_iou: float = 0.75
) -> List[int]:
    """
    For each of a position's student anchors (A, 4; XYXY about the position), the teacher's
    anchor of the same shape: the one of highest centred IoU, which must be at least
    ``min_iou`` and pair the anchors one to one.  (torchvision orders a position's anchors by
    aspect ratio then size, Detectron2 by size then aspect ratio; torchvision rounds anchor
    corners to pixels, so small anchors differ by a pixel: IoU 0.89 for 12.7 vs 12 px, while
    neighbouring sizes or aspect ratios of a 3 x 3 set stay below 0.64.)

    Raises:
        ValueError listing both anchor sets when they do not pair one to one.
    """

    def wh(cells):
        c = cells.double()
        return c[:, 2] - c[:, 0], c[:, 3] - c[:, 1]

    (tw, th), (sw, sh) = wh(teacher_cells), wh(student_cells)
    inter = torch.minimum(sw[:, None], tw[None]) * torch.minimum(sh[:, None], th[None])
    iou = inter / (sw[:, None] * sh[:, None] + tw[None] * th[None] - inter)
    best = iou.argmax(dim=1)
    order = best.tolist()
    if (
        len(teacher_cells) != len(student_cells)
        or len(set(order)) != len(order)
        or bool((iou.gather(1, best[:, None]) < min_iou).any())
    ):

        def describe(w, h):
            return ["{:.0f}x{:.0f}".format(a, b) for a, b in zip(w.tolist(), h.tolist())]

        raise ValueError(
            "teacher and student anchors per position differ: teacher {}, student {} (w x h); "
            "per-anchor KD needs the same anchor shapes: set the student's "
            "MODEL.ANCHOR_GENERATOR to the teacher's".format(describe(tw, th), describe(sw, sh))
        )
    return order


def parse_builder_opts(opts: Sequence[str]) -> Dict[str, object]:
    """``KD.TEACHER.OPTS`` of a torchvision teacher: "key=value" builder arguments, each value a
    Python literal (``"min_size=128"``, ``"anchor_sizes=(8, 16, 32, 64, 128)"``)."""
    kwargs = {}
    for opt in opts:
        key, sep, value = str(opt).partition("=")
        try:
            if not sep or not key.strip().isidentifier():
                raise ValueError("not key=value")
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError) as e:
            raise ValueError(
                "KD.TEACHER.OPTS entry {!r} of a torchvision teacher must be key=value with a "
                "Python literal value (e.g. 'min_size=128'): {}".format(opt, e)
            ) from e
    return kwargs


class TorchvisionInference(torch.nn.Module):
    """
    A torchvision detector behind Detectron2's inference interface (what
    ``inference_on_dataset`` and the teacher evaluation run): batched inputs with RGB uint8
    ``image`` (3, H, W) -> [{"instances": Instances}] at each input's ``height`` x ``width``,
    with torchvision's labels mapped to the student's classes by name (others dropped).
    torchvision's own transform resizes and normalises, as in its own evaluation.
    """

    def __init__(self, model: torch.nn.Module, class_index: Sequence[int], num_categories: int):
        """
        Args:
            class_index: for each student class k, torchvision's label of that name
                (:func:`map_classes`).
        """
        super().__init__()
        self.model = model
        lut = torch.full((num_categories,), -1, dtype=torch.int64)
        lut[torch.as_tensor(list(class_index), dtype=torch.int64)] = torch.arange(len(class_index))
        self.register_buffer("label_to_class", lut, persistent=False)

    @torch.no_grad()
    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, Instances]]:
        device = self.label_to_class.device
        images = [x["image"].to(device).float() / 255.0 for x in batched_inputs]
        results = []
        for x, image, out in zip(batched_inputs, images, self.model(images)):
            classes = self.label_to_class[out["labels"]]
            keep = classes >= 0
            r = Instances(
                tuple(image.shape[-2:]),
                pred_boxes=Boxes(out["boxes"][keep]),
                scores=out["scores"][keep],
                pred_classes=classes[keep],
            )
            h, w = x.get("height", image.shape[-2]), x.get("width", image.shape[-1])
            results.append({"instances": detector_postprocess(r, h, w)})
        return results


class TorchvisionTeacher(FrozenTeacher):
    """
    A frozen torchvision detector (FasterRCNN, RetinaNet, FCOS) as a teacher: the
    :class:`FrozenTeacher` interface over torchvision's modules.
    """

    classes_by_name = True
    runs_in_detectron2 = False

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        name: str,
        categories: Sequence[str],
        student_classes: Optional[Sequence[str]] = None,
        input_scale: float = 1.0,
        autocast: str = "",
        channels_last: bool = False,
        weights: str = "",
    ):
        """
        Args:
            model: the loaded torchvision detector.
            name: its name (``torchvision://NAME``).
            categories: its class names by label index ('__background__' and 'N/A' included).
            student_classes: the student's class names (class i = index i), for per-anchor
                KD; None: unknown (per-anchor KD then refuses).
            input_scale, autocast, channels_last, weights: see :class:`FrozenTeacher`.
        """
        super().__init__(
            model,
            None,
            autocast=autocast,
            channels_last=channels_last,
            weights=weights,
            config=SCHEME + name,
            input_scale=input_scale,
        )
        self.name = name
        self.categories = list(categories)
        self.student_classes = None if student_classes is None else list(student_classes)
        self._levels = self._probe_levels()
        self._dense = None  # what map_dense_student found

    @torch.no_grad()
    def _probe_levels(self) -> "OrderedDict[str, Tuple[str, int]]":
        """torchvision level name -> (Detectron2 name p<log2 stride>, stride), from the
        backbone's outputs on a blank image."""
        x = torch.zeros(1, 3, _PROBE_SIZE, _PROBE_SIZE, device=self.device)
        levels = OrderedDict()
        for key, f in self.model.backbone(x).items():
            log2 = round(math.log2(_PROBE_SIZE / f.shape[-1]))
            levels[key] = ("p{}".format(log2), 2**log2)
        return levels

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def size_divisibility(self) -> int:
        return self.model.transform.size_divisible

    @property
    def inference_model(self) -> torch.nn.Module:
        """torchvision's own inference, in the student's classes (:class:`TorchvisionInference`;
        ``KD.TEACHER.EVAL_BEFORE_TRAIN``)."""
        if self.student_classes is None:
            raise ValueError(
                "evaluating the torchvision teacher {} maps its labels to the student's classes "
                "by name, but those are unknown: set KD.TEACHER.CHECK_CLASSES True with a "
                "registered DATASETS.TRAIN".format(self.name)
            )
        index = map_classes(self.categories, self.student_classes)
        return TorchvisionInference(self.model, index, len(self.categories)).to(self.device)

    def pixel_stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        t = self.model.transform

        def stat(v):
            return torch.as_tensor(v, dtype=torch.float32, device=self.device).view(3, 1, 1) * 255

        return stat(t.image_mean), stat(t.image_std)

    @property
    def meta_architecture(self) -> str:
        return "torchvision {}".format(type(self.model).__name__)

    @property
    def num_classes(self) -> int:
        return len(self.categories)

    @property
    def input_format(self) -> str:
        return "RGB"

    @property
    def test_size(self) -> Tuple[Optional[int], Optional[int]]:
        t = self.model.transform
        return min(t.min_size), t.max_size

    def output_shape(self) -> Dict[str, ShapeSpec]:
        """Its FPN levels by Detectron2 name: p<k> -> ShapeSpec(channels, stride 2^k)."""
        channels = self.model.backbone.out_channels
        return {p: ShapeSpec(channels=channels, stride=s) for p, s in self._levels.values()}

    @torch.no_grad()
    def backbone_features(self, images) -> Dict[str, torch.Tensor]:
        """torchvision's backbone (FPN) outputs, renamed: p<k> -> (N, C, H, W)."""
        out = self._run(self.model.backbone, images.tensor)
        return {self._levels[k][0]: v for k, v in out.items()}

    @property
    def has_dense_head(self) -> bool:
        from torchvision.models.detection import RetinaNet

        return isinstance(self.model, RetinaNet)

    def require_dense_head(self) -> None:
        self.require_input_scale_one("KD.RM, KD.PFI, KD.SOFT_LABEL, KD.CROSSKD and KD.BOX")
        if self.has_dense_head:
            return
        from torchvision.models.detection import FCOS

        why = (
            "FCOS is anchor-free (one prediction per position, no anchors to pair with the "
            "student's)"
            if isinstance(self.model, FCOS)
            else "it has no per-anchor class predictions"
        )
        raise ValueError(
            "KD.RM, KD.PFI, KD.SOFT_LABEL, KD.CROSSKD and KD.BOX compare per-anchor predictions, "
            "which the torchvision teacher {} cannot give: {}. Use a torchvision RetinaNet "
            "teacher, or feature KD (KD.FEATURE) only".format(self.name, why)
        )

    def require_roi_head(self) -> None:
        """Raise unless the teacher is a torchvision Faster R-CNN whose labels name every
        student class (soft-label and box KD of a two-stage student run its box head on the
        student's RoIs)."""
        from torchvision.models.detection import FasterRCNN

        self.require_input_scale_one("KD.SOFT_LABEL and KD.BOX")
        if not isinstance(self.model, FasterRCNN):
            raise ValueError(
                "soft-label and box KD of a two-stage student (KD.SOFT_LABEL, KD.BOX) run the "
                "teacher's RoI box head on the student's RoIs, but the torchvision teacher {} "
                "({}) has none; use a torchvision Faster R-CNN teacher, or feature KD "
                "(KD.FEATURE) only".format(self.name, type(self.model).__name__)
            )
        self._roi_classes()

    def _roi_classes(self) -> torch.Tensor:
        """(K,) torchvision's label of each student class (by name)."""
        if self.student_classes is None:
            raise ValueError(
                "RoI KD from the torchvision teacher {} maps classes by name, but the student's "
                "class names are unknown: set KD.TEACHER.CHECK_CLASSES True and register "
                "DATASETS.TRAIN with thing_classes".format(self.name)
            )
        index = map_classes(self.categories, self.student_classes)
        return torch.as_tensor(index, device=self.device)

    @torch.no_grad()
    def roi_predictions(
        self, features: Dict[str, torch.Tensor], boxes: List[Boxes]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        torchvision's RoI box head (its ``box_roi_pool``, ``box_head``, ``box_predictor``) on
        given boxes, in the student's layout: class logits (R, K + 1), the student's K classes
        by name then the background last (torchvision's label 0; its logits of classes the
        student lacks are left out), and box deltas (R, 4 K) of those classes in torchvision's
        ``BoxCoder`` encoding (:attr:`roi_box_transform`).

        Args:
            features: the teacher's own features (p<k> -> (N, C, H, W)).
            boxes: per image, boxes in input-image coordinates (the student's sampled RoIs).
        """
        self.require_roi_head()
        heads = self.model.roi_heads
        index = self._roi_classes()
        keys = list(self._levels)
        p, stride = next(iter(self._levels.values()))
        image_size = tuple(int(n) * stride for n in features[p].shape[-2:])
        proposals = [b.tensor for b in boxes]

        def predict(*level_features):
            pooled = heads.box_roi_pool(
                OrderedDict(zip(keys, level_features)), proposals, [image_size] * len(proposals)
            )
            return heads.box_predictor(heads.box_head(pooled))

        logits, deltas = self._run(predict, *[features[self._levels[k][0]] for k in keys])
        logits = torch.cat([logits[:, index], logits[:, :1]], dim=1)
        if deltas.shape[1] != 4:  # per class (torchvision's are)
            deltas = deltas.view(len(deltas), -1, 4)[:, index].reshape(len(deltas), -1)
        return logits, deltas

    def roi_class_logits(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]):
        return self.roi_predictions(features, boxes)[0]

    @property
    def roi_box_transform(self) -> Box2BoxTransform:
        """torchvision's RoI ``BoxCoder`` as a Detectron2 Box2BoxTransform (same encoding)."""
        coder = self.model.roi_heads.box_coder
        return Box2BoxTransform(weights=tuple(coder.weights), scale_clamp=coder.bbox_xform_clip)

    def require_crosskd_head(self) -> None:
        raise ValueError(
            "KD.CROSSKD continues the teacher's head from a cut in the student's towers, which "
            "needs a Detectron2 RetinaNet teacher; the torchvision teacher {} cannot; disable "
            "KD.CROSSKD or use a Detectron2 teacher".format(self.name)
        )

    @property
    def dense_head_levels(self) -> List[str]:
        raise ValueError(
            "KD.CHANNEL_STATS runs the teacher's dense head on transplanted features, which "
            "kd_det does not do for torchvision teachers ({}); disable KD.CHANNEL_STATS".format(
                self.name
            )
        )

    def dense_head_outputs(self, features, grad: bool = False):
        return self.dense_head_levels  # raises

    def dense_head_from_towers(self, *args, **kwargs):
        self.require_crosskd_head()

    def map_dense_student(self, student) -> None:
        """
        Pair the teacher's RetinaNet head with a dense (RetinaNet) student's: its levels by
        stride, its classes by name, its anchors by shape per position.  Needed before
        :meth:`dense_head_predictions`.

        Raises:
            ValueError naming what differs (classes, anchors, levels); feature KD stays
            available without this.
        """
        self.require_dense_head()
        if self.student_classes is None:
            raise ValueError(
                "per-anchor KD from the torchvision teacher {} maps classes by name, but the "
                "student's class names are unknown: set KD.TEACHER.CHECK_CLASSES True and "
                "register DATASETS.TRAIN with thing_classes".format(self.name)
            )
        if len(self.student_classes) != student.num_classes:
            raise ValueError(
                "the student has {} classes but its training set names {}".format(
                    student.num_classes, len(self.student_classes)
                )
            )
        class_index = map_classes(self.categories, self.student_classes)
        by_stride = {s: i for i, (_, s) in enumerate(self._levels.values())}
        shapes = student.backbone.output_shape()
        teacher_cells = self.model.anchor_generator.cell_anchors
        levels, orders, cells = [], [], []
        for k, name in enumerate(student.head_in_features):
            stride = shapes[name].stride
            if stride not in by_stride:
                raise ValueError(
                    "the student's head level {} (stride {}) has no teacher level of that stride "
                    "(teacher strides {}); per-anchor KD needs the same head levels".format(
                        name, stride, sorted(by_stride)
                    )
                )
            i = by_stride[stride]
            t = teacher_cells[i].to(self.device)
            order = map_cell_anchors(t, list(student.anchor_generator.cell_anchors)[k])
            levels.append(i)
            orders.append(order)
            cells.append(t[order].float())
        anchors = DefaultAnchorGenerator(
            sizes=[[1.0] * len(c) for c in cells],
            aspect_ratios=[[1.0]] * len(cells),
            strides=[shapes[n].stride for n in student.head_in_features],
            offset=0.0,
        )
        anchors.cell_anchors = BufferList(cells)
        coder = self.model.box_coder
        self._dense = {
            "levels": levels,
            "orders": orders,
            "classes": torch.as_tensor(class_index, device=self.device),
            "anchor_generator": anchors.to(self.device),
            "box2box_transform": Box2BoxTransform(
                weights=tuple(coder.weights), scale_clamp=coder.bbox_xform_clip
            ),
            "recorder": ModuleOutputRecorder(
                self.model,
                {
                    "logits": Source("head.classification_head.cls_logits", calls="all"),
                    "deltas": Source("head.regression_head.bbox_reg", calls="all"),
                },
            ),
        }

    def _mapped(self) -> Dict:
        if self._dense is None:
            raise RuntimeError(
                "call map_dense_student(student) before asking the torchvision teacher for "
                "per-anchor predictions"
            )
        return self._dense

    @torch.no_grad()
    def dense_head_predictions(
        self, features: Dict[str, torch.Tensor], tower_index: Optional[int] = None
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        torchvision's RetinaNet head on the teacher's ``features`` (its own, p<k> -> (N, C, H,
        W)), read per level through hooks on its last convs and mapped to the student's layout:
        per student head level, class logits (N, A*K_student, H, W) (the student's classes, in
        its order) and box deltas (N, A*4, H, W) (the student's anchor order).
        """
        if tower_index is not None:
            self.require_crosskd_head()
        m = self._mapped()
        ordered = [features[p] for p, _ in self._levels.values()]
        self._run(lambda *fs: self.model.head(list(fs)), *ordered)
        out = m["recorder"].pop()
        logits, deltas = [], []
        for i, order in zip(m["levels"], m["orders"]):
            x, d = out["logits"][i].float(), out["deltas"][i].float()
            n, _, h, w = x.shape
            a = len(order)
            x = x.view(n, a, -1, h, w)[:, order][:, :, m["classes"]]
            logits.append(x.reshape(n, -1, h, w))
            deltas.append(d.view(n, a, 4, h, w)[:, order].reshape(n, a * 4, h, w))
        return logits, deltas

    def dense_class_logits(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        return self.dense_head_predictions(features)[0]

    def dense_anchors(self, logits: List[torch.Tensor]):
        """The teacher's anchors on the student's head levels (its shapes, in the student's
        order per position): per level Boxes (H*W*A, 4)."""
        return self._mapped()["anchor_generator"](logits)

    @property
    def dense_box_transform(self) -> Box2BoxTransform:
        """torchvision's box coder as a Detectron2 Box2BoxTransform (same encoding)."""
        return self._mapped()["box2box_transform"]


def _load_state(model: torch.nn.Module, state: Dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` strictly, or raise naming what does not fit."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        "{} {} in the file, {} in the model".format(k, tuple(state[k].shape), tuple(v.shape))
        for k, v in own.items()
        if k in state and tuple(state[k].shape) != tuple(v.shape)
    ]
    problems = []
    for what, keys in (("missing", missing), ("not in the model", unexpected), ("shape", shapes)):
        if keys:
            problems.append("{} {}: {}".format(len(keys), what, ", ".join(keys[:5])))
    if problems:
        raise ValueError(
            "teacher weights {!r} do not fit the torchvision model {} ({}); give the weights of "
            "that model (and KD.TEACHER.OPTS it was built with)".format(
                source, type(model).__name__, "; ".join(problems)
            )
        )
    model.load_state_dict(state)


def read_torchvision_teacher_weights(
    name: str, weights: str, sha256: str = ""
) -> Tuple[Dict[str, torch.Tensor], List[str]]:
    """
    The state dict and category list of a torchvision teacher's weights: ``weights`` (a
    local file or URL; empty: torchvision's default weights of ``name``, downloaded once into
    torch's hub cache).  A file holds the state dict itself, or ``{"model": state_dict,
    "categories": [...]}`` (what :mod:`kd_det.modeling.teacher.synthetic_teacher` saves);
    without "categories" they are the registry weights' ``meta["categories"]``.
    """
    source = weights or SCHEME + name
    local = resolve_weights(source, "KD.TEACHER.WEIGHTS")
    check_sha256(local, sha256, "KD.TEACHER.WEIGHTS_SHA256", source)
    data = read_checkpoint(local)
    if not isinstance(data, dict):
        raise ValueError("teacher weights {!r} hold a {}, not a state dict".format(source, data))
    categories = data.get("categories")
    state = data["model"] if isinstance(data.get("model"), dict) else data
    if categories is None:
        registry_name = source if is_torchvision_url(source) else name
        if name in TORCHVISION_DETECTOR_REGISTRY and not is_torchvision_url(source):
            raise ValueError(
                "teacher weights {!r} of kd_det's torchvision detector {} hold no 'categories' "
                "list; save them as {{'model': state_dict, 'categories': [...]}}".format(
                    source, name
                )
            )
        categories = torchvision_weights(registry_name).meta["categories"]
    return state, list(categories)


@register_teacher_kind("torchvision")
def build_torchvision_teacher(
    config: str,
    weights: str = "",
    *,
    weights_sha256: str = "",
    opts: Sequence[str] = (),
    autocast: str = "",
    channels_last: bool = False,
    expected_classes: Optional[Sequence[str]] = None,
    device: str = "cpu",
    input_scale: float = 1.0,
) -> TorchvisionTeacher:
    """
    A torchvision detector as a frozen teacher (arguments as
    :func:`~kd_det.modeling.teacher.build_teacher`):

    Args:
        config: ``torchvision://NAME``: a detector of torchvision's registry
            (``fasterrcnn_resnet50_fpn_v2``) or of kd_det's (``fasterrcnn_resnet18_fpn``).
        weights: its weights file; empty: torchvision's default weights of NAME.
        opts: "key=value" arguments of its builder (:func:`parse_builder_opts`).
        expected_classes: the student's class names (for per-anchor KD's class map).
    """
    name = config[len(SCHEME) :]
    kwargs = parse_builder_opts(opts)
    state, categories = read_torchvision_teacher_weights(name, weights, weights_sha256)
    kwargs.setdefault("num_classes", len(categories))
    model = build_torchvision_detector(name, **kwargs)
    _load_state(model, state, weights or SCHEME + name)
    model.to(device).eval().requires_grad_(False)
    teacher = TorchvisionTeacher(
        model,
        name=name,
        categories=categories,
        student_classes=expected_classes,
        input_scale=input_scale,
        autocast=autocast,
        channels_last=channels_last,
        weights=weights or SCHEME + name,
    )
    if expected_classes is not None:
        unmapped = [c for c in expected_classes if c not in categories]
        if unmapped:
            logger.info(
                "torchvision teacher %s has no class named %s: feature KD only", name, unmapped
            )
    logger.info("Loaded torchvision teacher %s from %s", name, teacher.weights)
    return teacher

"""The frozen teacher at run time: a loaded detector in eval mode, and what a student asks of it."""

from typing import Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from detectron2.structures import Boxes, ImageList

from ...config.detector import DetectorSettings

__all__ = ["FrozenTeacher"]

_AUTOCAST_DTYPES = {"": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def _to_fp32(x):
    if torch.is_tensor(x):
        return x.float() if x.is_floating_point() else x
    if isinstance(x, dict):
        return {k: _to_fp32(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_to_fp32(v) for v in x)
    return x


class FrozenTeacher:
    """
    A detector in eval mode with gradients off.

    Deliberately not an ``nn.Module``: stored on the student it is not a submodule,
    so it never reaches the optimizer, the student's ``state_dict`` (checkpoints),
    ``train()``, or DistributedDataParallel's gradient sync.  On resume it is
    rebuilt from its own weights.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        settings: DetectorSettings,
        *,
        autocast: str = "",
        channels_last: bool = False,
        weights: str = "",
        config: str = "",
        input_scale: float = 1.0,
    ):
        """
        Args:
            model: the loaded teacher detector.
            settings: its config's settings (:func:`~kd_det.config.detector.detector_settings`):
                meta-architecture, class count, input format, test size, datasets.
            autocast: "" (fp32), "bf16" or "fp16": run the teacher under autocast to
                cut its cost; its outputs are returned in fp32.
            channels_last: store the teacher's weights channels-last (faster convs on GPUs).
            weights, config: where its weights and its config came from (for messages).
            input_scale: run the teacher on the student's batch resized by this factor
                (``KD.TEACHER.INPUT_SCALE``): its level of stride ``s * input_scale`` then
                pairs with the student's level of stride ``s``.
        """
        if not input_scale > 0:
            raise ValueError(
                "KD.TEACHER.INPUT_SCALE must be > 0 (e.g. 2.0 for a teacher at twice the "
                "student's resolution), got {!r}".format(input_scale)
            )
        self.input_scale = float(input_scale)
        if autocast not in _AUTOCAST_DTYPES:
            raise ValueError(
                "KD.TEACHER.AUTOCAST must be one of {}, got {!r}".format(
                    sorted(_AUTOCAST_DTYPES), autocast
                )
            )
        self.model = model.eval().requires_grad_(False)
        self.settings = settings
        self.autocast_dtype = _AUTOCAST_DTYPES[autocast]
        self.channels_last = channels_last
        self.weights = weights
        self.config = config
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _run(self, fn, *args):
        """``fn(*args)`` under the teacher's autocast/memory format, float outputs back in fp32."""
        if self.channels_last:
            args = [
                (
                    a.contiguous(memory_format=torch.channels_last)
                    if torch.is_tensor(a) and a.dim() == 4
                    else a
                )
                for a in args
            ]
        if self.autocast_dtype is None:
            return fn(*args)
        device_type = self.device.type
        with torch.autocast(device_type=device_type, dtype=self.autocast_dtype):
            out = fn(*args)
        return _to_fp32(out)

    #: whether the teacher's classes are mapped to the student's by name (a teacher of another
    #: label space, e.g. torchvision's 91 COCO ids) rather than required to equal them
    classes_by_name = False
    #: whether the teacher's model is a Detectron2 one (its modules: heads, stages, matchers)
    runs_in_detectron2 = True

    @property
    def device(self) -> torch.device:
        return self.model.pixel_mean.device

    @property
    def inference_model(self) -> torch.nn.Module:
        """A module that Detectron2's ``inference_on_dataset`` runs: Detectron2's batched
        inputs (loaded in :attr:`input_format` at :attr:`test_size`) -> [{"instances"}] in
        the student's classes."""
        return self.model

    @property
    def size_divisibility(self) -> int:
        return self.model.backbone.size_divisibility

    def pixel_stats(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) the teacher normalises its input with, each (3, 1, 1), in 0-255 units."""
        return self.model.pixel_mean, self.model.pixel_std

    @property
    def meta_architecture(self) -> str:
        return self.settings.meta_architecture

    @property
    def num_classes(self) -> int:
        return self.settings.num_classes

    @property
    def input_format(self) -> str:
        return self.settings.input_format

    @property
    def test_size(self) -> Tuple[Optional[int], Optional[int]]:
        """(shortest edge, longest edge at most) of its test-time resize; (None, None): unknown."""
        return self.settings.min_size_test, self.settings.max_size_test

    def output_shape(self):
        return self.model.backbone.output_shape()

    def takes_input_like(
        self, input_format: str, pixel_mean: torch.Tensor, pixel_std: torch.Tensor
    ) -> bool:
        """Whether the teacher's channel order, normalisation and input size equal the given
        (student's)."""
        mean, std = self.pixel_stats()
        return (
            self.input_scale == 1.0
            and self.input_format == input_format
            and mean.shape == pixel_mean.shape
            and torch.equal(mean, pixel_mean)
            and torch.equal(std, pixel_std)
        )

    @torch.no_grad()
    def preprocess_image(
        self, batched_inputs: List[Dict], like: ImageList, input_format: str
    ) -> ImageList:
        """
        The batch (loaded in the student's ``input_format``) in the teacher's channel
        order, normalised with its pixel mean/std and padded to the padded size of
        ``like`` (the student's batch), so that features align; then resized (bilinear) by
        :attr:`input_scale`: (N, 3, H * input_scale, W * input_scale), the image sizes
        scaled alike.
        """
        mean, std = self.pixel_stats()
        images = [x["image"].to(mean.device) for x in batched_inputs]
        if self.input_format != input_format:
            if {self.input_format, input_format} != {"RGB", "BGR"}:
                raise ValueError(
                    "cannot convert student input format {} to teacher input format "
                    "{}".format(input_format, self.input_format)
                )
            images = [x.flip(0) for x in images]
        images = [(x - mean) / std for x in images]
        images = ImageList.from_tensors(images, self.size_divisibility)
        th, tw = images.tensor.shape[-2:]
        sh, sw = like.tensor.shape[-2:]
        if th > sh or tw > sw:
            raise ValueError(
                "teacher pads inputs to {}x{} but the student to {}x{}: give the "
                "student a MODEL size_divisibility that is a multiple of the "
                "teacher's".format(th, tw, sh, sw)
            )
        if (th, tw) != (sh, sw):
            images = ImageList(F.pad(images.tensor, (0, sw - tw, 0, sh - th)), images.image_sizes)
        return self.scaled(images)

    def scaled(self, images: ImageList) -> ImageList:
        """``images`` resized (bilinear) by :attr:`input_scale`: (N, 3, H * s, W * s)."""
        s = self.input_scale
        if s == 1.0:
            return images
        h, w = images.tensor.shape[-2:]
        tensor = F.interpolate(
            images.tensor, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False
        )
        sizes = [(round(a * s), round(b * s)) for a, b in images.image_sizes]
        return ImageList(tensor, sizes)

    def require_input_scale_one(self, what: str) -> None:
        """Raise unless the teacher sees the student's own input size (``what`` needs it)."""
        if self.input_scale != 1.0:
            raise ValueError(
                "{} compares teacher and student predictions per anchor or RoI, which is "
                "defined only for a teacher that sees the student's input size; "
                "KD.TEACHER.INPUT_SCALE is {:g}: set it to 1.0, or keep only feature KD "
                "(KD.FEATURE), which pairs levels by stride".format(what, self.input_scale)
            )

    @torch.no_grad()
    def backbone_features(self, images: ImageList) -> Dict[str, torch.Tensor]:
        """Teacher backbone (FPN) outputs: name -> (N, C, H, W)."""
        return self._run(self.model.backbone, images.tensor)

    @property
    def has_dense_head(self) -> bool:
        """Whether the teacher is a one-stage detector with per-anchor predictions (RetinaNet)."""
        return hasattr(self.model, "head") and hasattr(self.model, "head_in_features")

    def require_dense_head(self) -> None:
        """Raise unless the teacher has per-anchor predictions (RM, PFI, soft labels need them)."""
        self.require_input_scale_one("KD.RM, KD.PFI, KD.SOFT_LABEL, KD.CROSSKD and KD.BOX")
        if not self.has_dense_head:
            raise ValueError(
                "KD.RM, KD.PFI, KD.SOFT_LABEL, KD.CROSSKD and KD.BOX on a RetinaNet student "
                "need a one-stage (RetinaNet) teacher with per-anchor predictions, but the "
                "teacher is a {}; set "
                "KD.TEACHER.CONFIG to a RetinaNet config".format(self.meta_architecture)
            )

    @torch.no_grad()
    def dense_class_logits(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """
        Class logits of a one-stage teacher's head on its own ``features``:
        per level of ``model.head_in_features``, (N, A*K, H, W).
        """
        self.require_dense_head()
        return self._run(
            lambda *fs: self.model.head(list(fs))[0],
            *[features[f] for f in self.model.head_in_features],
        )

    @torch.no_grad()
    def dense_head_predictions(
        self, features: Dict[str, torch.Tensor], tower_index: Optional[int] = None
    ) -> Tuple[List[torch.Tensor], ...]:
        """
        A one-stage teacher's head on its own ``features``, per level of
        ``model.head_in_features``: class logits (N, A*K, H, W) and box deltas (N, A*4, H, W).

        Args:
            tower_index: also return the class and box towers' features where CrossKD cuts
                them (see :func:`~kd_det.modeling.distillers.crosskd.tower_split`): per level
                (N, C, H, W), before that conv's activation.
        Returns:
            (logits, deltas), or (logits, deltas, class tower cut, box tower cut) with
            ``tower_index``.
        """
        from ..distillers.crosskd import tower_split  # the distillers import the teacher

        self.require_dense_head()
        head = self.model.head

        def run(*fs):
            out = ([], [], [], [])
            for x in fs:
                for k, (subnet, last) in enumerate(
                    ((head.cls_subnet, head.cls_score), (head.bbox_subnet, head.bbox_pred))
                ):
                    p = 0 if tower_index is None else tower_split(subnet, tower_index)
                    cut = subnet[:p](x)
                    out[k].append(last(subnet[p:](cut)))
                    out[2 + k].append(cut)
            return out

        out = self._run(run, *[features[f] for f in self.model.head_in_features])
        return out if tower_index is not None else out[:2]

    def dense_head_from_towers(
        self,
        cls_features: List[torch.Tensor],
        box_features: List[torch.Tensor],
        tower_index: int,
    ) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """
        CrossKD's cross-head: a one-stage teacher's head continued from its towers' cut at
        ``tower_index`` on given features (the student's), per level: class logits
        (N, A*K, H, W) and box deltas (N, A*4, H, W).  The graph is kept, so losses reach the
        given features; the teacher's weights get no gradient.

        Args:
            cls_features, box_features: per level (N, C, H, W) features in place of the
                teacher's tower cuts (:meth:`dense_head_predictions` ``tower_index``).
        """
        from ..distillers.crosskd import tower_split

        self.require_dense_head()
        head = self.model.head

        def run(*fs):
            n = len(fs) // 2
            out = ([], [])
            for k, (subnet, last) in enumerate(
                ((head.cls_subnet, head.cls_score), (head.bbox_subnet, head.bbox_pred))
            ):
                p = tower_split(subnet, tower_index)
                for x in fs[k * n : (k + 1) * n]:
                    out[k].append(last(subnet[p:](x)))
            return out

        with torch.enable_grad():
            return self._run(run, *cls_features, *box_features)

    def require_crosskd_head(self) -> None:
        """Raise unless CrossKD can continue the teacher's head from the student's towers."""
        self.require_dense_head()

    def dense_anchors(self, logits: List[torch.Tensor]) -> List[Boxes]:
        """A one-stage teacher's anchors for per-level ``logits`` (N, A*K, H, W): per level
        Boxes (H*W*A, 4)."""
        return self.model.anchor_generator(logits)

    @property
    def dense_box_transform(self):
        """A one-stage teacher's box encoding (a Detectron2 Box2BoxTransform)."""
        return self.model.box2box_transform

    def require_roi_head(self) -> None:
        """Raise unless the teacher has one RoI box head with class scores (Faster R-CNN)."""
        self.require_input_scale_one("KD.SOFT_LABEL and KD.BOX")
        heads = getattr(self.model, "roi_heads", None)
        if not hasattr(getattr(heads, "box_predictor", None), "cls_score"):
            raise ValueError(
                "soft-label and box KD of a two-stage student (KD.SOFT_LABEL, KD.BOX) "
                "compare RoI predictions, so each needs a Faster R-CNN teacher with one box head, "
                "but the teacher is a {} ({}); set KD.TEACHER.CONFIG to a Faster "
                "R-CNN config".format(
                    self.meta_architecture, type(heads).__name__ if heads else "no RoI heads"
                )
            )

    @torch.no_grad()
    def roi_class_logits(
        self, features: Dict[str, torch.Tensor], boxes: List[Boxes]
    ) -> torch.Tensor:
        """
        Class logits of a two-stage teacher's box head on given boxes.

        Args:
            features: the teacher's own backbone features (name -> (N, C, H, W)).
            boxes: per image, boxes in input-image coordinates (e.g. the student's sampled RoIs).
        Returns:
            (R, K + 1): R = all boxes of all images, in order; background last.
        """
        return self.roi_predictions(features, boxes)[0]

    @torch.no_grad()
    def roi_predictions(
        self, features: Dict[str, torch.Tensor], boxes: List[Boxes]
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """
        A two-stage teacher's box head on given boxes: class logits (R, K + 1) and box deltas
        (R, 4 K), or (R, 4) for a class-agnostic head, in its own ``box2box_transform``'s
        encoding relative to the boxes.  Arguments as :meth:`roi_class_logits`.
        """
        self.require_roi_head()
        heads = self.model.roi_heads

        def predict(*level_features):
            x = heads.box_head(heads.box_pooler(list(level_features), boxes))
            return heads.box_predictor(x)

        return self._run(predict, *[features[f] for f in heads.box_in_features])

    @property
    def roi_box_transform(self):
        """A two-stage teacher's RoI box encoding (a Detectron2 Box2BoxTransform)."""
        return self.model.roi_heads.box_predictor.box2box_transform

    @property
    def dense_head_levels(self) -> List[str]:
        """Levels of the teacher's dense head: RetinaNet's head, or a two-stage teacher's RPN."""
        m = self.model
        if self.has_dense_head:
            return list(m.head_in_features)
        return list(m.proposal_generator.in_features)

    def dense_head_outputs(
        self, features: Dict[str, torch.Tensor], grad: bool = False
    ) -> List[torch.Tensor]:
        """
        Per-position scores of the teacher's dense head on ``features`` (its own, or
        features made from them): RetinaNet class logits (N, A*K, H, W) or RPN
        objectness logits (N, A, H, W), per level of :attr:`dense_head_levels`.

        Args:
            grad: keep the graph so that a loss on the outputs reaches ``features``
                (the teacher's weights still get no gradient).
        """
        m = self.model
        head = (
            (lambda *fs: m.head(list(fs))[0])
            if self.has_dense_head
            else (lambda *fs: m.proposal_generator.rpn_head(list(fs))[0])
        )
        with torch.set_grad_enabled(grad):
            return self._run(head, *[features[f] for f in self.dense_head_levels])

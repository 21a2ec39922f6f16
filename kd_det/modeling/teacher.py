"""The frozen teacher detector: built from its own config, loaded from its own weights."""

import logging
import os
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode, get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import build_model
from detectron2.structures import Boxes, ImageList
from detectron2.utils.file_io import PathManager

from ..config import add_kd_config, merge_kd_config
from .lazy_teacher import build_lazy_teacher

__all__ = ["FrozenTeacher", "build_teacher_cfg", "build_teacher", "build_teachers", "check_same_classes",
           "num_classes_of", "resolve_teacher_config"]

logger = logging.getLogger(__name__)
# the source checkout, whose configs/ the shipped student configs name as KD.TEACHER.CONFIG
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def num_classes_of(cfg: CfgNode) -> int:
    """The class count of a GeneralizedRCNN or RetinaNet config."""
    if "RetinaNet" in cfg.MODEL.META_ARCHITECTURE:
        return cfg.MODEL.RETINANET.NUM_CLASSES
    return cfg.MODEL.ROI_HEADS.NUM_CLASSES


def _model_zoo_config_file(name: str) -> Optional[str]:
    """The file of ``name`` in Detectron2's model zoo (e.g. "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"), or None."""
    try:
        from detectron2 import model_zoo

        return model_zoo.get_config_file(name)
    except Exception:  # not a model-zoo name, or a Detectron2 installed without its configs
        return None


def resolve_teacher_config(path: str) -> str:
    """
    The teacher config file ``KD.TEACHER.CONFIG`` names: a path (relative to the working
    directory) or, where no such file exists, a config of Detectron2's model zoo by its
    name there, as ``detectron2.model_zoo.get_config_file`` takes it (e.g.
    ``new_baselines/mask_rcnn_R_101_FPN_400ep_LSJ.py``).

    Raises:
        ValueError / FileNotFoundError naming the fix when it is empty or neither.
    """
    if not path:
        raise ValueError("KD.TEACHER.CONFIG is empty: set it to the teacher's Detectron2 config file "
                         "(e.g. configs/synthetic/faster_rcnn_R_50_FPN.yaml)")
    if os.path.isfile(path):
        return path
    zoo_file = None if os.path.isabs(path) else _model_zoo_config_file(path)
    if zoo_file is not None:
        logger.info("teacher config %s: Detectron2's model-zoo config %s", path, zoo_file)
        return zoo_file
    hint = ""
    shipped = os.path.join(_CHECKOUT, path)
    if not os.path.isabs(path) and os.path.isfile(shipped):
        hint = "; kd_det ships it as {}: run from the kd_det checkout or give that absolute path".format(shipped)
    raise FileNotFoundError("teacher config KD.TEACHER.CONFIG={!r} does not exist (paths are relative to the working "
                            "directory {}) and is not a config of Detectron2's model zoo (e.g. "
                            "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml){}".format(path, os.getcwd(), hint))


def _is_lazy_config(path: str) -> bool:
    return path.endswith(".py")


def build_teacher_cfg(student_cfg: CfgNode, path: Optional[str] = None) -> CfgNode:
    """
    The teacher's yacs config: ``path`` (default ``KD.TEACHER.CONFIG``) +
    ``KD.TEACHER.OPTS``, on the student's device.  (A LazyConfig teacher is read by
    :func:`build_lazy_teacher` instead.)
    """
    path = resolve_teacher_config(student_cfg.KD.TEACHER.CONFIG if path is None else path)
    if _is_lazy_config(path):
        raise ValueError("teacher config {!r} is a LazyConfig (.py), not a yacs config: build the teacher with "
                         "build_teacher(), which reads both".format(path))
    cfg = add_kd_config(get_cfg())
    try:
        merge_kd_config(cfg, path, list(student_cfg.KD.TEACHER.OPTS), opts_source="KD.TEACHER.OPTS")
    except Exception as e:
        raise ValueError("teacher config {!r} does not build: {}: {}".format(path, type(e).__name__, e)) from e
    if cfg.MODEL.META_ARCHITECTURE.startswith("Distill"):
        raise ValueError("teacher config {!r} uses {}; a teacher must be a plain detector (GeneralizedRCNN or "
                         "RetinaNet)".format(path, cfg.MODEL.META_ARCHITECTURE))
    cfg.MODEL.DEVICE = student_cfg.MODEL.DEVICE
    cfg.MODEL.WEIGHTS = ""
    cfg.freeze()
    return cfg


def _train_command(config_path: str) -> str:
    """The command that trains a teacher from ``config_path``."""
    if _is_lazy_config(config_path):
        return "tools/lazyconfig_train_net.py --config-file {}".format(config_path)
    return "tools/train_net.py --config-file {}".format(config_path)


def _local_weights_file(path: str, config_path: str) -> str:
    """
    A local file for ``KD.TEACHER.WEIGHTS``: a path as it is, or a URL that Detectron2's
    PathManager resolves (``detectron2://`` for its model zoo, ``https://``), fetched
    once into iopath's cache ($FVCORE_CACHE, default ~/.torch/iopath_cache).
    """
    if "://" not in path:
        if not os.path.isfile(path):
            raise FileNotFoundError("teacher weights KD.TEACHER.WEIGHTS={!r} not found. Train the teacher with "
                                    "{} or fix the path".format(path, _train_command(config_path)))
        return path
    try:
        return PathManager.get_local_path(path)
    except Exception as e:
        raise FileNotFoundError(
            "teacher weights KD.TEACHER.WEIGHTS={!r} could not be fetched ({}: {}). Without network access, "
            "download the file elsewhere and set KD.TEACHER.WEIGHTS to its local path".format(
                path, type(e).__name__, e)) from e


def _load_teacher_weights(model: torch.nn.Module, path: str, config_path: str) -> None:
    if not path:
        raise ValueError("KD.TEACHER.WEIGHTS is empty: a distilled student needs a trained teacher. Train one "
                         "with {} and point KD.TEACHER.WEIGHTS at its model_final.pth".format(
                             _train_command(config_path)))
    local = _local_weights_file(path, config_path)
    checkpointer = DetectionCheckpointer(model)
    try:
        checkpoint = checkpointer._load_file(local)
    except Exception as e:
        raise ValueError("teacher weights {!r} are unreadable ({}: {}); re-save or re-train the "
                         "teacher".format(path, type(e).__name__, e)) from e
    incompatible = checkpointer._load_model(checkpoint)
    problems = []
    if incompatible.missing_keys:
        problems.append("missing keys: " + ", ".join(incompatible.missing_keys[:10]))
    if incompatible.unexpected_keys:
        problems.append("unexpected keys: " + ", ".join(incompatible.unexpected_keys[:10]))
    if incompatible.incorrect_shapes:
        problems.append("shape mismatch: " + ", ".join(
            "{} {}->{}".format(k, tuple(a), tuple(b)) for k, a, b in incompatible.incorrect_shapes[:10]))
    if problems:
        raise ValueError("teacher weights {!r} do not fit the teacher config {!r} ({}). Use the config the "
                         "teacher was trained with".format(path, config_path, "; ".join(problems)))


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

    def __init__(self, model: torch.nn.Module, cfg: CfgNode, autocast: str = "", channels_last: bool = False,
                 weights: str = ""):
        """
        Args:
            model: the loaded teacher detector.
            cfg: its config.
            weights: where its weights came from (for messages).
            autocast: "" (fp32), "bf16" or "fp16": run the teacher under autocast to
                cut its cost; its outputs are returned in fp32.
            channels_last: store the teacher's weights channels-last (faster convs on GPUs).
        """
        if autocast not in _AUTOCAST_DTYPES:
            raise ValueError("KD.TEACHER.AUTOCAST must be one of {}, got {!r}".format(sorted(_AUTOCAST_DTYPES), autocast))
        self.model = model.eval().requires_grad_(False)
        self.cfg = cfg
        self.autocast_dtype = _AUTOCAST_DTYPES[autocast]
        self.channels_last = channels_last
        self.weights = weights
        if channels_last:
            self.model.to(memory_format=torch.channels_last)

    def _run(self, fn, *args):
        """``fn(*args)`` under the teacher's autocast/memory format, float outputs back in fp32."""
        if self.channels_last:
            args = [a.contiguous(memory_format=torch.channels_last) if torch.is_tensor(a) and a.dim() == 4 else a
                    for a in args]
        if self.autocast_dtype is None:
            return fn(*args)
        device_type = self.model.pixel_mean.device.type
        with torch.autocast(device_type=device_type, dtype=self.autocast_dtype):
            out = fn(*args)
        return _to_fp32(out)

    @property
    def num_classes(self) -> int:
        return num_classes_of(self.cfg)

    def output_shape(self):
        return self.model.backbone.output_shape()

    @property
    def input_format(self) -> str:
        return self.cfg.INPUT.FORMAT

    def takes_input_like(self, input_format: str, pixel_mean: torch.Tensor, pixel_std: torch.Tensor) -> bool:
        """Whether the teacher's channel order and normalisation equal the given (student's) ones."""
        m = self.model
        return (self.input_format == input_format and m.pixel_mean.shape == pixel_mean.shape and torch.equal(m.pixel_mean, pixel_mean)
                and torch.equal(m.pixel_std, pixel_std))

    @torch.no_grad()
    def preprocess_image(self, batched_inputs: List[Dict], like: ImageList, input_format: str) -> ImageList:
        """
        The batch (loaded in the student's ``input_format``) in the teacher's channel
        order, normalised with its pixel mean/std and padded to the padded size of
        ``like`` (the student's batch), so that features align.
        """
        m = self.model
        images = [x["image"].to(m.pixel_mean.device) for x in batched_inputs]
        if self.input_format != input_format:
            if {self.input_format, input_format} != {"RGB", "BGR"}:
                raise ValueError("cannot convert student input format {} to teacher input format {}".format(
                    input_format, self.input_format))
            images = [x.flip(0) for x in images]
        images = [(x - m.pixel_mean) / m.pixel_std for x in images]
        images = ImageList.from_tensors(images, m.backbone.size_divisibility)
        th, tw = images.tensor.shape[-2:]
        sh, sw = like.tensor.shape[-2:]
        if th > sh or tw > sw:
            raise ValueError("teacher pads inputs to {}x{} but the student to {}x{}: give the student a "
                             "MODEL size_divisibility that is a multiple of the teacher's".format(th, tw, sh, sw))
        if (th, tw) != (sh, sw):
            images = ImageList(F.pad(images.tensor, (0, sw - tw, 0, sh - th)), images.image_sizes)
        return images

    @torch.no_grad()
    def backbone_features(self, images: ImageList) -> Dict[str, torch.Tensor]:
        """Teacher backbone (FPN) outputs: name -> (N, C, H, W)."""
        return self._run(self.model.backbone, images.tensor)

    @property
    def has_dense_head(self) -> bool:
        """Whether the teacher is a one-stage detector with per-anchor predictions (RetinaNet)."""
        return hasattr(self.model, "head") and hasattr(self.model, "head_in_features")

    def require_dense_head(self) -> None:
        """Raise a clear error unless the teacher has per-anchor predictions (RM, PFI, soft labels need them)."""
        if not self.has_dense_head:
            raise ValueError("KD.RM, KD.PFI and KD.SOFT_LABEL need a one-stage (RetinaNet) teacher with per-anchor "
                             "class predictions, but the teacher is a {}; set KD.TEACHER.CONFIG to a RetinaNet "
                             "config".format(self.cfg.MODEL.META_ARCHITECTURE))

    @torch.no_grad()
    def dense_class_logits(self, features: Dict[str, torch.Tensor]) -> List[torch.Tensor]:
        """
        Class logits of a one-stage teacher's head on its own ``features``:
        per level of ``model.head_in_features``, (N, A*K, H, W).
        """
        self.require_dense_head()
        return self._run(lambda *fs: self.model.head(list(fs))[0], *[features[f] for f in self.model.head_in_features])


    def require_roi_head(self) -> None:
        """Raise a clear error unless the teacher has one RoI box head with class scores (Faster R-CNN)."""
        heads = getattr(self.model, "roi_heads", None)
        if not hasattr(getattr(heads, "box_predictor", None), "cls_score"):
            raise ValueError("soft-label KD of a two-stage student (KD.SOFT_LABEL) compares RoI class scores, so it "
                             "needs a Faster R-CNN teacher with one box head, but the teacher is a {} ({}); set "
                             "KD.TEACHER.CONFIG to a Faster R-CNN config".format(
                                 self.cfg.MODEL.META_ARCHITECTURE, type(heads).__name__ if heads else "no RoI heads"))

    @torch.no_grad()
    def roi_class_logits(self, features: Dict[str, torch.Tensor], boxes: List[Boxes]) -> torch.Tensor:
        """
        Class logits of a two-stage teacher's box head on given boxes.

        Args:
            features: the teacher's own backbone features (name -> (N, C, H, W)).
            boxes: per image, boxes in input-image coordinates (e.g. the student's sampled RoIs).
        Returns:
            (R, K + 1): R = all boxes of all images, in order; background last.
        """
        self.require_roi_head()
        heads = self.model.roi_heads

        def scores(*level_features):
            x = heads.box_head(heads.box_pooler(list(level_features), boxes))
            return heads.box_predictor(x)[0]

        return self._run(scores, *[features[f] for f in heads.box_in_features])

    @property
    def dense_head_levels(self) -> List[str]:
        """Levels of the teacher's dense head: RetinaNet's head, or a two-stage teacher's RPN."""
        m = self.model
        return list(m.head_in_features) if self.has_dense_head else list(m.proposal_generator.in_features)

    def dense_head_outputs(self, features: Dict[str, torch.Tensor], grad: bool = False) -> List[torch.Tensor]:
        """
        Per-position scores of the teacher's dense head on ``features`` (its own, or
        features made from them): RetinaNet class logits (N, A*K, H, W) or RPN
        objectness logits (N, A, H, W), per level of :attr:`dense_head_levels`.

        Args:
            grad: keep the graph so that a loss on the outputs reaches ``features``
                (the teacher's weights still get no gradient).
        """
        m = self.model
        head = (lambda *fs: m.head(list(fs))[0]) if self.has_dense_head else (
            lambda *fs: m.proposal_generator.rpn_head(list(fs))[0])
        with torch.set_grad_enabled(grad):
            return self._run(head, *[features[f] for f in self.dense_head_levels])


def build_teacher(student_cfg: CfgNode, config: Optional[str] = None, weights: Optional[str] = None) -> FrozenTeacher:
    """
    Build and load the teacher named by ``student_cfg.KD.TEACHER`` (or by ``config`` and
    ``weights``, with KD.TEACHER's other keys), checking it fits the student.
    """
    config = resolve_teacher_config(student_cfg.KD.TEACHER.CONFIG if config is None else config)
    weights = student_cfg.KD.TEACHER.WEIGHTS if weights is None else weights
    if _is_lazy_config(config):
        model, cfg = build_lazy_teacher(student_cfg, config)
    else:
        cfg = build_teacher_cfg(student_cfg, config)
        model = build_model(cfg)
    _load_teacher_weights(model, weights, config)
    teacher = FrozenTeacher(model, cfg, student_cfg.KD.TEACHER.AUTOCAST, student_cfg.KD.TEACHER.CHANNELS_LAST,
                            weights=weights)
    student_classes = num_classes_of(student_cfg)
    if teacher.num_classes != student_classes:
        raise ValueError("teacher has {} classes ({}) but the student has {}: both must be trained on the same "
                         "label space (set NUM_CLASSES alike)".format(
                             teacher.num_classes, config, student_classes))
    if student_cfg.KD.TEACHER.CHECK_CLASSES:
        check_same_classes(student_cfg.DATASETS.TRAIN, cfg.DATASETS.TRAIN, config)
    logger.info("Loaded teacher {} from {}".format(cfg.MODEL.META_ARCHITECTURE, weights))
    return teacher


def _registered_thing_classes(dataset_names) -> Optional[List[str]]:
    """The ``thing_classes`` metadata of the first of ``dataset_names`` that is registered and has it, else None."""
    registered = set(DatasetCatalog.list())
    for name in dataset_names:
        if name in registered:
            classes = MetadataCatalog.get(name).get("thing_classes", None)
            if classes:
                return list(classes)
    return None


def check_same_classes(student_train, teacher_train, teacher_config: str) -> None:
    """
    Raise if the teacher's training sets name other classes than the student's, or
    the same classes in another order: class index i must mean the same object for
    both.  Datasets that are not registered here, or whose classes are known only
    once loaded, are not checked.
    """
    student = _registered_thing_classes(student_train)
    teacher = _registered_thing_classes(teacher_train)
    if student is None or teacher is None or student == teacher:
        return
    if sorted(student) == sorted(teacher):
        i = next(i for i, (a, b) in enumerate(zip(student, teacher)) if a != b)
        what = "the same classes in another order (class {} is {!r} for the teacher, {!r} for the student)".format(
            i, teacher[i], student[i])
    else:
        what = "other classes (the teacher's {} are not among the student's; the student's {} not among the " \
               "teacher's)".format(sorted(set(teacher) - set(student))[:5], sorted(set(student) - set(teacher))[:5])
    raise ValueError(
        "teacher config {!r} was trained on DATASETS.TRAIN={} and the student on {}: they have {}, so the teacher's "
        "predictions would teach the wrong classes. Train the teacher on the student's label space; if the "
        "classes do correspond, set KD.TEACHER.CHECK_CLASSES False".format(
            teacher_config, tuple(teacher_train), tuple(student_train), what))


def build_teachers(student_cfg: CfgNode) -> List[FrozenTeacher]:
    """
    The teachers of a distillation config: ``KD.MULTI_TEACHER.CONFIGS/WEIGHTS`` when
    set (several teachers), else the one ``KD.TEACHER``.
    """
    mt = student_cfg.KD.MULTI_TEACHER
    if not mt.CONFIGS:
        return [build_teacher(student_cfg)]
    if student_cfg.KD.TEACHER.CONFIG:
        raise ValueError("both KD.TEACHER.CONFIG and KD.MULTI_TEACHER.CONFIGS are set; list every teacher in "
                         "KD.MULTI_TEACHER.CONFIGS (and its weights in KD.MULTI_TEACHER.WEIGHTS) and leave "
                         "KD.TEACHER.CONFIG empty")
    if len(mt.WEIGHTS) != len(mt.CONFIGS):
        raise ValueError("KD.MULTI_TEACHER.CONFIGS has {} teachers but KD.MULTI_TEACHER.WEIGHTS {} checkpoints; "
                         "give one checkpoint per teacher config".format(len(mt.CONFIGS), len(mt.WEIGHTS)))
    return [build_teacher(student_cfg, c, w) for c, w in zip(mt.CONFIGS, mt.WEIGHTS)]

"""
Every shipped config merges into a kd_det config and names a registered meta-architecture;
its class count fits its datasets, and a distillation config fits its teacher's (same
classes and training data, teacher weights where the teacher's config writes them).
"""

import glob
import os

import pytest
import torch
from conftest import REPO
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.data import MetadataCatalog
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_model
from detectron2.structures import Boxes, Instances
from detectron2.utils.events import EventStorage
from tolerances import U32, assert_within

from kd_det import get_kd_cfg, merge_kd_config
from kd_det.config.detector import build_detector, detector_settings, load_detector_config
from kd_det.modeling.teacher import resolve_teacher_config, teacher_kind

CONFIGS = sorted(
    os.path.relpath(p, REPO)
    for p in glob.glob(os.path.join(REPO, "configs", "**", "*.yaml"), recursive=True)
)


def test_configs_found():
    assert len(CONFIGS) > 30


@pytest.mark.parametrize("path", CONFIGS)
def test_config_merges(path):
    # unknown keys or bad values raise here
    cfg = merge_kd_config(get_kd_cfg(), os.path.join(REPO, path))
    META_ARCH_REGISTRY.get(cfg.MODEL.META_ARCHITECTURE)
    for teacher in ([cfg.KD.TEACHER.CONFIG] if cfg.KD.TEACHER.CONFIG else []) + list(
        cfg.KD.MULTI_TEACHER.CONFIGS
    ):
        if teacher_kind(teacher) == "torchvision":
            assert _is_torchvision_detector(teacher), teacher
            continue
        # a file of the checkout, or a name in Detectron2's model zoo
        assert os.path.isfile(os.path.join(REPO, teacher)) or os.path.isfile(
            _zoo_config(teacher)
        ), teacher


def _is_torchvision_detector(url):
    """Whether ``torchvision://NAME`` names a detector of torchvision's registry or kd_det's
    (nothing built, nothing downloaded)."""
    from torchvision.models import detection, list_models

    from kd_det.modeling.teacher.torchvision_models import TORCHVISION_DETECTOR_REGISTRY

    name = url[len("torchvision://") :]
    return name in TORCHVISION_DETECTOR_REGISTRY or name in list_models(module=detection)


def _zoo_config(name):
    from detectron2 import model_zoo

    try:
        return model_zoo.get_config_file(name)
    except RuntimeError:
        return ""


def _num_classes(cfg):
    return detector_settings(cfg).num_classes


def _load(path):
    return merge_kd_config(get_kd_cfg(), os.path.join(REPO, path))


def _teachers(cfg):
    """(config path, weights path) of each teacher a config names."""
    pairs = [(cfg.KD.TEACHER.CONFIG, cfg.KD.TEACHER.WEIGHTS)] if cfg.KD.TEACHER.CONFIG else []
    return pairs + list(zip(cfg.KD.MULTI_TEACHER.CONFIGS, cfg.KD.MULTI_TEACHER.WEIGHTS))


@pytest.mark.parametrize("path", CONFIGS)
def test_class_count_fits_the_datasets(path):
    cfg = _load(path)
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        classes = MetadataCatalog.get(name).get("thing_classes", None)
        assert classes is not None, "{} names {!r}, which has no registered classes".format(
            path, name
        )
        assert _num_classes(cfg) == len(classes), "{}: {} classes, {!r} has {}".format(
            path, _num_classes(cfg), name, len(classes)
        )


DISTILL_CONFIGS = [p for p in CONFIGS if _teachers(_load(p))]


def test_distillation_configs_found():
    assert {"COCO-Distillation", "PascalVOC-Distillation", "distill"} <= {
        p.split(os.sep)[-2] for p in DISTILL_CONFIGS
    }


@pytest.mark.parametrize("path", DISTILL_CONFIGS)
def test_student_fits_its_teachers(path, monkeypatch):
    monkeypatch.chdir(REPO)  # the shipped teacher paths are relative to the checkout
    cfg = _load(path)
    assert len(cfg.KD.MULTI_TEACHER.CONFIGS) == len(cfg.KD.MULTI_TEACHER.WEIGHTS), path
    for teacher_config, weights in _teachers(cfg):
        if teacher_kind(teacher_config) == "torchvision":
            # torchvision's registry weights (empty), or kd_det's synthetic teacher of that name
            name = teacher_config[len("torchvision://") :]
            assert weights in ("", "synthetic-teacher://" + name), (path, weights)
            if "synthetic" not in path.split(os.sep):
                assert cfg.KD.TEACHER.EVAL_BEFORE_TRAIN, path
            continue
        teacher = load_detector_config(resolve_teacher_config(teacher_config), cfg.KD.TEACHER.OPTS)
        settings = detector_settings(teacher)
        assert settings.num_classes == _num_classes(cfg), (path, teacher_config)
        assert settings.train_datasets == tuple(cfg.DATASETS.TRAIN), (path, teacher_config)
        if "synthetic" not in path.split(
            os.sep
        ):  # real runs score the teacher before spending GPU days on it
            assert cfg.KD.TEACHER.EVAL_BEFORE_TRAIN, path
        if weights.startswith(
            "detectron2://"
        ):  # the published weights of that very model-zoo config
            from detectron2 import model_zoo

            zoo_name = (
                teacher_config[len("configs/") :]
                if teacher_config.startswith("configs/")
                else teacher_config
            )
            assert weights.replace(
                "detectron2://", "https://dl.fbaipublicfiles.com/detectron2/"
            ) == model_zoo.get_checkpoint_url(zoo_name), (path, weights)
            continue
        # training the teacher with its own config writes the weights the student config loads
        lazy = not isinstance(teacher, CfgNode)
        output_dir = teacher.train.output_dir if lazy else teacher.OUTPUT_DIR
        trained = os.path.normpath(os.path.join(output_dir, "model_final.pth"))
        assert os.path.normpath(weights) == trained, (path, teacher_config, weights)


TORCHVISION_STUDENTS = [p for p in CONFIGS if _load(p).MODEL.WEIGHTS.startswith("torchvision://")]


def test_r18_students_use_torchvision_weights():
    """COCO and VOC R-18 students start from torchvision's ImageNet R-18 (synthetic ones from
    scratch)."""
    r18 = [p for p in CONFIGS if "synthetic" not in p.split(os.sep) and ("R18" in p or "R_18" in p)]
    assert len(r18) > 20 and not [p for p in r18 if p not in TORCHVISION_STUDENTS]


@pytest.mark.parametrize("path", TORCHVISION_STUDENTS)
def test_torchvision_students_have_the_input_their_weights_need(path):
    """A config with torchvision:// weights sets the depth, channel order, normalisation and
    stride placement the weights were trained with (checked again on the model when they load)."""
    from kd_det.checkpoint.torchvision_backbone import input_problems, torchvision_resnet_input

    cfg = _load(path)
    depth = cfg.MODEL.RESNETS.DEPTH
    problems = input_problems(
        torchvision_resnet_input(cfg.MODEL.WEIGHTS),
        depth,
        cfg.INPUT.FORMAT,
        cfg.MODEL.PIXEL_MEAN,
        cfg.MODEL.PIXEL_STD,
        cfg.MODEL.RESNETS.STRIDE_IN_1X1 if depth >= 50 else None,
    )
    assert not problems, (path, problems)


R101_TO_R50 = [p for p in CONFIGS if "R101_to_R50" in os.path.basename(p)]


def _student_keys(cfg):
    """What makes the student: MODEL (but the meta-architecture) and INPUT."""
    model = cfg.MODEL.clone()
    model.META_ARCHITECTURE = model.META_ARCHITECTURE.replace("Distill", "")
    return model, cfg.INPUT


@pytest.mark.parametrize("path", R101_TO_R50)
def test_paper_settings_r101_to_r50(path):
    """The COCO paper settings: the model-zoo R-101 3x teacher, the MSRA R-50 student exactly as
    configs/COCO-Detection's R-50 config builds it, the schedule the name says."""
    cfg = _load(path)
    arch = "retinanet" if "retinanet" in path else "faster_rcnn"
    assert cfg.KD.TEACHER.CONFIG == "configs/COCO-Detection/{}_R_101_FPN_3x.yaml".format(arch)
    assert cfg.KD.TEACHER.WEIGHTS.startswith("detectron2://COCO-Detection/")
    assert _student_keys(cfg) == _student_keys(
        _load("configs/COCO-Detection/{}_R_50_FPN_1x.yaml".format(arch))
    )
    assert cfg.MODEL.WEIGHTS == "detectron2://ImageNetPretrained/MSRA/R-50.pkl"
    schedule = {"1x": (90000, (60000, 80000)), "2x": (180000, (120000, 160000))}
    assert (cfg.SOLVER.MAX_ITER, tuple(cfg.SOLVER.STEPS)) == schedule[path[-7:-5]], path
    assert cfg.SOLVER.IMS_PER_BATCH == 16
    assert os.path.basename(cfg.OUTPUT_DIR) == os.path.basename(path)[: -len(".yaml")]


def test_paper_settings_cover_every_method():
    names = {os.path.basename(p).split("_R101")[0] for p in R101_TO_R50}
    methods = ["ssim", "l2", "cwd", "mgd", "pkd", "box", "lakd", "soft_label"]
    assert names == {m + "_" + a for m in methods for a in ("faster_rcnn", "retinanet")} | {
        "rm_pfi_retinanet",
        "crosskd_retinanet",
    }


@pytest.fixture(scope="module")
def zoo_r101_teachers(tmp_path_factory):
    """Randomly initialised checkpoints of the two R-101 3x teacher configs (no download)."""
    out = {}
    for arch in ("faster_rcnn", "retinanet"):
        teacher = _load("configs/COCO-Detection/{}_R_101_FPN_3x.yaml".format(arch))
        teacher.MODEL.DEVICE = "cpu"
        folder = tmp_path_factory.mktemp(arch)
        torch.manual_seed(0)
        DetectionCheckpointer(build_model(teacher), save_dir=str(folder)).save("teacher")
        out[arch] = str(folder / "teacher.pth")
    return out


@pytest.mark.slow
@pytest.mark.parametrize("path", R101_TO_R50)
def test_paper_settings_build(path, zoo_r101_teachers, monkeypatch):
    """Each R-101 -> R-50 config builds its student and teacher (teacher config resolved, weights
    of its shapes loaded strictly), without downloading anything."""
    monkeypatch.chdir(REPO)
    cfg = _load(path)
    cfg.MODEL.DEVICE = "cpu"
    cfg.KD.TEACHER.WEIGHTS = zoo_r101_teachers[
        "retinanet" if "retinanet" in path else "faster_rcnn"
    ]
    model = build_model(cfg)
    assert type(model).__name__ == cfg.MODEL.META_ARCHITECTURE
    assert len(model.backbone.bottom_up.res4) == 6
    assert len(model.teacher.model.backbone.bottom_up.res4) == 23


# both detectors and both real datasets (the configs of a family differ only in KD keys,
# which the synthetic tests cover)
@pytest.mark.parametrize(
    "path",
    [
        "configs/COCO-Distillation/ssim_faster_rcnn_R50_to_R18_1x.yaml",
        "configs/PascalVOC-Distillation/rm_pfi_retinanet_R50_to_R18.yaml",
        "configs/COCO-Distillation/ssim_faster_rcnn_R101LSJ_to_R18_1x.yaml",
    ],
)
@pytest.mark.slow
def test_full_size_distillation_config_trains_a_step(path, tmp_path, monkeypatch):
    """
    The real-dataset configs as shipped (R-50 teacher, R-18 student, full widths; a model-zoo
    LazyConfig teacher) build and train on a CPU.
    """
    monkeypatch.chdir(REPO)
    cfg = _load(path)
    cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    teacher_config = resolve_teacher_config(cfg.KD.TEACHER.CONFIG)
    teacher = build_detector(load_detector_config(teacher_config, cfg.KD.TEACHER.OPTS), "cpu")
    DetectionCheckpointer(teacher, save_dir=str(tmp_path)).save("teacher")
    cfg.KD.TEACHER.WEIGHTS = str(tmp_path / "teacher.pth")
    student = build_model(cfg)
    _one_full_size_step(student, _num_classes(cfg))


def _one_full_size_step(student, num_classes):
    """One training step of a full-size distilled student on a 96x128 image: finite losses, KD
    terms, gradients."""
    student.train()
    last_class = num_classes - 1
    instances = Instances(
        (96, 128),
        gt_boxes=Boxes(torch.tensor([[10.0, 12.0, 60.0, 80.0], [70.0, 5.0, 120.0, 40.0]])),
        gt_classes=torch.tensor([0, last_class]),
    )
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8)
    with EventStorage(0):
        losses = student([{"image": image, "instances": instances, "height": 96, "width": 128}])
    kd_terms = {k for k in losses if k.startswith("loss_kd_")}
    assert kd_terms, sorted(losses)
    assert all(torch.isfinite(v) for v in losses.values()), losses
    sum(losses.values()).backward()
    assert all(
        p.grad is not None
        for n, p in student.named_parameters()
        if n.startswith("backbone.bottom_up.res5")
    )


@pytest.mark.slow
def test_full_size_lazy_distillation_config_trains_a_step(tmp_path, monkeypatch):
    """The COCO SSIM LazyConfig as shipped (model-zoo R-101 teacher config, R-18 student) builds and
    trains on a CPU."""
    from detectron2.config import LazyConfig, instantiate

    monkeypatch.chdir(REPO)
    lazy = LazyConfig.load(
        os.path.join(REPO, "configs/COCO-Distillation/ssim_faster_rcnn_R101_to_R18_1x_lazy.py")
    )
    teacher_cfg = get_kd_cfg()
    teacher_cfg.merge_from_file(lazy.model.teacher.config)
    teacher_cfg.MODEL.DEVICE = "cpu"
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(teacher_cfg), save_dir=str(tmp_path)).save("teacher")
    lazy = LazyConfig.apply_overrides(
        lazy, ["model.teacher.weights=" + str(tmp_path / "teacher.pth")]
    )
    student = instantiate(lazy.model)
    assert type(student).__name__ == "DistillGeneralizedRCNN"
    _one_full_size_step(student, lazy.model.roi_heads.num_classes)


def _differences(ours, theirs, prefix=""):
    out = []
    for key in sorted(set(ours) | set(theirs)):
        a, b = ours.get(key), theirs.get(key)
        if hasattr(a, "items") and hasattr(b, "items"):
            out += _differences(a, b, prefix + key + ".")
        elif a != b:
            out.append("{}{}: {!r} here, {!r} in the model zoo".format(prefix, key, a, b))
    return out


@pytest.mark.parametrize(
    "name",
    [
        "faster_rcnn_R_50_FPN_1x",
        "faster_rcnn_R_101_FPN_3x",
        "retinanet_R_50_FPN_1x",
        "retinanet_R_101_FPN_3x",
    ],
)
def test_coco_teacher_configs_are_the_model_zoo_ones(name):
    """kd_det's copies of Detectron2's COCO configs build the model-zoo models exactly (the
    published teachers)."""
    from detectron2 import model_zoo

    ours = _load("configs/COCO-Detection/{}.yaml".format(name))
    zoo = get_kd_cfg()
    zoo.merge_from_file(model_zoo.get_config_file("COCO-Detection/{}.yaml".format(name)))
    assert not [d for d in _differences(ours, zoo) if not d.startswith("OUTPUT_DIR")]


def _settings(obj):
    """What a distiller or loss is, beside its weights: its class and plain attributes, nested."""
    if obj is None:
        return None
    plain = {k: v for k, v in vars(obj).items() if not k.startswith("_") and k != "training"}
    nested = {
        k: _settings(v) if hasattr(v, "__dict__") and not isinstance(v, type) else v
        for k, v in plain.items()
    }
    return type(obj).__name__, nested


def _assert_same_distillation(lazy, yacs, student_shapes, teacher_shapes):
    """
    A distilled LazyConfig's teacher and distiller arguments against its yacs twin's KD: the
    distillers each builds (levels, channels, losses, weights, adapters), the teacher's
    settings and the teacher check before training.
    """
    from detectron2.config import instantiate

    from kd_det.modeling import DensePredictionDistiller, FeatureDistiller

    kd, model = yacs.KD, lazy.model
    teacher = model.teacher
    assert (
        teacher.weights,
        tuple(teacher.get("opts", ())),
        teacher.get("autocast", ""),
        teacher.get("channels_last", False),
    ) == (kd.TEACHER.WEIGHTS, tuple(kd.TEACHER.OPTS), kd.TEACHER.AUTOCAST, kd.TEACHER.CHANNELS_LAST)
    assert ("expected_classes" in teacher) == kd.TEACHER.CHECK_CLASSES
    assert dict(lazy.train.teacher_eval) == {
        "enabled": kd.TEACHER.EVAL_BEFORE_TRAIN,
        "min_ap": kd.TEACHER.MIN_AP,
    }
    feature = instantiate(model.feature_distiller)
    twin = FeatureDistiller(yacs, student_shapes, teacher_shapes)
    assert _settings(feature) == _settings(twin)
    assert {k: v.shape for k, v in feature.state_dict().items()} == {
        k: v.shape for k, v in twin.state_dict().items()
    }
    assert bool(model.get("pfi", False)) == kd.PFI.ENABLED
    if "prediction_distiller" in model:
        prediction = instantiate(model.prediction_distiller)
        twin = DensePredictionDistiller(yacs, yacs.MODEL.RETINANET.NUM_CLASSES)
        assert (prediction.num_classes, prediction.rm_weight, prediction.soft_label_weight) == (
            twin.num_classes,
            twin.rm_weight,
            twin.soft_label_weight,
        )
        assert _settings(prediction.rm_loss) == _settings(twin.rm_loss)
    else:
        assert not (kd.RM.ENABLED or kd.SOFT_LABEL.ENABLED)
    assert not (
        {"channel_stats", "roi_soft_label", "extra_teachers", "multi_teacher", "inherit_prefixes"}
        & set(model.keys())
    )
    assert not (kd.CHANNEL_STATS.ENABLED or kd.MULTI_TEACHER.CONFIGS or kd.INHERIT.PREFIXES)


# model attributes that the state dict does not show, per architecture
_TWIN_ATTRIBUTES = {
    "RetinaNet": [
        "num_classes",
        "smooth_l1_beta",
        "focal_loss_alpha",
        "focal_loss_gamma",
        "test_score_thresh",
        "test_topk_candidates",
        "test_nms_thresh",
        "max_detections_per_image",
        "head_in_features",
        "box_reg_loss_type",
        "box2box_transform.weights",
        "anchor_matcher.thresholds",
    ],
    "GeneralizedRCNN": [
        "roi_heads.num_classes",
        "roi_heads.batch_size_per_image",
        "roi_heads.positive_fraction",
        "roi_heads.proposal_append_gt",
        "roi_heads.mask_on",
        "roi_heads.box_in_features",
        "roi_heads.proposal_matcher.thresholds",
        "roi_heads.box_predictor.test_score_thresh",
        "roi_heads.box_predictor.test_nms_thresh",
        "roi_heads.box_predictor.test_topk_per_image",
        "roi_heads.box_predictor.smooth_l1_beta",
        "roi_heads.box_predictor.box2box_transform.weights",
        "proposal_generator.pre_nms_topk",
        "proposal_generator.post_nms_topk",
        "proposal_generator.nms_thresh",
        "proposal_generator.batch_size_per_image",
        "proposal_generator.positive_fraction",
        "proposal_generator.smooth_l1_beta",
        "proposal_generator.anchor_matcher.thresholds",
        "proposal_generator.in_features",
    ],
}


def _dotted(obj, name):
    for part in name.split("."):
        obj = getattr(obj, part)
    return list(obj) if isinstance(obj, tuple) else obj


@pytest.mark.numeric
@pytest.mark.parametrize(
    "name", ["rm_pfi_retinanet_R101_to_R18_1x", "ssim_faster_rcnn_R101_to_R18_1x"]
)
def test_coco_lazy_config_is_its_yaml_twin(name, monkeypatch):
    """
    A COCO LazyConfig (on Detectron2's model-zoo LazyConfigs) and its yaml twin give the
    same student, distillation settings, data, solver and schedule.
    """
    from detectron2.config import LazyConfig, instantiate

    from kd_det.modeling.lazy_student import lazy_student_model

    monkeypatch.chdir(REPO)
    lazy = LazyConfig.load(os.path.join(REPO, "configs/COCO-Distillation/{}_lazy.py".format(name)))
    yacs = _load("configs/COCO-Distillation/{}.yaml".format(name))
    # the same teacher: Detectron2's own config of the published model and kd_det's copy of it
    teacher_config = load_detector_config(resolve_teacher_config(lazy.model.teacher.config))
    twin_teacher = load_detector_config(resolve_teacher_config(yacs.KD.TEACHER.CONFIG))
    assert teacher_config.MODEL == twin_teacher.MODEL

    torch.manual_seed(0)
    student = instantiate(lazy_student_model(lazy.model))
    # the same distillation: the LazyConfig's explicit arguments are what yacs builds from KD
    _assert_same_distillation(
        lazy, yacs, student.backbone.output_shape(), build_backbone(teacher_config).output_shape()
    )
    yacs.MODEL.META_ARCHITECTURE = yacs.MODEL.META_ARCHITECTURE.replace("Distill", "")
    yacs.MODEL.DEVICE = "cpu"
    twin = build_model(yacs)
    assert type(student) is type(twin)
    assert {k: v.shape for k, v in student.state_dict().items()} == {
        k: v.shape for k, v in twin.state_dict().items()
    }
    for attr in _TWIN_ATTRIBUTES[type(twin).__name__] + ["input_format"]:
        assert _dotted(student, attr) == _dotted(twin, attr), attr
    assert torch.equal(student.pixel_mean, twin.pixel_mean) and torch.equal(
        student.pixel_std, twin.pixel_std
    )
    anchors = [
        m
        for m in (
            student,
            student.proposal_generator if hasattr(student, "proposal_generator") else None,
        )
        if hasattr(m, "anchor_generator")
    ][0].anchor_generator
    twin_anchors = [
        m
        for m in (twin, getattr(twin, "proposal_generator", None))
        if hasattr(m, "anchor_generator")
    ][0].anchor_generator
    # the sizes are written differently (decimal literals vs x * 2 ** (k / 3), one float64 ulp
    # apart at most); Detectron2 computes cell anchors in float64 and rounds them to float32 once,
    # so the twins' anchors differ by at most one rounding each: 2 u |a|
    for a, b in zip(anchors.cell_anchors, twin_anchors.cell_anchors):
        assert_within(a, b, 2 * U32 * b.double().abs(), "cell anchors")
    assert [c.__class__ for c in student.backbone.bottom_up.modules()] == [
        c.__class__ for c in twin.backbone.bottom_up.modules()
    ]  # BasicBlocks, FrozenBN
    frozen = {n for n, p in student.named_parameters() if not p.requires_grad}
    assert (
        frozen == {n for n, p in twin.named_parameters() if not p.requires_grad} and frozen
    )  # FREEZE_AT 2

    # data, solver, schedule
    train_resize = lazy.dataloader.train.mapper.augmentations[0]
    assert tuple(train_resize.short_edge_length) == tuple(yacs.INPUT.MIN_SIZE_TRAIN)
    assert train_resize.max_size == yacs.INPUT.MAX_SIZE_TRAIN
    assert train_resize.sample_style == yacs.INPUT.MIN_SIZE_TRAIN_SAMPLING == "choice"
    test_resize = lazy.dataloader.test.mapper.augmentations[0]
    assert (test_resize.short_edge_length, test_resize.max_size) == (
        yacs.INPUT.MIN_SIZE_TEST,
        yacs.INPUT.MAX_SIZE_TEST,
    )
    assert lazy.dataloader.test.mapper.image_format == yacs.INPUT.FORMAT == "RGB"
    assert (lazy.dataloader.train.dataset.names,) == tuple(yacs.DATASETS.TRAIN)
    assert (lazy.dataloader.test.dataset.names,) == tuple(yacs.DATASETS.TEST)
    assert lazy.dataloader.train.total_batch_size == yacs.SOLVER.IMS_PER_BATCH
    assert (lazy.optimizer.lr, lazy.optimizer.momentum, lazy.optimizer.weight_decay) == (
        yacs.SOLVER.BASE_LR,
        yacs.SOLVER.MOMENTUM,
        yacs.SOLVER.WEIGHT_DECAY,
    )
    assert lazy.train.max_iter == yacs.SOLVER.MAX_ITER
    schedule = instantiate(lazy.lr_multiplier)
    for it in (0, 500, 1000, 59999, 60000, 79999, 80000, 89999):
        expected = yacs.SOLVER.GAMMA ** sum(it >= s for s in yacs.SOLVER.STEPS)
        if it < yacs.SOLVER.WARMUP_ITERS:
            alpha = it / yacs.SOLVER.WARMUP_ITERS
            expected *= yacs.SOLVER.WARMUP_FACTOR * (1 - alpha) + alpha
        # Python floats (the same on every machine); the two schedules order their few operations
        # differently: at most 16 float64 roundings on either side
        assert schedule(it / lazy.train.max_iter) == pytest.approx(expected, rel=32 * 2.0**-53), it
    from kd_det.evaluation import has_cpp_ops

    assert (
        lazy.dataloader.evaluator.use_fast_impl == has_cpp_ops()
    )  # pure-Python Detectron2: pycocotools

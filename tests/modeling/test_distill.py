"""Distillation meta-architectures: teacher loading, freezing, checks and errors."""

import os
import pickle
import re

import pytest
import torch
from conftest import config_path, distill_cfg, one_step, save_random_teacher
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model
from detectron2.utils.file_io import PathManager
from tolerances import assert_within, gamma

from kd_det.modeling import DistillGeneralizedRCNN, DistillRetinaNet

RCNN_SSIM = "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml"
RETINA_SSIM = "synthetic/distill/ssim_retinanet_R50_to_R18.yaml"


@pytest.mark.parametrize("kind", ["rcnn", "retina"])
def test_teacher_frozen_and_absent_from_student(
    kind, tiny_data_root, tmp_path, rcnn_teacher, retina_teacher
):
    config, teacher_cfg, weights, arch = {
        "rcnn": (
            RCNN_SSIM,
            "synthetic/faster_rcnn_R_50_FPN.yaml",
            rcnn_teacher,
            DistillGeneralizedRCNN,
        ),
        "retina": (
            RETINA_SSIM,
            "synthetic/retinanet_R_50_FPN.yaml",
            retina_teacher,
            DistillRetinaNet,
        ),
    }[kind]
    cfg = distill_cfg(config, teacher_cfg, weights, tmp_path)
    model = build_model(cfg)
    assert isinstance(model, arch)
    teacher_before = {k: v.clone() for k, v in model.teacher.model.state_dict().items()}
    saved = torch.load(weights, map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(saved[k], v) for k, v in teacher_before.items())  # really loaded

    losses, optimizer = one_step(model, cfg)
    assert "loss_kd_ssim" in losses and torch.isfinite(losses["loss_kd_ssim"])
    for k, v in model.teacher.model.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k  # bit-identical, BN statistics included
    assert not model.teacher.model.training
    assert all(p.grad is None and not p.requires_grad for p in model.teacher.model.parameters())
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert not optimized & {id(p) for p in model.teacher.model.parameters()}
    # adapters (student 64 channels -> teacher 128) are trained with the student
    assert set(model.kd_feature.adapters.keys()) == set(model.kd_feature.levels)
    assert all(p.grad is not None for p in model.kd_feature.adapters.parameters())

    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("student")
    keys = torch.load(os.path.join(tmp_path, "student.pth"), weights_only=False)["model"].keys()
    assert not [k for k in keys if k.startswith("teacher")]
    assert len(keys) == len(model.state_dict())


def test_inference_is_the_student_alone(tiny_data_root, tmp_path, rcnn_teacher):
    cfg = distill_cfg(RCNN_SSIM, "synthetic/faster_rcnn_R_50_FPN.yaml", rcnn_teacher, tmp_path)
    model = build_model(cfg).eval()
    called = []
    model.teacher.model.register_forward_hook(lambda *a: called.append(1))
    model.teacher.model.backbone.register_forward_hook(lambda *a: called.append(1))
    with torch.no_grad():
        out = model([{"image": torch.zeros(3, 64, 64), "height": 64, "width": 64}])
    assert "instances" in out[0] and not called


def test_missing_teacher_weights(tmp_path, tiny_data_root):
    cfg = distill_cfg(
        RCNN_SSIM, "synthetic/faster_rcnn_R_50_FPN.yaml", str(tmp_path / "nope.pth"), tmp_path
    )
    with pytest.raises(FileNotFoundError, match="nope.pth.*Train the teacher"):
        build_model(cfg)
    cfg = distill_cfg(RCNN_SSIM, "synthetic/faster_rcnn_R_50_FPN.yaml", "", tmp_path)
    with pytest.raises(ValueError, match="KD.TEACHER.WEIGHTS is empty"):
        build_model(cfg)


def test_teacher_weights_from_a_url(tmp_path, tiny_data_root, rcnn_teacher, monkeypatch):
    """detectron2:// (model zoo) and https:// teacher weights go through iopath's cache; offline, a
    clear error."""
    monkeypatch.setenv("FVCORE_CACHE", str(tmp_path / "cache"))
    # what a download of detectron2://kd_det_test/model_final.pkl would have left in the cache: a
    # file
    # in the model zoo's format (a pickle of numpy arrays)
    cached = tmp_path / "cache" / "detectron2" / "kd_det_test" / "model_final.pkl"
    cached.parent.mkdir(parents=True)
    expected = torch.load(rcnn_teacher, weights_only=False)["model"]
    with open(cached, "wb") as f:
        pickle.dump(
            {
                "model": {k: v.numpy() for k, v in expected.items()},
                "__author__": "Detectron2 Model Zoo",
            },
            f,
        )
    cfg = distill_cfg(
        RCNN_SSIM,
        "synthetic/faster_rcnn_R_50_FPN.yaml",
        "detectron2://kd_det_test/model_final.pkl",
        tmp_path,
    )
    model = build_model(cfg)
    assert torch.equal(
        model.teacher.model.state_dict()["backbone.fpn_output2.weight"],
        expected["backbone.fpn_output2.weight"],
    )

    def offline(path, **kwargs):
        raise OSError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(PathManager, "get_local_path", offline)
    cfg = distill_cfg(
        RCNN_SSIM,
        "synthetic/faster_rcnn_R_50_FPN.yaml",
        "https://example.com/teachers/model_final.pth",
        tmp_path,
    )
    with pytest.raises(
        FileNotFoundError,
        match=r"'https://example.com/teachers/model_final.pth' could not be "
        r"fetched \(OSError: .*name resolution.*set KD.TEACHER.WEIGHTS to its "
        r"local path",
    ):
        build_model(cfg)


def test_unreadable_teacher_weights(tmp_path, tiny_data_root):
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    cfg = distill_cfg(RCNN_SSIM, "synthetic/faster_rcnn_R_50_FPN.yaml", str(bad), tmp_path)
    with pytest.raises(ValueError, match="unreadable"):
        build_model(cfg)


def test_teacher_weights_that_do_not_fit(tmp_path, tiny_data_root):
    # R-18 weights given to an R-50 teacher config
    weights = save_random_teacher("synthetic/faster_rcnn_R_18_FPN.yaml", str(tmp_path / "r18.pth"))
    cfg = distill_cfg(RCNN_SSIM, "synthetic/faster_rcnn_R_50_FPN.yaml", weights, tmp_path)
    with pytest.raises(
        ValueError, match="do not fit the teacher config.*(missing keys|shape mismatch)"
    ):
        build_model(cfg)


def test_teacher_config_errors(tmp_path, tiny_data_root, rcnn_teacher, monkeypatch):
    cfg = distill_cfg(RCNN_SSIM, "synthetic/faster_rcnn_R_50_FPN.yaml", rcnn_teacher, tmp_path)
    cfg.defrost()
    cfg.KD.TEACHER.CONFIG = str(tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        build_model(cfg)
    # the shipped configs name their teacher relative to the checkout: from elsewhere, the
    # message names the working directory that relative paths start from
    cfg.KD.TEACHER.CONFIG = "configs/synthetic/faster_rcnn_R_50_FPN.yaml"
    monkeypatch.chdir(tmp_path)
    with pytest.raises(
        FileNotFoundError,
        match="relative to the working directory {}".format(re.escape(str(tmp_path))),
    ):
        build_model(cfg)
    # a name in Detectron2's model zoo, where no such file exists; a file of that name wins
    from detectron2 import model_zoo

    from kd_det.modeling.teacher import resolve_teacher_config

    name = "COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"
    assert resolve_teacher_config(name) == model_zoo.get_config_file(name)
    (tmp_path / "COCO-Detection").mkdir()
    (tmp_path / name).write_text("MODEL: {}\n")
    assert resolve_teacher_config(name) == name
    with pytest.raises(FileNotFoundError, match="is not a config of Detectron2's model zoo"):
        resolve_teacher_config("COCO-Detection/faster_rcnn_R_7_FPN.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("MODEL:\n  NOT_A_KEY: 1\n")
    cfg.KD.TEACHER.CONFIG = str(broken)
    with pytest.raises(ValueError, match="does not build.*NOT_A_KEY"):
        build_model(cfg)


RCNN_TEACHER = "synthetic/faster_rcnn_R_50_FPN.yaml"
RCNN_TEACHER_LAZY = "synthetic/faster_rcnn_R_50_FPN_lazy.py"


def test_lazy_config_teacher_matches_yaml_teacher(tmp_path, tiny_data_root, rcnn_teacher):
    """
    Detectron2's newer configs are LazyConfigs (.py): the synthetic teacher written as
    one takes the weights trained from the .yaml, computes the same features and
    detections, is evaluated the same way, and teaches a student.
    """
    # score threshold 0: a random teacher's detections are all low-scored; also checks the overrides
    # apply
    yaml_cfg = distill_cfg(
        RCNN_SSIM,
        RCNN_TEACHER,
        rcnn_teacher,
        tmp_path / "yaml",
        ["KD.TEACHER.OPTS", ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]],
    )
    lazy_cfg = distill_cfg(
        RCNN_SSIM,
        RCNN_TEACHER_LAZY,
        rcnn_teacher,
        tmp_path / "lazy",
        ["KD.TEACHER.OPTS", ["model.roi_heads.box_predictor.test_score_thresh=0.0"]],
    )
    from_yaml, from_lazy = build_model(yaml_cfg).teacher, build_model(lazy_cfg).teacher
    ty, tl = from_yaml.settings, from_lazy.settings
    assert tl.meta_architecture == "GeneralizedRCNN" and from_lazy.num_classes == 5
    assert (from_lazy.input_format, tl.min_size_test, tl.max_size_test) == ("BGR", 128, 256)
    assert from_lazy.test_size == from_yaml.test_size == (128, 256)
    assert tl.train_datasets == ty.train_datasets == ("kd_synthetic_train",)
    assert tl == ty  # the twins' settings are equal, field by field
    assert from_lazy.model.roi_heads.box_predictor.test_score_thresh == 0.0

    state_yaml, state_lazy = from_yaml.model.state_dict(), from_lazy.model.state_dict()
    assert state_yaml.keys() == state_lazy.keys()
    assert all(torch.equal(state_yaml[k], state_lazy[k]) for k in state_yaml)
    torch.manual_seed(0)
    image = torch.randint(0, 256, (3, 96, 128), dtype=torch.uint8).float()
    with torch.no_grad():
        det_yaml = from_yaml.model([{"image": image}])[0]["instances"]
        det_lazy = from_lazy.model([{"image": image}])[0]["instances"]
    # bitwise: equal weights and the same modules run the same kernels on the same input
    assert len(det_yaml) == len(det_lazy) > 0
    assert torch.equal(det_yaml.pred_boxes.tensor, det_lazy.pred_boxes.tensor)
    assert torch.equal(det_yaml.scores, det_lazy.scores)

    from kd_det.engine.hooks import evaluate_teacher

    ap_yaml = evaluate_teacher(yaml_cfg, from_yaml, str(tmp_path / "eval_yaml"))
    ap_lazy = evaluate_teacher(lazy_cfg, from_lazy, str(tmp_path / "eval_lazy"))
    name = yaml_cfg.DATASETS.TEST[0]
    assert "AP" in ap_lazy[name]["bbox"]
    # the same detections give the same AP; approx only for pycocotools' NaN of a class without
    # detections
    assert ap_lazy[name]["bbox"]["AP"] == pytest.approx(ap_yaml[name]["bbox"]["AP"], nan_ok=True)

    losses, _ = one_step(build_model(lazy_cfg), lazy_cfg)
    assert torch.isfinite(losses["loss_kd_ssim"])


def test_lazy_config_teacher_errors(tmp_path, tiny_data_root, rcnn_teacher):
    cfg = distill_cfg(RCNN_SSIM, RCNN_TEACHER_LAZY, rcnn_teacher, tmp_path)
    cfg.defrost()
    cfg.KD.TEACHER.OPTS = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]
    with pytest.raises(ValueError, match="takes overrides as 'key=value' strings"):
        build_model(cfg)
    cfg.KD.TEACHER.OPTS = ["model.roi_heads.not_an_argument=1"]
    with pytest.raises(ValueError, match="does not build.*not_an_argument"):
        build_model(cfg)
    cfg.KD.TEACHER.OPTS = []
    cfg.KD.TEACHER.WEIGHTS = ""
    with pytest.raises(
        ValueError, match="KD.TEACHER.WEIGHTS is empty.*tools/lazyconfig_train_net.py --config-file"
    ):
        build_model(cfg)
    cfg.KD.TEACHER.WEIGHTS = rcnn_teacher
    broken_configs = [
        # a new_baselines config copied out of its folder
        (
            "mask_rcnn_R_50_FPN_100ep_LSJ.py",
            "from ..common.models.mask_rcnn_fpn import model\n",
            "teacher LazyConfig .*mask_rcnn_R_50_FPN_100ep_LSJ.py.* does not load",
        ),
        ("no_model.py", "dataloader = dict()\n", "has no `model`"),
        (
            "not_detector.py",
            "import torch\nfrom detectron2.config import LazyCall as L\n"
            "model = L(torch.nn.Linear)(in_features=2, out_features=2)\n",
            "builds a Linear, not a Detectron2 detector",
        ),
    ]
    for name, text, error in broken_configs:
        (tmp_path / name).write_text(text)
        cfg.KD.TEACHER.CONFIG = str(tmp_path / name)
        with pytest.raises(ValueError, match=error):
            build_model(cfg)
    # the class count comes from the built model
    three = save_random_teacher(
        RCNN_TEACHER, str(tmp_path / "t3.pth"), ["MODEL.ROI_HEADS.NUM_CLASSES", 3]
    )
    cfg.KD.TEACHER.CONFIG = config_path(RCNN_TEACHER_LAZY)
    cfg.KD.TEACHER.WEIGHTS = three
    cfg.KD.TEACHER.OPTS = [
        "model.roi_heads.num_classes=3",
        "model.roi_heads.box_predictor.num_classes=3",
    ]
    with pytest.raises(ValueError, match="teacher has 3 classes.*student has 5"):
        build_model(cfg)


def test_lazy_config_settings_of_a_retinanet(tmp_path, tiny_data_root):
    """A LazyConfig RetinaNet's class count; no test size where the config has no test loader."""
    from detectron2 import model_zoo
    from omegaconf import OmegaConf

    from kd_det.config.detector import detector_settings, load_detector_config

    zoo_file = model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.py")
    lazy = load_detector_config(zoo_file)
    settings = detector_settings(OmegaConf.create({"model": lazy.model}))
    assert settings.meta_architecture == "RetinaNet" and settings.num_classes == 80
    assert settings.input_format == "BGR"
    assert (settings.min_size_test, settings.max_size_test) == (None, None)
    assert settings.train_datasets == settings.test_datasets == ()
    assert settings.pixel_mean == pytest.approx([103.530, 116.280, 123.675])


def test_class_count_mismatch(tmp_path, tiny_data_root):
    opts = ["MODEL.ROI_HEADS.NUM_CLASSES", 3]
    weights = save_random_teacher(
        "synthetic/faster_rcnn_R_50_FPN.yaml", str(tmp_path / "t3.pth"), opts
    )
    cfg = distill_cfg(
        RCNN_SSIM,
        "synthetic/faster_rcnn_R_50_FPN.yaml",
        weights,
        tmp_path,
        ["KD.TEACHER.OPTS", opts],
    )
    with pytest.raises(ValueError, match="teacher has 3 classes.*student has 5"):
        build_model(cfg)


@pytest.fixture
def teacher_dataset(tiny_data_root):
    """Registers a training set for the teacher with the given class names; unregisters it
    afterwards."""
    from detectron2.data import DatasetCatalog, MetadataCatalog

    names = []

    def register(name, classes):
        DatasetCatalog.register(name, lambda: [])
        MetadataCatalog.get(name).set(thing_classes=list(classes))
        names.append(name)
        return name

    yield register
    for name in names:
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)


def test_teacher_trained_on_other_classes(tmp_path, rcnn_teacher, teacher_dataset):
    from kd_det.data.synthetic import CLASS_NAMES

    reordered = teacher_dataset("kd_test_reordered", list(CLASS_NAMES[1:]) + [CLASS_NAMES[0]])
    other = teacher_dataset("kd_test_other", ["cat", "dog", "car", "bus", "cow"])
    teacher = "synthetic/faster_rcnn_R_50_FPN.yaml"
    cfg = distill_cfg(
        RCNN_SSIM,
        teacher,
        rcnn_teacher,
        tmp_path,
        ["KD.TEACHER.OPTS", ["DATASETS.TRAIN", (reordered,)]],
    )
    msg = (
        "same classes in another order "
        "\\(class 0 is {!r} for the teacher, {!r} for the student\\)".format(
            CLASS_NAMES[1], CLASS_NAMES[0]
        )
    )
    with pytest.raises(
        ValueError, match="trained on DATASETS.TRAIN=\\('kd_test_reordered',\\).*" + msg
    ):
        build_model(cfg)
    cfg = distill_cfg(
        RCNN_SSIM,
        teacher,
        rcnn_teacher,
        tmp_path,
        ["KD.TEACHER.OPTS", ["DATASETS.TRAIN", (other,)]],
    )
    with pytest.raises(ValueError, match="other classes.*'bus', 'car'.*CHECK_CLASSES False"):
        build_model(cfg)
    # the user's word that they correspond; a teacher set not registered here is not checked
    cfg = distill_cfg(
        RCNN_SSIM,
        teacher,
        rcnn_teacher,
        tmp_path,
        ["KD.TEACHER.OPTS", ["DATASETS.TRAIN", (other,)], "KD.TEACHER.CHECK_CLASSES", False],
    )
    build_model(cfg)
    cfg = distill_cfg(
        RCNN_SSIM,
        teacher,
        rcnn_teacher,
        tmp_path,
        ["KD.TEACHER.OPTS", ["DATASETS.TRAIN", ("not_registered_here",)]],
    )
    build_model(cfg)


def test_mask_rcnn_teacher_for_a_faster_rcnn_student(tiny_data_root, tmp_path):
    """Detectron2's strongest R-CNN teachers are Mask R-CNNs: their FPN features and box head serve
    as well."""
    teacher = "synthetic/faster_rcnn_R_50_FPN.yaml"
    (tmp_path / "mask_teacher").mkdir()
    weights = save_random_teacher(
        teacher, str(tmp_path / "mask_teacher" / "model_final.pth"), ["MODEL.MASK_ON", True]
    )
    cfg = distill_cfg(
        RCNN_SSIM,
        teacher,
        weights,
        tmp_path,
        ["KD.TEACHER.OPTS", ["MODEL.MASK_ON", True], "KD.SOFT_LABEL.ENABLED", True],
    )
    model = build_model(cfg)
    assert hasattr(model.teacher.model.roi_heads, "mask_head") and not cfg.MODEL.MASK_ON
    losses, _ = one_step(model, cfg)
    assert {"loss_kd_ssim", "loss_kd_soft"} <= losses.keys() and "loss_mask" not in losses
    assert all(torch.isfinite(v) for v in losses.values())


RCNN_SHARED = ["backbone.fpn_output", "proposal_generator", "roi_heads"]


@pytest.mark.parametrize("kind", ["rcnn", "retina"])
def test_student_inherits_teacher_weights(kind, tmp_path, rcnn_teacher, retina_teacher):
    """KD.INHERIT.PREFIXES: the student starts from the teacher's FPN outputs and heads, where
    shapes agree."""
    config, teacher_config, weights, prefixes = {
        "rcnn": (RCNN_SSIM, "synthetic/faster_rcnn_R_50_FPN.yaml", rcnn_teacher, RCNN_SHARED),
        "retina": (
            RETINA_SSIM,
            "synthetic/retinanet_R_50_FPN.yaml",
            retina_teacher,
            ["backbone.fpn_output", "head"],
        ),
    }[kind]
    same_width = [
        "MODEL.FPN.OUT_CHANNELS",
        128,
    ]  # the synthetic R-18 students are narrower than their teachers
    model = build_model(
        distill_cfg(
            config,
            teacher_config,
            weights,
            tmp_path,
            same_width + ["KD.INHERIT.PREFIXES", prefixes],
        )
    )
    teacher = model.teacher.model.state_dict()
    student = model.state_dict()
    inherited = [k for k in teacher if k.startswith(tuple(prefixes))]
    assert len(inherited) > 10
    for k in inherited:
        assert torch.equal(student[k], teacher[k]), k
    # the rest keeps its own initialisation, and the weights are copies, not the teacher's tensors
    assert not torch.equal(
        student["backbone.fpn_lateral5.weight"][:, :8],
        teacher["backbone.fpn_lateral5.weight"][:, :8],
    )
    assert student[inherited[0]].data_ptr() != teacher[inherited[0]].data_ptr()
    # without it, nothing is copied
    model = build_model(distill_cfg(config, teacher_config, weights, tmp_path, same_width))
    fresh = model.state_dict()
    assert all(
        not torch.equal(fresh[k], teacher[k])
        for k in inherited
        if k.endswith(".weight") and "norm" not in k
    )


def test_inherit_errors(tmp_path, rcnn_teacher):
    teacher_config = "synthetic/faster_rcnn_R_50_FPN.yaml"
    # the student's FPN is 64 wide, the teacher's 128
    cfg = distill_cfg(
        RCNN_SSIM, teacher_config, rcnn_teacher, tmp_path, ["KD.INHERIT.PREFIXES", RCNN_SHARED]
    )
    with pytest.raises(
        ValueError,
        match=r"cannot take: backbone.fpn_output2.weight \(teacher \(128, 128, 3, 3\), "
        r"student \(64, 64, 3, 3\)\).*Name only modules",
    ):
        build_model(cfg)
    cfg = distill_cfg(
        RCNN_SSIM,
        teacher_config,
        rcnn_teacher,
        tmp_path,
        ["MODEL.FPN.OUT_CHANNELS", 128, "KD.INHERIT.PREFIXES", ["roi_heeds"]],
    )
    with pytest.raises(
        ValueError,
        match="'roi_heeds' matches no teacher weight; the teacher has .*roi_heads.box_head",
    ):
        build_model(cfg)
    cfg = distill_cfg(
        RCNN_SSIM,
        teacher_config,
        rcnn_teacher,
        tmp_path,
        ["MODEL.FPN.OUT_CHANNELS", 128, "KD.INHERIT.PREFIXES", ["backbone"]],
    )
    with pytest.raises(
        ValueError,
        match=r"fpn_lateral2.weight \(teacher \(128, 256, 1, 1\), student \(128, 64, 1, 1\)\)"
        r".*res2.0.shortcut.weight \(not in the student\).* and [0-9]+ more",
    ):
        build_model(cfg)


def test_channel_mismatch_without_adapter(tmp_path, tiny_data_root, rcnn_teacher):
    cfg = distill_cfg(
        RCNN_SSIM,
        "synthetic/faster_rcnn_R_50_FPN.yaml",
        rcnn_teacher,
        tmp_path,
        ["KD.FEATURE.ADAPTER", "none"],
    )
    with pytest.raises(ValueError, match="64 channels, teacher 128.*ADAPTER"):
        build_model(cfg)


def test_unmatched_fpn_levels(tmp_path, tiny_data_root, rcnn_teacher):
    cfg = distill_cfg(
        RCNN_SSIM,
        "synthetic/faster_rcnn_R_50_FPN.yaml",
        rcnn_teacher,
        tmp_path,
        ["KD.FEATURE.IN_FEATURES", ["p2", "p7"]],
    )
    with pytest.raises(ValueError, match="'p7' is not output by both"):
        build_model(cfg)


def test_unknown_loss_name(tmp_path, tiny_data_root, rcnn_teacher):
    cfg = distill_cfg(
        RCNN_SSIM,
        "synthetic/faster_rcnn_R_50_FPN.yaml",
        rcnn_teacher,
        tmp_path,
        ["KD.FEATURE.LOSS", "ssim"],
    )
    with pytest.raises(KeyError, match="unknown KD.FEATURE.LOSS 'ssim'"):
        build_model(cfg)


@pytest.mark.numeric
def test_rgb_student_bgr_teacher_input(tmp_path, tiny_data_root, rcnn_teacher):
    # a student reading RGB with other normalisation: the teacher still gets BGR, its own
    # normalisation
    cfg = distill_cfg(
        RCNN_SSIM,
        "synthetic/faster_rcnn_R_50_FPN.yaml",
        rcnn_teacher,
        tmp_path,
        ["INPUT.FORMAT", "RGB", "MODEL.PIXEL_MEAN", [123.675, 116.28, 103.53]],
    )
    model = build_model(cfg)
    image = torch.rand(3, 64, 64) * 255
    inputs = [{"image": image}]
    images = model.preprocess_image(inputs)
    timages = model.teacher_images(inputs, images)
    tm = model.teacher.model
    expected = (image.double().flip(0) - tm.pixel_mean.double()) / tm.pixel_std.double()
    # (x - mean) / std in float32: at most 3 roundings (the subtraction, a reciprocal, a product)
    assert_within(timages.tensor[0], expected, gamma(3) * expected.abs(), "teacher input")


def test_teacher_autocast_and_channels_last(tiny_data_root, tmp_path, retina_teacher):
    base = distill_cfg(RETINA_SSIM, "synthetic/retinanet_R_50_FPN.yaml", retina_teacher, tmp_path)
    fast = distill_cfg(
        RETINA_SSIM,
        "synthetic/retinanet_R_50_FPN.yaml",
        retina_teacher,
        tmp_path,
        [
            "KD.TEACHER.AUTOCAST",
            "bf16",
            "KD.TEACHER.CHANNELS_LAST",
            True,
            "KD.RM.ENABLED",
            True,
            "KD.PFI.ENABLED",
            True,
        ],
    )
    ref, model = build_model(base), build_model(fast)
    from detectron2.structures import ImageList

    images = ImageList.from_tensors([torch.randn(3, 64, 64)], 32)
    want = ref.teacher.backbone_features(images)
    got = model.teacher.backbone_features(images)
    for k in want:
        assert got[k].dtype == torch.float32
        rel = (got[k] - want[k]).norm() / want[k].norm()
        assert rel < 0.05, (k, rel.item())  # bf16 rounding, not a different network
    assert model.teacher.dense_class_logits(got)[0].dtype == torch.float32
    losses, _ = one_step(model, fast)
    assert all(torch.isfinite(v) for v in losses.values()) and "loss_kd_rm" in losses
    with pytest.raises(ValueError, match="KD.TEACHER.AUTOCAST"):
        build_model(
            distill_cfg(
                RETINA_SSIM,
                "synthetic/retinanet_R_50_FPN.yaml",
                retina_teacher,
                tmp_path,
                ["KD.TEACHER.AUTOCAST", "int8"],
            )
        )

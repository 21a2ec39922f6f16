"""
The teacher package and what it stands on: build_teacher from explicit arguments, the
detector settings of either config kind (kd_det.config.detector), the class check
(kd_det.data.classes).
"""

import pytest
import torch
from conftest import config_path, tiny_cfg

from kd_det.config.detector import (
    DetectorSettings,
    build_detector,
    detector_settings,
    load_detector_config,
)
from kd_det.data.classes import ClassNames, check_same_classes, registered_thing_classes
from kd_det.data.synthetic import CLASS_NAMES
from kd_det.modeling import FrozenTeacher, build_teacher

RCNN_TEACHER = "synthetic/faster_rcnn_R_18_FPN.yaml"
RCNN_R50 = "synthetic/faster_rcnn_R_50_FPN.yaml"
RCNN_R50_LAZY = "synthetic/faster_rcnn_R_50_FPN_lazy.py"


@pytest.fixture
def saved_state_dict(tmp_path):
    """A randomly initialised R-18 teacher's plain state dict (torch.save, no Detectron2 format)."""
    torch.manual_seed(0)
    model = build_detector(load_detector_config(config_path(RCNN_TEACHER)), "cpu")
    path = str(tmp_path / "teacher_state.pth")
    torch.save(model.state_dict(), path)
    return path, model.state_dict()


def test_build_teacher_from_explicit_arguments(saved_state_dict, tiny_data_root):
    path, state = saved_state_dict
    teacher = build_teacher(
        config_path(RCNN_TEACHER),
        path,
        autocast="",
        channels_last=False,
        expected_classes=list(CLASS_NAMES),
        device="cpu",
    )
    assert isinstance(teacher, FrozenTeacher) and not hasattr(teacher, "cfg")
    loaded = teacher.model.state_dict()
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    assert (teacher.meta_architecture, teacher.num_classes, teacher.input_format) == (
        "GeneralizedRCNN",
        5,
        "BGR",
    )
    assert teacher.settings == detector_settings(load_detector_config(config_path(RCNN_TEACHER)))
    assert teacher.test_size == (teacher.settings.min_size_test, teacher.settings.max_size_test)
    assert (teacher.weights, teacher.config) == (path, config_path(RCNN_TEACHER))

    # overrides apply (yacs KEY VALUE pairs); the class count follows them
    opts = ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0]
    thresh = build_teacher(config_path(RCNN_TEACHER), path, opts=opts)
    assert thresh.model.roi_heads.box_predictor.test_score_thresh == 0.0
    with pytest.raises(ValueError, match="do not fit the teacher config.*shape mismatch"):
        build_teacher(config_path(RCNN_TEACHER), path, opts=["MODEL.ROI_HEADS.NUM_CLASSES", 3])
    with pytest.raises(ValueError, match="KD.TEACHER.AUTOCAST must be one of"):
        build_teacher(config_path(RCNN_TEACHER), path, autocast="fp8")


def test_build_teacher_checks_the_expected_classes(saved_state_dict, tiny_data_root):
    path, _ = saved_state_dict
    reordered = list(CLASS_NAMES[1:]) + [CLASS_NAMES[0]]
    with pytest.raises(
        ValueError,
        match=r"and the student on classes .*same classes in another "
        r"order \(class 0 is {!r} for the teacher".format(CLASS_NAMES[0]),
    ):
        build_teacher(config_path(RCNN_TEACHER), path, expected_classes=reordered)
    build_teacher(config_path(RCNN_TEACHER), path, expected_classes=None)  # not checked


def test_build_teacher_from_a_student_config_is_the_explicit_call(
    saved_state_dict, tiny_data_root, tmp_path
):
    """@configurable: build_teacher(student_cfg) reads KD.TEACHER, the student's device, classes."""
    path, _ = saved_state_dict
    cfg = tiny_cfg(
        "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
        tmp_path,
        [
            "KD.TEACHER.CONFIG",
            config_path(RCNN_TEACHER),
            "KD.TEACHER.WEIGHTS",
            path,
            "KD.TEACHER.OPTS",
            ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0],
        ],
    )
    from_cfg = build_teacher(cfg)
    explicit = build_teacher(
        config_path(RCNN_TEACHER),
        path,
        opts=("MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0),
        expected_classes=list(CLASS_NAMES),
        device=cfg.MODEL.DEVICE,
    )
    assert from_cfg.settings == explicit.settings and from_cfg.weights == explicit.weights
    assert from_cfg.model.roi_heads.box_predictor.test_score_thresh == 0.0
    a, b = from_cfg.model.state_dict(), explicit.model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    # the config's other teacher (several teachers): config and weights replace KD.TEACHER's
    other = build_teacher(cfg, config_path(RCNN_TEACHER), path)
    assert other.settings == explicit.settings


@pytest.mark.parametrize(
    "yacs, lazy",
    [
        (RCNN_R50, RCNN_R50_LAZY),
        (
            "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
            "synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py",
        ),
    ],
)
def test_detector_settings_of_yacs_and_lazy_twins_are_equal(yacs, lazy):
    """A teacher and a distilled student, each a yacs config and a LazyConfig: equal settings."""
    of_yacs = detector_settings(load_detector_config(config_path(yacs)))
    of_lazy = detector_settings(load_detector_config(config_path(lazy)))
    assert isinstance(of_yacs, DetectorSettings) and of_yacs == of_lazy
    assert of_yacs.num_classes == len(CLASS_NAMES) and of_yacs.min_size_test is not None
    assert of_yacs.train_datasets == ("kd_synthetic_train",)


def test_detector_config_overrides_and_models():
    lazy = load_detector_config(config_path(RCNN_R50_LAZY), ["model.roi_heads.num_classes=3"])
    assert detector_settings(lazy).num_classes == 3
    with pytest.raises(
        ValueError,
        match=r"KD.TEACHER.OPTS=\['MODEL.X', 1\] for the teacher "
        r"LazyConfig .*'key=value' strings.* MODEL.X is not one",
    ):
        load_detector_config(
            config_path(RCNN_R50_LAZY), ["MODEL.X", 1], role="teacher", opts_name="KD.TEACHER.OPTS"
        )
    with pytest.raises(ValueError, match="config .* does not build: .*MODEL.NOT_A_KEY"):
        load_detector_config(config_path(RCNN_R50), ["MODEL.NOT_A_KEY", 1])
    # both kinds build the same modules, with the same parameter names and shapes
    torch.manual_seed(0)
    of_yacs = build_detector(load_detector_config(config_path(RCNN_R50)), "cpu")
    of_lazy = build_detector(load_detector_config(config_path(RCNN_R50_LAZY)), "cpu")
    assert {k: v.shape for k, v in of_yacs.state_dict().items()} == {
        k: v.shape for k, v in of_lazy.state_dict().items()
    }


@pytest.fixture
def registered(tiny_data_root):
    """Registers datasets with the given class names; unregisters them afterwards."""
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


def test_registered_thing_classes(registered):
    a = registered("kd_test_classes_a", ["x", "y"])
    classes = registered_thing_classes(["not_registered_here", a])
    assert classes == ["x", "y"] and isinstance(classes, ClassNames)
    assert classes.datasets == ("not_registered_here", a)
    assert registered_thing_classes(["not_registered_here"]) is None


def test_check_same_classes(registered):
    same = registered("kd_test_classes_same", ["x", "y", "z"])
    swapped = registered("kd_test_classes_swapped", ["x", "z", "y"])
    other = registered("kd_test_classes_other", ["x", "y", "w"])
    student = ClassNames(["x", "y", "z"], ["student_set"])
    check_same_classes(student, [same], "t.yaml")
    check_same_classes(["x", "y", "z"], [same], "t.yaml")  # a plain list as well
    check_same_classes(None, [other], "t.yaml")  # not asked for
    check_same_classes(student, ["not_registered_here"], "t.yaml")  # unknown: not checked
    with pytest.raises(
        ValueError,
        match=r"teacher config 't.yaml' was trained on DATASETS.TRAIN="
        r"\('kd_test_classes_swapped',\) and the student on "
        r"\('student_set',\): they have the same classes in "
        r"another order \(class 1 is 'z' for the teacher, 'y' "
        r"for the student\)",
    ):
        check_same_classes(student, [swapped], "t.yaml")
    with pytest.raises(
        ValueError,
        match=r"and the student on classes \['x', 'y', 'z'\]: they have "
        r"other classes \(the teacher's \['w'\] are not among the "
        r"student's; the student's \['z'\] not among.*"
        r"CHECK_CLASSES False",
    ):
        check_same_classes(["x", "y", "z"], [other], "t.yaml")

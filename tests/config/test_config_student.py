"""
The student-only config of either kind (kd_det.config.student) and what a run's config says
about the run (kd_det.config.run): the readers that keep the config kind out of release/,
utils/ and tools/.
"""

import copy

import pytest
from conftest import config_path
from detectron2.config import LazyConfig
from detectron2.modeling import GeneralizedRCNN
from omegaconf import OmegaConf

from kd_det.config.detector import is_lazy_config, load_detector_config, train_command
from kd_det.config.run import backbone_name, distillation_summary, training_schedule
from kd_det.config.student import (
    load_student_config,
    save_config,
    student_model_call,
    student_model_config,
    vanilla_student_config,
)
from kd_det.modeling.lazy_student import lazy_student_model

LAZY_SSIM = config_path("synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py")
YACS_SSIM = config_path("synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml")


def _yaml(node) -> str:
    return OmegaConf.to_yaml(node)


def _builder_form(direct_model):
    """The direct-form LazyCall as the deprecated lazy_distilled_model(student, kd=...) has it."""
    from kd_det.modeling import lazy_student as compat

    student = copy.deepcopy(direct_model)
    for key in ("teacher", "feature_distiller"):
        del student[key]
    student._target_ = GeneralizedRCNN
    return compat.lazy_distilled_model(
        student,
        kd={"TEACHER": {"CONFIG": "teacher.yaml"}},
        train_datasets="${dataloader.train.dataset.names}",
    )


def test_student_model_call_of_both_lazy_forms(tmp_path):
    lazy = LazyConfig.load(LAZY_SSIM)
    direct = student_model_call(lazy.model)
    assert _yaml(direct) == _yaml(lazy_student_model(lazy.model))
    # the direct form: the distillation class's own constructor arguments are dropped
    assert not {"teacher", "feature_distiller"} & set(direct.keys())
    # the deprecated builder form: the builder's arguments too
    builder = _builder_form(lazy.model)
    assert _yaml(student_model_call(builder)) == _yaml(direct)
    # saved and loaded again (string targets)
    for name, model in (("builder", builder), ("direct", lazy.model)):
        saved = copy.deepcopy(lazy)
        saved.model = model
        LazyConfig.save(saved, str(tmp_path / (name + ".yaml")))
        loaded = LazyConfig.load(str(tmp_path / (name + ".yaml")))
        student = student_model_call(loaded.model)
        assert set(student.keys()) == set(direct.keys())
        assert student._target_.__name__ == "GeneralizedRCNN"
    # self-distillation (FRSKD): its self-teacher heads go too
    frskd = LazyConfig.load(config_path("synthetic/distill/self_frskd_faster_rcnn_R18_lazy.py"))
    assert _yaml(student_model_call(frskd.model)) == _yaml(lazy_student_model(frskd.model))
    assert set(student_model_call(frskd.model).keys()) == set(direct.keys())
    # a plain model is left as it is
    plain = LazyConfig.load(config_path("synthetic/faster_rcnn_R_50_FPN_lazy.py"))
    assert student_model_call(plain.model) is plain.model
    assert student_model_config(plain) is plain


def test_student_model_config_of_yacs():
    cfg = load_detector_config(YACS_SSIM)
    student = student_model_config(cfg)
    assert student.MODEL.META_ARCHITECTURE == "GeneralizedRCNN" and student.is_frozen()
    assert student.KD == cfg.KD  # evaluation reads the other keys
    assert cfg.MODEL.META_ARCHITECTURE == "DistillGeneralizedRCNN"  # not changed


@pytest.mark.parametrize("path", [YACS_SSIM, LAZY_SSIM])
def test_released_config_saves_and_loads_as_vanilla_detectron2(tmp_path, path):
    released = vanilla_student_config(load_detector_config(path), "model_final.pth")
    out = str(tmp_path / "config.yaml")
    save_config(released, out)
    assert is_lazy_config(out) == path.endswith(".py")  # a saved LazyConfig is known by its keys
    loaded = load_student_config(out)
    if path.endswith(".py"):
        assert loaded.train.init_checkpoint == "model_final.pth"
        assert str(loaded.model._target_).endswith("GeneralizedRCNN")
        assert "tools/lazyconfig_train_net.py" in train_command(out)
    else:
        assert loaded.MODEL.WEIGHTS == "model_final.pth" and "KD" not in loaded
        assert loaded.MODEL.META_ARCHITECTURE == "GeneralizedRCNN"
        assert train_command(out).startswith("tools/train_net.py")


def test_run_description_of_yacs_and_lazy_twins():
    yacs, lazy = load_detector_config(YACS_SSIM), load_detector_config(LAZY_SSIM)
    assert backbone_name(yacs) == backbone_name(lazy) == "R-18-FPN"
    assert all(v is not None for v in training_schedule(lazy))
    summary = distillation_summary(lazy)
    assert summary == distillation_summary(yacs)
    assert (summary.meta_architecture, summary.methods) == ("DistillGeneralizedRCNN", ("SSIM",))
    assert summary.teacher == "configs/synthetic/faster_rcnn_R_50_FPN.yaml"
    frskd = config_path("synthetic/distill/self_frskd_faster_rcnn_R18")
    assert distillation_summary(load_detector_config(frskd + "_lazy.py")) == distillation_summary(
        load_detector_config(frskd + ".yaml")
    )

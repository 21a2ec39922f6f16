"""Several teachers: per-image gate weights, fixed weights, and the errors."""

import pytest
import torch
from conftest import config_path, save_random_teacher, tiny_cfg
from test_distill import _one_step

from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage

from kd_det.modeling.multi_teacher import TeacherImportanceGate

MULTI = "synthetic/distill/multi_ssim_faster_rcnn_to_R18.yaml"
TEACHERS = ["synthetic/faster_rcnn_R_50_FPN.yaml", "synthetic/faster_rcnn_R_18_FPN.yaml"]


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, tiny_data_root):
    d = tmp_path_factory.mktemp("teachers")
    return [save_random_teacher(c, str(d / "t{}.pth".format(i))) for i, c in enumerate(TEACHERS)]


def multi_cfg(out, weights, opts=()):
    return tiny_cfg(MULTI, out, ["KD.MULTI_TEACHER.CONFIGS", [config_path(c) for c in TEACHERS],
                                 "KD.MULTI_TEACHER.WEIGHTS", list(weights)] + list(opts))


def test_gate_weights_are_per_image_distributions():
    gate = TeacherImportanceGate(["p2", "p3"], {"p2": 4, "p3": 6}, num_teachers=3, latent_dim=8)
    feats = {"p2": torch.randn(5, 4, 8, 8, requires_grad=True), "p3": torch.randn(5, 6, 4, 4, requires_grad=True)}
    w = gate(feats)
    assert w.shape == (5, 3)
    assert torch.allclose(w.sum(1), torch.ones(5))
    w[:, 0].sum().backward()
    assert feats["p2"].grad is None  # the gate never shapes the student's features
    assert gate.teacher_latents.grad.abs().sum() > 0


def test_per_image_weighting_equals_direct_sum(two_teachers, tmp_path):
    cfg = multi_cfg(tmp_path, two_teachers, ["KD.FEATURE.LOSS", "L2FeatureLoss"])
    model = build_model(cfg)
    multi = model.kd_multi_teacher
    levels = multi.distillers[0].levels
    g = torch.Generator().manual_seed(0)
    student = {k: torch.randn(3, 64, 8, 8, generator=g) for k in levels}
    teachers = [{k: torch.randn(3, 128, 8, 8, generator=g) for k in levels},
                {k: torch.randn(3, 64, 8, 8, generator=g) for k in levels}]
    w = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    multi.gate.forward = lambda feats: w  # fixed gate output: test the combination
    got = multi(student, teachers)["loss_kd_l2"]
    want = 0.0
    for n in range(3):
        for k, d in enumerate(multi.distillers):
            one = {lvl: v[n:n + 1] for lvl, v in student.items()}
            want += w[n, k] * d(one, {lvl: v[n:n + 1] for lvl, v in teachers[k].items()})["loss_kd_l2"]
    assert got.item() == pytest.approx(want.item() / 3, rel=1e-5)
    # teacher 0 (128 channels) has adapters, teacher 1 (64, like the student) none
    assert len(multi.distillers[0].adapters) == len(levels) and len(multi.distillers[1].adapters) == 0


def test_fixed_weights(two_teachers, tmp_path):
    cfg = multi_cfg(tmp_path, two_teachers, ["KD.MULTI_TEACHER.FIXED_WEIGHTS", [3.0, 1.0]])
    multi = build_model(cfg).kd_multi_teacher
    assert multi.gate is None and multi.fixed_weights == [0.75, 0.25]
    levels = multi.distillers[0].levels
    student = {k: torch.rand(2, 64, 16, 16) for k in levels}
    teachers = [{k: torch.rand(2, 128, 16, 16) for k in levels}, {k: torch.rand(2, 64, 16, 16) for k in levels}]
    got = multi(student, teachers)["loss_kd_ssim"]
    parts = [d(student, t)["loss_kd_ssim"] for d, t in zip(multi.distillers, teachers)]
    assert got.item() == pytest.approx((0.75 * parts[0] + 0.25 * parts[1]).item(), rel=1e-6)
    with pytest.raises(ValueError, match="one non-negative weight per teacher"):
        build_model(multi_cfg(tmp_path, two_teachers, ["KD.MULTI_TEACHER.FIXED_WEIGHTS", [1.0]]))


def test_multi_teacher_training_step(two_teachers, tmp_path):
    cfg = multi_cfg(tmp_path, two_teachers)
    model = build_model(cfg)
    assert len(model.teachers) == 2 and model.kd_feature is None
    losses, _ = _one_step(model, cfg)
    assert "loss_kd_ssim" in losses and torch.isfinite(losses["loss_kd_ssim"])
    assert all(p.grad is None for t in model.teachers for p in t.model.parameters())
    assert model.kd_multi_teacher.gate.teacher_latents.grad is not None
    # the teachers' weights are logged
    from detectron2.data import build_detection_train_loader

    with EventStorage(0) as storage:
        model(next(iter(build_detection_train_loader(cfg))))
        logged = storage.latest()
    assert {"kd_teacher0_weight", "kd_teacher1_weight"} <= set(logged)
    assert sum(logged["kd_teacher{}_weight".format(k)][0] for k in range(2)) == pytest.approx(1.0, abs=1e-5)
    # export drops the gate and every per-teacher adapter
    from kd_det.export import student_state_dict

    assert not [k for k in student_state_dict(model.state_dict()) if "multi" in k or "gate" in k]


def test_multi_teacher_errors(two_teachers, tmp_path):
    with pytest.raises(ValueError, match="both KD.TEACHER.CONFIG and KD.MULTI_TEACHER.CONFIGS"):
        build_model(multi_cfg(tmp_path, two_teachers, ["KD.TEACHER.CONFIG", config_path(TEACHERS[0])]))
    with pytest.raises(ValueError, match="2 teachers but KD.MULTI_TEACHER.WEIGHTS 1"):
        build_model(multi_cfg(tmp_path, two_teachers[:1]))
    with pytest.raises(ValueError, match="feature imitation only.*KD.CHANNEL_STATS"):
        build_model(multi_cfg(tmp_path, two_teachers, ["KD.CHANNEL_STATS.ENABLED", True]))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(multi_cfg(tmp_path, [two_teachers[0], str(tmp_path / "missing.pth")]))

"""Several teachers: per-image gate weights, fixed weights, and the errors."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import config_path, one_step, save_random_teacher, tiny_cfg
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tolerances import ELEMENTARY, U32, U64, Bounded, assert_bounded, assert_within, gamma

from kd_det.modeling.distillers import TeacherImportanceGate

MULTI = "synthetic/distill/multi_ssim_faster_rcnn_to_R18.yaml"
TEACHERS = ["synthetic/faster_rcnn_R_50_FPN.yaml", "synthetic/faster_rcnn_R_18_FPN.yaml"]


@pytest.fixture(scope="module")
def two_teachers(tmp_path_factory, tiny_data_root):
    d = tmp_path_factory.mktemp("teachers")
    return [save_random_teacher(c, str(d / "t{}.pth".format(i))) for i, c in enumerate(TEACHERS)]


def multi_cfg(out, weights, opts=()):
    return tiny_cfg(
        MULTI,
        out,
        [
            "KD.MULTI_TEACHER.CONFIGS",
            [config_path(c) for c in TEACHERS],
            "KD.MULTI_TEACHER.WEIGHTS",
            list(weights),
        ]
        + list(opts),
    )


def softmax_row_sum_bound(k, u=U32):
    """
    How far a softmax row of k entries sums from 1, for any logits: p_k = e_k / S with
    e_k = exp(x_k - max) off by at most u |x_k - max| + ELEMENTARY u relative, S by their
    p-weighted mean plus gamma(k - 1), the division by 2 u (a reciprocal and a product), the
    row's sum by gamma(k - 1).  sum_k p_k |x_k - max| <= sum_k -p_k log p_k <= log k, since
    |x_k - max| = -log(p_k S) <= -log p_k: 2 u (log k + ELEMENTARY) + 2 gamma(k - 1) + 2 u.
    """
    return 2 * u * (math.log(k) + ELEMENTARY) + 2 * gamma(k - 1, u) + 2 * u


@pytest.mark.numeric
def test_gate_weights_are_per_image_distributions():
    with torch.random.fork_rng(devices=[]):  # the same gate and features in every run
        torch.manual_seed(0)
        gate = TeacherImportanceGate(["p2", "p3"], {"p2": 4, "p3": 6}, num_teachers=3, latent_dim=8)
        feats = {
            "p2": torch.randn(5, 4, 8, 8, requires_grad=True),
            "p3": torch.randn(5, 6, 4, 4, requires_grad=True),
        }
    w = gate(feats)
    assert w.shape == (5, 3)
    assert_within(w.sum(1), torch.ones(5), softmax_row_sum_bound(3), "teacher weights per image")
    w[:, 0].sum().backward()
    assert feats["p2"].grad is None  # the gate never shapes the student's features
    assert gate.teacher_latents.grad.abs().sum() > 0


def _adapted_bounded(x: Bounded, distiller, level) -> Bounded:
    """The level's 1x1 adapter, if any: a dot product over C_in and the bias, gamma(C_in + 1)."""
    if level not in distiller.adapters:
        return x
    conv = distiller.adapters[level]
    weight, bias = conv.weight.detach().double(), conv.bias.detach().double()
    err = F.conv2d(x.err, weight.abs()) + gamma(weight.shape[1] + 1, x.u) * F.conv2d(
        x.value.abs(), weight.abs(), bias.abs()
    )
    return Bounded(F.conv2d(x.value, weight, bias), err, x.dtype)


@pytest.mark.numeric
def test_per_image_weighting_equals_direct_sum(two_teachers, tmp_path):
    """
    The per-image weighting (weights as position weights, sum_n w_n l_n / sum_n w_n times
    mean_n w_n) and the direct sum_n w_n l_n / N, in float32 and in float64, each against
    the float64 formula: within the bound of its own operations (adapters, squared differences,
    weighted sums, level weights).  In float64 the bounds are 2^29 times smaller.
    """
    cfg = multi_cfg(tmp_path, two_teachers, ["KD.FEATURE.LOSS", "L2FeatureLoss"])
    model = build_model(cfg)
    multi = model.kd_multi_teacher
    levels = multi.distillers[0].levels
    g = torch.Generator().manual_seed(0)
    student = {k: torch.randn(3, 64, 8, 8, generator=g) for k in levels}
    teachers = [
        {k: torch.randn(3, 128, 8, 8, generator=g) for k in levels},
        {k: torch.randn(3, 64, 8, 8, generator=g) for k in levels},
    ]
    w = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.5, 0.5]])
    for dtype in (torch.float32, torch.float64):
        multi.to(dtype)
        wd = w.to(dtype)
        multi.gate.forward = lambda feats: wd  # fixed gate output: test the combination
        sd = {lvl: v.to(dtype) for lvl, v in student.items()}
        td = [{lvl: v.to(dtype) for lvl, v in t.items()} for t in teachers]
        got = multi(sd, td)["loss_kd_l2"]
        want = 0.0
        for n in range(3):
            for k, d in enumerate(multi.distillers):
                one = {lvl: v[n : n + 1] for lvl, v in sd.items()}
                teacher = {lvl: v[n : n + 1] for lvl, v in td[k].items()}
                want += wd[n, k] * d(one, teacher)["loss_kd_l2"]
        want = want / 3
        # the bounds follow each path's operations; the reference is the formula in float64
        got_bound, want_bound, ref = 0.0, 0.0, 0.0
        for k, d in enumerate(multi.distillers):
            wk = Bounded.exact(wd[:, k])
            pw = wk.map(lambda v: v[:, None, None, None].expand(-1, 1, 8, 8))
            level_sum, per_image = 0.0, [0.0] * 3
            for i, lvl in enumerate(d.levels):
                adapted = _adapted_bounded(Bounded.exact(sd[lvl]), d, lvl)
                lmap = (adapted - Bounded.exact(td[k][lvl])) ** 2
                c = lmap.shape[1]
                level_sum = level_sum + d.level_weights[i] * ((lmap * pw).sum() / (pw.sum() * c))
                for n in range(3):
                    per_image[n] = per_image[n] + d.level_weights[i] * lmap[n : n + 1].mean()
                per_image_l2 = lmap.value.mean((1, 2, 3))
                weighted = (wd[:, k].double() * per_image_l2).sum() / 3
                ref = ref + weighted * d.level_weights[i] * d.weight
            got_bound = got_bound + wk.mean() * (d.weight * level_sum)
            for n in range(3):
                want_bound = want_bound + wk[n] * (d.weight * per_image[n])
        assert_bounded(got, got_bound, "per-image weighting, {}".format(dtype), reference=ref)
        assert_bounded(want, want_bound / 3, "direct sum, {}".format(dtype), reference=ref)
    # teacher 0 (128 channels) has adapters, teacher 1 (64, like the student) none
    assert (
        len(multi.distillers[0].adapters) == len(levels) and len(multi.distillers[1].adapters) == 0
    )


@pytest.mark.numeric
def test_fixed_weights(two_teachers, tmp_path):
    cfg = multi_cfg(tmp_path, two_teachers, ["KD.MULTI_TEACHER.FIXED_WEIGHTS", [3.0, 1.0]])
    multi = build_model(cfg).kd_multi_teacher
    assert multi.gate is None and multi.fixed_weights == [0.75, 0.25]
    levels = multi.distillers[0].levels
    g = torch.Generator().manual_seed(1)
    student = {k: torch.rand(2, 64, 16, 16, generator=g) for k in levels}
    teachers = [
        {k: torch.rand(2, 128, 16, 16, generator=g) for k in levels},
        {k: torch.rand(2, 64, 16, 16, generator=g) for k in levels},
    ]
    got = multi(student, teachers)["loss_kd_ssim"]
    parts = [d(student, t)["loss_kd_ssim"] for d, t in zip(multi.distillers, teachers)]
    # exact: the same distillers on the same features give the same parts, weighted and added
    # in the same order by the same float32 operations
    assert torch.equal(got, 0.75 * parts[0] + 0.25 * parts[1])
    with pytest.raises(ValueError, match="one non-negative weight per teacher"):
        build_model(multi_cfg(tmp_path, two_teachers, ["KD.MULTI_TEACHER.FIXED_WEIGHTS", [1.0]]))


@pytest.mark.numeric
@pytest.mark.slow
def test_multi_teacher_training_step(two_teachers, tmp_path):
    cfg = multi_cfg(tmp_path, two_teachers)
    model = build_model(cfg)
    assert len(model.teachers) == 2 and model.kd_feature is None
    losses, _ = one_step(model, cfg)
    assert "loss_kd_ssim" in losses and torch.isfinite(losses["loss_kd_ssim"])
    assert all(p.grad is None for t in model.teachers for p in t.model.parameters())
    assert model.kd_multi_teacher.gate.teacher_latents.grad is not None
    # the teachers' weights are logged
    from detectron2.data import build_detection_train_loader

    with EventStorage(0) as storage:
        model(next(iter(build_detection_train_loader(cfg))))
        logged = storage.latest()
    assert {"kd_teacher0_weight", "kd_teacher1_weight"} <= set(logged)
    # sum_k mean_n w_nk = mean_n (sum_k w_nk): softmax rows sum to 1, then the mean over 2 images
    # (for any logits: the batch is augmented with Detectron2's time-seeded data loader)
    total = sum(logged["kd_teacher{}_weight".format(k)][0] for k in range(2))
    bound = softmax_row_sum_bound(2) + gamma(2 - 1) + 2 * U32 + 2 * U64
    assert_within(
        torch.tensor(total, dtype=torch.float64),
        torch.tensor(1.0, dtype=torch.float64),
        bound,
        "mean teacher weights",
    )
    # export drops the gate and every per-teacher adapter
    from kd_det.release.student import student_state_dict

    assert not [k for k in student_state_dict(model.state_dict()) if "multi" in k or "gate" in k]


def test_multi_teacher_errors(two_teachers, tmp_path):
    with pytest.raises(ValueError, match="both KD.TEACHER.CONFIG and KD.MULTI_TEACHER.CONFIGS"):
        build_model(
            multi_cfg(tmp_path, two_teachers, ["KD.TEACHER.CONFIG", config_path(TEACHERS[0])])
        )
    with pytest.raises(ValueError, match="2 teachers but KD.MULTI_TEACHER.WEIGHTS 1"):
        build_model(multi_cfg(tmp_path, two_teachers[:1]))
    with pytest.raises(ValueError, match="feature imitation only.*KD.CHANNEL_STATS"):
        build_model(multi_cfg(tmp_path, two_teachers, ["KD.CHANNEL_STATS.ENABLED", True]))
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        build_model(multi_cfg(tmp_path, [two_teachers[0], str(tmp_path / "missing.pth")]))

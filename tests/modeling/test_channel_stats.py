"""Channel-statistics transfer and AdaIN: the formulas, gradients, and a training step in both
meta-architectures."""

import pytest
import torch
from conftest import distill_cfg, one_step
from detectron2.modeling import build_model
from tolerances import Bounded, assert_bounded

from kd_det.losses import adain, channel_statistics, channel_statistics_loss, head_output_loss

CASES = {
    "rcnn": (
        "synthetic/distill/ssim_stats_faster_rcnn_R50_to_R18.yaml",
        "synthetic/faster_rcnn_R_50_FPN.yaml",
    ),
    "retina": (
        "synthetic/distill/ssim_stats_retinanet_R50_to_R18.yaml",
        "synthetic/retinanet_R_50_FPN.yaml",
    ),
}


def _channel_statistics_bounded(x: Bounded, eps=1e-5):
    """channel_statistics: mean and sqrt(biased variance + eps) over each map's positions."""
    flat = x.map(lambda a: a.flatten(2))
    return flat.mean(2), (flat.var(2) + eps).sqrt()


def _statistics_loss_bounded(student, teacher, eps=1e-5) -> Bounded:
    """channel_statistics_loss's operations, level by level."""
    total = 0.0
    for s, t in zip(student, teacher):
        (ms, ss), (mt, st) = (_channel_statistics_bounded(x, eps) for x in (s, t))
        total = total + ((ms - mt) ** 2 + (ss - st) ** 2).mean() / (st**2).mean()
    return total / len(student)


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_statistics_and_loss_formula(dtype):
    """The statistics and the loss in float32 and float64 against the formula in float64."""
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g).to(dtype)
    t = (torch.randn(2, 3, 6, 7, generator=g) * 2 + 1).to(dtype)  # sizes may differ
    sb, tb = Bounded.exact(s), Bounded.exact(t)
    mean, std = channel_statistics(s, eps=0.0)
    bound_mean, bound_std = _channel_statistics_bounded(sb, eps=0.0)
    s64, t64 = s.double(), t.double()
    assert_bounded(mean, bound_mean, "means", reference=s64.mean(dim=(2, 3)))
    assert_bounded(
        std, bound_std, "standard deviations", reference=s64.std(dim=(2, 3), unbiased=False)
    )
    want = 0.0
    teacher_var = 0.0
    for i in range(2):
        for c in range(3):
            ss, st = ((x[i, c].var(unbiased=False) + 1e-5).sqrt() for x in (s64, t64))
            want += (s64[i, c].mean() - t64[i, c].mean()) ** 2 + (ss - st) ** 2
            teacher_var += t64[i, c].var(unbiased=False) + 1e-5
    got = channel_statistics_loss([s, s], [t, t])  # two equal levels: same mean
    bound = _statistics_loss_bounded([sb, sb], [tb, tb])
    assert_bounded(got, bound, "loss", reference=want / teacher_var)
    # scale-free: 16x features (exact, a power of two) with eps 16^2 times smaller inside the
    # square roots (sqrt(256 var + eps) = 16 sqrt(var + eps / 256)) are exactly the same loss
    scaled = channel_statistics_loss([16 * s], [16 * t])
    assert_bounded(
        scaled,
        _statistics_loss_bounded([16 * sb], [16 * tb]),
        "loss of 16x features",
        reference=_statistics_loss_bounded([sb], [tb], eps=1e-5 / 256).value,
    )
    # exact: equal statistics, the same operations on the same values
    assert channel_statistics_loss([s], [s.clone()]).item() == 0.0


@pytest.mark.numeric
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_adain_transplants_statistics(dtype):
    g = torch.Generator().manual_seed(1)
    content = (torch.randn(2, 4, 5, 6, generator=g) * 3 + 2).to(dtype)
    mean = torch.randn(2, 4, generator=g).to(dtype)
    std = (torch.rand(2, 4, generator=g) + 0.5).to(dtype)
    out = adain(content, mean, std)
    # exact: std (content - mu_c) / sqrt(var_c + eps) + mean has mean `mean` and standard
    # deviation std sqrt(var_c / (var_c + eps)) (eps = 1e-5 inside the content's)
    cb = Bounded.exact(content)
    mc, sc = _channel_statistics_bounded(cb)
    ob = (cb - mc.map(lambda a: a[..., None, None])) / sc.map(lambda a: a[..., None, None])
    ob = ob * Bounded.exact(std)[..., None, None] + Bounded.exact(mean)[..., None, None]
    bound_mean, bound_std = _channel_statistics_bounded(ob, eps=0.0)
    m, s = channel_statistics(out, eps=0.0)
    var_c = content.double().var(dim=(2, 3), unbiased=False)
    assert_bounded(m, bound_mean, "means", reference=mean.double())
    assert_bounded(
        s,
        bound_std,
        "standard deviations",
        reference=std.double() * (var_c / (var_c + 1e-5)).sqrt(),
    )
    # normalised pattern kept: correlation with the content is 1 per channel
    a = (out - out.mean((2, 3), keepdim=True)).flatten(2)
    b = (content - content.mean((2, 3), keepdim=True)).flatten(2)
    ab = (ob - ob.mean((2, 3), keepdim=True)).map(lambda x: x.flatten(2))
    bb = (cb - cb.mean((2, 3), keepdim=True)).map(lambda x: x.flatten(2))
    bound = (ab * bb).sum(2) / ((ab * ab).sum(2).sqrt() * (bb * bb).sum(2).sqrt())
    assert_bounded(
        (a * b).sum(2) / (a.norm(dim=2) * b.norm(dim=2)),
        bound,
        "correlation",
        reference=torch.ones(2, 4, dtype=torch.float64),
    )


@pytest.mark.numeric
def test_head_output_loss_gradient_to_judged_only():
    g = torch.Generator().manual_seed(2)
    a = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, generator=g, requires_grad=True)
    loss = head_output_loss([a], [b])
    ab, bb = Bounded.exact(a), Bounded.exact(b)
    a64, b64 = a.detach().double(), b.detach().double()
    # (a - b)^2 mean over the variance, over 1 level
    assert_bounded(
        loss,
        ((ab - bb) ** 2).mean() / bb.var(None) / 1,
        "head output loss",
        reference=(a64 - b64).pow(2).mean() / b64.var(unbiased=False),
    )
    loss.backward()
    assert a.grad is not None and b.grad is None


@pytest.mark.slow
@pytest.mark.parametrize("kind", sorted(CASES))
def test_channel_stats_training_step(kind, tiny_data_root, tmp_path, rcnn_teacher, retina_teacher):
    config, teacher_cfg = CASES[kind]
    cfg = distill_cfg(
        config, teacher_cfg, rcnn_teacher if kind == "rcnn" else retina_teacher, tmp_path
    )
    model = build_model(cfg)
    levels = model.teacher.dense_head_levels
    assert model.kd_stats.levels == levels
    assert set(model.kd_stats.adapters) == set(
        levels
    )  # 64 student channels -> 128 teacher channels
    before = {k: v.clone() for k, v in model.teacher.model.state_dict().items()}
    losses, _ = one_step(model, cfg)
    assert {"loss_kd_ssim", "loss_kd_stats", "loss_kd_adain"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_kd_adain"] > 0
    # the AdaIN loss reaches the student (through its statistics) and the adapters, never the
    # teacher
    assert all(p.grad is None for p in model.teacher.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.teacher.model.state_dict().items())
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0 for p in model.kd_stats.adapters.parameters()
    )


@pytest.mark.slow
def test_adain_loss_alone_moves_the_student(tiny_data_root, tmp_path, retina_teacher):
    config, teacher_cfg = CASES["retina"]
    cfg = distill_cfg(
        config, teacher_cfg, retina_teacher, tmp_path, ["KD.CHANNEL_STATS.WEIGHT", 0.0]
    )
    model = build_model(cfg)
    from detectron2.data import build_detection_train_loader
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage(0):
        losses = model(next(iter(build_detection_train_loader(cfg))))
    assert "loss_kd_stats" not in losses
    losses["loss_kd_adain"].backward()
    assert any(
        p.grad is not None and p.grad.abs().sum() > 0
        for n, p in model.named_parameters()
        if n.startswith("backbone.")
    )

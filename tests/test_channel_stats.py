"""Channel-statistics transfer and AdaIN: the formulas, gradients, and a training step in both meta-architectures."""

import pytest
import torch
from test_distill import _one_step, distill_cfg

from detectron2.modeling import build_model

from kd_det.losses import adain, channel_statistics, channel_statistics_loss, head_output_loss

CASES = {
    "rcnn": ("synthetic/distill/ssim_stats_faster_rcnn_R50_to_R18.yaml", "synthetic/faster_rcnn_R_50_FPN.yaml"),
    "retina": ("synthetic/distill/ssim_stats_retinanet_R50_to_R18.yaml", "synthetic/retinanet_R_50_FPN.yaml"),
}


def test_channel_statistics_and_loss_formula():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)
    t = torch.randn(2, 3, 6, 7, generator=g, dtype=torch.float64) * 2 + 1  # sizes may differ
    mean, std = channel_statistics(s, eps=0.0)
    assert torch.allclose(mean[1, 2], s[1, 2].mean())
    assert torch.allclose(std[1, 2], s[1, 2].std(unbiased=False))
    want = 0.0
    teacher_var = 0.0
    for i in range(2):
        for c in range(3):
            want += (s[i, c].mean() - t[i, c].mean()) ** 2 + (
                (s[i, c].var(unbiased=False) + 1e-5).sqrt() - (t[i, c].var(unbiased=False) + 1e-5).sqrt()) ** 2
            teacher_var += t[i, c].var(unbiased=False) + 1e-5
    got = channel_statistics_loss([s, s], [t, t])  # two equal levels: same mean
    assert got.item() == pytest.approx((want / teacher_var).item(), rel=1e-10)
    # scale-free: features and teacher 10x larger give the same loss
    assert channel_statistics_loss([10 * s], [10 * t]).item() == pytest.approx(got.item(), rel=1e-5)
    assert channel_statistics_loss([s], [s.clone()]).item() == pytest.approx(0.0, abs=1e-12)


def test_adain_transplants_statistics():
    g = torch.Generator().manual_seed(1)
    content = torch.randn(2, 4, 5, 6, generator=g, dtype=torch.float64) * 3 + 2
    mean = torch.randn(2, 4, generator=g, dtype=torch.float64)
    std = torch.rand(2, 4, generator=g, dtype=torch.float64) + 0.5
    out = adain(content, mean, std)
    m, s = channel_statistics(out, eps=0.0)
    assert torch.allclose(m, mean, atol=1e-10)
    assert torch.allclose(s, std, rtol=1e-5)  # eps 1e-5 inside the content's std
    # normalised pattern kept: correlation with the content is 1 per channel
    a = (out - out.mean((2, 3), keepdim=True)).flatten(2)
    b = (content - content.mean((2, 3), keepdim=True)).flatten(2)
    assert torch.allclose((a * b).sum(2) / (a.norm(dim=2) * b.norm(dim=2)), torch.ones(2, 4, dtype=torch.float64))


def test_head_output_loss_gradient_to_judged_only():
    a = torch.randn(2, 3, 4, 4, requires_grad=True)
    b = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = head_output_loss([a], [b])
    assert loss.item() == pytest.approx(((a - b).pow(2).mean() / b.var(unbiased=False)).item(), rel=1e-5)
    loss.backward()
    assert a.grad is not None and b.grad is None


@pytest.mark.parametrize("kind", sorted(CASES))
def test_channel_stats_training_step(kind, tiny_data_root, tmp_path, rcnn_teacher, retina_teacher):
    config, teacher_cfg = CASES[kind]
    cfg = distill_cfg(config, teacher_cfg, rcnn_teacher if kind == "rcnn" else retina_teacher, tmp_path)
    model = build_model(cfg)
    levels = model.teacher.dense_head_levels
    assert model.kd_stats.levels == levels
    assert set(model.kd_stats.adapters) == set(levels)  # 64 student channels -> 128 teacher channels
    before = {k: v.clone() for k, v in model.teacher.model.state_dict().items()}
    losses, _ = _one_step(model, cfg)
    assert {"loss_kd_ssim", "loss_kd_stats", "loss_kd_adain"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["loss_kd_adain"] > 0
    # the AdaIN loss reaches the student (through its statistics) and the adapters, never the teacher
    assert all(p.grad is None for p in model.teacher.model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.teacher.model.state_dict().items())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.kd_stats.adapters.parameters())


def test_adain_loss_alone_moves_the_student(tiny_data_root, tmp_path, retina_teacher):
    config, teacher_cfg = CASES["retina"]
    cfg = distill_cfg(config, teacher_cfg, retina_teacher, tmp_path, ["KD.CHANNEL_STATS.WEIGHT", 0.0])
    model = build_model(cfg)
    from detectron2.data import build_detection_train_loader
    from detectron2.utils.events import EventStorage

    model.train()
    with EventStorage(0):
        losses = model(next(iter(build_detection_train_loader(cfg))))
    assert "loss_kd_stats" not in losses
    losses["loss_kd_adain"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in model.named_parameters()
               if n.startswith("backbone."))

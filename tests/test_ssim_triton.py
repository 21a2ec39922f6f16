"""The fused GPU SSIM loss equals the PyTorch path (GPU tests skip without CUDA); selection logic on CPU."""

import pytest
import torch

from kd_det.losses import SSIMFeatureLoss, ssim_map
from kd_det.losses import ssim_triton

needs_gpu = pytest.mark.skipif(not ssim_triton.is_available(), reason="needs CUDA and Triton")

# FPN-like pyramid with levels smaller than the 11x11 window
LEVEL_SHAPES = [(2, 8, 96, 160), (2, 8, 48, 80), (2, 8, 24, 40), (2, 8, 12, 20), (2, 8, 6, 10), (2, 8, 3, 5),
                (2, 8, 1, 1)]


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def _fpn_features():
    """Features of a Detectron2 R-18 FPN (random weights) on a structured image."""
    from detectron2.config import get_cfg
    from detectron2.modeling import build_backbone

    cfg = get_cfg()
    cfg.MODEL.BACKBONE.NAME = "build_resnet_fpn_backbone"
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.FPN.OUT_CHANNELS = 32
    torch.manual_seed(0)
    backbone = build_backbone(cfg).cuda().eval()
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, 256), torch.linspace(-1, 1, 320), indexing="ij")
    image = torch.stack([torch.sin(8 * xx), torch.cos(5 * yy), xx * yy]).mul(60).unsqueeze(0).cuda()
    with torch.no_grad():
        s = backbone(image)
        t = backbone(image + 20 * torch.randn_like(image))
    return list(s.values()), list(t.values())


@needs_gpu
@pytest.mark.parametrize("shape", LEVEL_SHAPES)
def test_fused_mean_and_grad_equal_torch(shape):
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.rand(shape, device="cuda", generator=g).requires_grad_()
    y = (0.5 * x.detach() + 0.5 * torch.rand(shape, device="cuda", generator=g))
    ref = ssim_map(x, y).mean()
    (ref_grad,) = torch.autograd.grad(ref, x)
    fused = ssim_triton.fused_ssim_mean(x, y)
    (fused_grad,) = torch.autograd.grad(fused, x)
    assert abs(fused.item() - ref.item()) <= 1e-4 * abs(ref.item())
    assert _rel(fused_grad, ref_grad) < 1e-4


@needs_gpu
@pytest.mark.parametrize("normalize", ["minmax", "none"])
def test_fused_feature_loss_on_fpn_features(normalize):
    student, teacher = _fpn_features()
    student = [s.clone().requires_grad_() for s in student]
    torch_loss = SSIMFeatureLoss(normalize=normalize, impl="torch")(student, teacher)
    torch_grads = torch.autograd.grad(torch_loss, student)
    fused_loss = SSIMFeatureLoss(normalize=normalize, impl="triton")(student, teacher)
    fused_grads = torch.autograd.grad(fused_loss, student)
    assert abs(fused_loss.item() - torch_loss.item()) <= 1e-4 * abs(torch_loss.item())
    for a, b in zip(fused_grads, torch_grads):
        assert _rel(a, b) < 1e-4


@needs_gpu
def test_auto_picks_the_fused_kernel_on_cuda(monkeypatch):
    calls = []
    real = ssim_triton.fused_ssim_feature_loss
    monkeypatch.setattr(ssim_triton, "fused_ssim_feature_loss", lambda *a: calls.append(1) or real(*a))
    x = torch.rand(1, 2, 16, 16, device="cuda")
    SSIMFeatureLoss(impl="auto")([x], [x.flip(-1)])
    assert calls


def test_selection_on_cpu(monkeypatch):
    x = torch.rand(1, 2, 16, 16)
    with pytest.raises(RuntimeError, match="IMPL='triton' needs CUDA"):
        SSIMFeatureLoss(impl="triton")([x], [x])
    # even where the kernel is available, CPU tensors take the PyTorch path
    monkeypatch.setattr(ssim_triton, "is_available", lambda: True)
    monkeypatch.setattr(ssim_triton, "fused_ssim_feature_loss", lambda *a: pytest.fail("fused path on CPU"))
    auto = SSIMFeatureLoss(impl="auto")([x], [x.flip(-1)])
    assert torch.allclose(auto, SSIMFeatureLoss(impl="torch")([x], [x.flip(-1)]))
    with pytest.raises(ValueError, match="KD.SSIM.IMPL"):
        SSIMFeatureLoss(impl="cuda")

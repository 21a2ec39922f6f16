#!/usr/bin/env python
"""
GPU check of issue 35's pieces (run on the lent GPU machine, after run_suite.sh's wheel
install; about a minute):

1. the gradient-ratio measurement under AMP (autocast fp16, grad scaler): a small conv net's
   ratios on the AMP path, measured by the health monitor inside Detectron2's AMPTrainer,
   against the same ratios in float32;
2. ``tools/train_net.py --dry-run`` of the SSIM Faster R-CNN distillation config on CUDA with
   ``SOLVER.AMP.ENABLED True`` on a small synthetic dataset and a random-weight teacher of the
   right config: its exit code and output (CUDA max allocated).

    python benchmarks/gpu/check_dry_run_amp.py [OUT_DIR]
"""

import os
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)


class ConvToy(torch.nn.Module):
    """Two convs; detection loss on the output, a distillation term on the features."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 8, 3, padding=1)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("x", torch.randn(4, 3, 64, 64, generator=g))
        self.register_buffer("target", torch.randn(4, 16, 64, 64, generator=g))

    def forward(self, batch=None):
        f = self.a(self.x)
        out = self.b(torch.relu(f))
        return {
            "loss_det": out.float().pow(2).mean(),
            "loss_kd_feat": 3.0 * (f.float() - self.target).pow(2).mean(),
        }


def check_amp_ratios():
    from detectron2.engine import AMPTrainer

    from kd_det.engine.grad_ratio import measure_grad_ratios, student_parameters
    from kd_det.engine.health import DistillHealthMonitor

    torch.manual_seed(0)
    model = ConvToy().cuda()
    fp32 = measure_grad_ratios(model(), student_parameters(model)).ratios["loss_kd_feat"]
    monitor = DistillHealthMonitor(period=1)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = AMPTrainer(model, [None] * 10, opt)
    trainer.register_hooks([monitor])
    trainer.train(0, 2)
    amp = monitor.last.ratios["loss_kd_feat"]
    scale = trainer.grad_scaler.get_scale()
    print(
        "AMP ratio check: float32 {:.6g}, AMP (fp16 autocast, scale {:.0f}) {:.6g}, rel diff "
        "{:.2e}".format(fp32, scale, amp, abs(amp - fp32) / fp32)
    )
    return abs(amp - fp32) / fp32 < 0.05


def check_dry_run(tmp, device="cuda", amp=True):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from kd_det import get_kd_cfg, merge_kd_config
    from kd_det.data import SyntheticSpec, ensure_synthetic_dataset, register_synthetic_datasets

    spec = SyntheticSpec(num_train=32, num_val=8, image_size=128, seed=3)
    root = os.path.join(tmp, "data")
    register_synthetic_datasets(root, spec, prefix="kd_gpu")
    ensure_synthetic_dataset(root, spec)
    teacher_cfg = os.path.join(ROOT, "configs/synthetic/faster_rcnn_R_50_FPN.yaml")
    cfg = merge_kd_config(get_kd_cfg(), teacher_cfg, [])
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=tmp).save("teacher")
    import runpy

    tool = runpy.run_path(os.path.join(ROOT, "tools", "train_net.py"))
    code = tool["cli"](
        [
            "--config-file",
            os.path.join(ROOT, "configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml"),
            "--dry-run",
            "DATASETS.TRAIN",
            "('kd_gpu_train',)",
            "DATASETS.TEST",
            "('kd_gpu_val',)",
            "MODEL.DEVICE",
            device,
            "SOLVER.AMP.ENABLED",
            str(amp),
            "KD.TEACHER.CONFIG",
            teacher_cfg,
            "KD.TEACHER.WEIGHTS",
            os.path.join(tmp, "teacher.pth"),
            "OUTPUT_DIR",
            os.path.join(tmp, "out"),
        ]
    )
    print("dry run exit code:", code)
    return code == 0


def main():
    ok_amp = check_amp_ratios()
    with tempfile.TemporaryDirectory() as tmp:
        ok_dry = check_dry_run(tmp)
    print("AMP ratios:", "OK" if ok_amp else "FAILED", "| dry run:", "OK" if ok_dry else "FAILED")
    return 0 if ok_amp and ok_dry else 1


if __name__ == "__main__":
    raise SystemExit(main())

"""SOLVER.GRAD_ACCUM_STEPS: one optimizer step over several micro-batches."""

import itertools
import os

import pytest
import torch
from conftest import config_path, tiny_cfg

from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage

from kd_det.engine import GradientAccumulationTrainer, KDTrainer


class _Regression(torch.nn.Module):
    """Per-sample-mean losses, so that the mean of micro-batch gradients is the full batch's gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, batch):
        x = torch.stack([b["x"] for b in batch])
        y = torch.stack([b["y"] for b in batch])
        err = self.linear(x).squeeze(1) - y
        return {"loss_sq": (err ** 2).mean(), "loss_abs": err.abs().mean()}


def _samples(n):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(3, generator=g), "y": torch.randn((), generator=g)} for _ in range(n)]


def _batches(samples, size):
    return itertools.cycle([samples[i:i + size] for i in range(0, len(samples), size)])


@pytest.mark.parametrize("steps", [2, 4])
def test_accumulated_step_equals_the_full_batch_step(steps):
    samples = _samples(8)
    full = _Regression()
    full_trainer = SimpleTrainer(full, _batches(samples, 8), torch.optim.SGD(full.parameters(), lr=0.1, momentum=0.9))
    micro = _Regression()
    inner = SimpleTrainer(micro, _batches(samples, 8 // steps), torch.optim.SGD(micro.parameters(), lr=0.1, momentum=0.9))
    trainer = GradientAccumulationTrainer(inner, steps)
    with EventStorage(0) as full_storage:
        for _ in range(3):
            full_trainer.run_step()
            full_storage.step()
    with EventStorage(0) as storage:
        for _ in range(3):
            trainer.run_step()
            storage.step()
    for a, b in zip(full.parameters(), micro.parameters()):
        assert torch.allclose(a, b, atol=1e-6), (a, b)
    # logged: the mean over the micro-batches, which for these losses is the full batch's value
    for key in ("loss_sq", "loss_abs", "total_loss"):
        ours = [v for v, _ in storage.history(key).values()]
        theirs = [v for v, _ in full_storage.history(key).values()]
        assert len(ours) == 3 and ours == pytest.approx(theirs, rel=1e-5), key
    assert trainer.state_dict().keys() == inner.state_dict().keys()  # checkpoints interchange with SimpleTrainer's


def test_accumulation_stops_on_a_non_finite_loss_before_the_step():
    samples = _samples(4)
    samples[3]["y"] = torch.tensor(float("nan"))
    model = _Regression()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = GradientAccumulationTrainer(SimpleTrainer(model, _batches(samples, 2), torch.optim.SGD(
        model.parameters(), lr=0.1)), 2)
    with EventStorage(0), pytest.raises(FloatingPointError, match="NaN"):
        trainer.run_step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_kd_trainer_with_gradient_accumulation(tiny_data_root, tmp_path, rcnn_teacher):
    """A distillation run: micro-batches of IMS_PER_BATCH / steps images, steps of them per iteration; resumable."""
    opts = ["KD.TEACHER.CONFIG", config_path("synthetic/faster_rcnn_R_50_FPN.yaml"), "KD.TEACHER.WEIGHTS", rcnn_teacher,
            "SOLVER.IMS_PER_BATCH", 4, "SOLVER.GRAD_ACCUM_STEPS", 2, "SOLVER.MAX_ITER", 3, "DATASETS.TEST", ()]
    cfg = tiny_cfg("synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml", tmp_path, opts)
    trainer = KDTrainer(cfg)
    assert isinstance(trainer._trainer, GradientAccumulationTrainer)
    seen = []
    loader_iter = trainer._trainer._data_loader_iter

    def counting():
        for batch in loader_iter:
            seen.append(len(batch))
            yield batch

    trainer._trainer._data_loader_iter = counting()
    steps = []
    optimizer_step = trainer.optimizer.step
    trainer.optimizer.step = lambda *a, **k: (steps.append(1), optimizer_step(*a, **k))[1]
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert seen == [2] * 6 and len(steps) == 3
    assert all(k in trainer.storage.latest() for k in ("loss_kd_ssim", "loss_cls", "total_loss"))
    # resumes to a longer schedule, here without accumulation: the optimizer state is under SimpleTrainer's key
    cfg = tiny_cfg("synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml", tmp_path, opts + [
        "SOLVER.GRAD_ACCUM_STEPS", 1, "SOLVER.MAX_ITER", 4])
    trainer = KDTrainer(cfg)
    assert type(trainer._trainer) is SimpleTrainer
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3 and trainer._trainer.optimizer.state_dict()["state"]
    trainer.train()
    assert torch.load(os.path.join(tmp_path, "model_final.pth"), weights_only=False)["iteration"] == 3


def test_batch_that_does_not_split(tiny_data_root, tmp_path):
    cfg = tiny_cfg("synthetic/faster_rcnn_R_18_FPN.yaml", tmp_path, ["SOLVER.IMS_PER_BATCH", 6,
                                                                    "SOLVER.GRAD_ACCUM_STEPS", 4])
    with pytest.raises(ValueError, match="IMS_PER_BATCH=6 must be a multiple of SOLVER.GRAD_ACCUM_STEPS=4 times the 1 "
                                         "process"):
        KDTrainer(cfg)

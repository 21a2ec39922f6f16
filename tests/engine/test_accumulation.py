"""SOLVER.GRAD_ACCUM_STEPS: one optimizer step over several micro-batches."""

import itertools
import os

import pytest
import torch
from conftest import config_path, tiny_cfg
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage
from tolerances import U32, assert_within, gamma, unit_roundoff

from kd_det.checkpoint import read_checkpoint
from kd_det.engine import GradientAccumulationTrainer, KDTrainer


class _Regression(torch.nn.Module):
    """Per-sample-mean losses, so that the mean of micro-batch gradients is the full batch's
    gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, batch):
        x = torch.stack([b["x"] for b in batch])
        y = torch.stack([b["y"] for b in batch])
        err = self.linear(x).squeeze(1) - y
        return {"loss_sq": (err**2).mean(), "loss_abs": err.abs().mean()}


def _samples(n):
    g = torch.Generator().manual_seed(1)
    return [{"x": torch.randn(3, generator=g), "y": torch.randn((), generator=g)} for _ in range(n)]


def _batches(samples, size):
    return itertools.cycle([samples[i : i + size] for i in range(0, len(samples), size)])


def _sgd_reference(model, samples, iterations, lr=0.1, momentum=0.9, u=U32):
    """
    Full-batch SGD with momentum on mean(err^2) + mean(|err|), err = w.x + b - y, in float64
    from the float32 start, with first-order bounds on a float32 run that sums the same terms in
    any order (one batch, or micro-batches divided by a power of two and accumulated):
    - err_i: a 3-term dot product, the bias and y: gamma(5) (|w||x| + |b| + |y|), plus the
      parameters' own error through x;
    - a gradient entry, sum_i (2 err_i + sign(err_i)) / n x_ij: n terms of two roundings each
      (the two losses' gradients added, times x), gamma(n + 2) times sum_i |term|, plus 2 dErr_i / n
      through each term; sign(err_i) is exact where |err_i| exceeds its error, asserted;
    - momentum buffer mu v + g (mu rounded, a product, a sum) and p - lr v (lr rounded, a
      product, a difference).
    Returns the parameters (w, b) with their bounds, and per iteration the losses with theirs.
    """
    x = torch.stack([s["x"] for s in samples]).double()
    xt = torch.cat([x, torch.ones(len(samples), 1, dtype=torch.float64)], 1)  # bias: input 1
    y = torch.stack([s["y"] for s in samples]).double()
    n = len(samples)
    p = torch.cat([model.linear.weight.detach().flatten(), model.linear.bias.detach()]).double()
    e_p, v, e_v, losses = torch.zeros(4, dtype=torch.float64), None, None, []
    for _ in range(iterations):
        err = xt @ p - y
        e_err = gamma(5, u) * (xt.abs() @ p.abs() + y.abs()) + xt.abs() @ e_p
        assert (err.abs() > e_err).all(), "a residual within its error of 0: sign(err) in doubt"
        sq, ab = err**2, err.abs()
        g_n = gamma(n + 1, u)  # a square or an |.|, then a mean
        losses.append(
            {
                "loss_sq": (sq.mean(), 2 * (ab * e_err).mean() + g_n * sq.mean()),
                "loss_abs": (ab.mean(), e_err.mean() + g_n * ab.mean()),
            }
        )
        g_i = (2 * err + err.sign()) / n
        g = xt.t() @ g_i
        e_g = xt.abs().t() @ (2 * e_err / n) + gamma(n + 2, u) * (xt.abs().t() @ g_i.abs())
        if v is None:  # torch.optim.SGD's first buffer is a copy of the gradient
            v, e_v = g, e_g
        else:
            v_new = momentum * v + g
            e_v = momentum * e_v + e_g + 2 * u * momentum * v.abs() + u * v_new.abs()
            v = v_new
        p = p - lr * v
        e_p = e_p + lr * e_v + 2 * u * lr * v.abs() + u * p.abs()
    return p, e_p, losses


@pytest.mark.numeric
@pytest.mark.parametrize("steps", [2, 4])
def test_accumulated_step_equals_the_full_batch_step(steps):
    """Both runs, a batch of 8 and micro-batches of 8 / steps, against float64 full-batch SGD."""
    samples = _samples(8)
    full = _Regression()
    ref_params, ref_bound, ref_losses = _sgd_reference(full, samples, 3)
    full_trainer = SimpleTrainer(
        full, _batches(samples, 8), torch.optim.SGD(full.parameters(), lr=0.1, momentum=0.9)
    )
    micro = _Regression()
    inner = SimpleTrainer(
        micro,
        _batches(samples, 8 // steps),
        torch.optim.SGD(micro.parameters(), lr=0.1, momentum=0.9),
    )
    trainer = GradientAccumulationTrainer(inner, steps)
    with EventStorage(0) as full_storage:
        for _ in range(3):
            full_trainer.run_step()
            full_storage.step()
    with EventStorage(0) as storage:
        for _ in range(3):
            trainer.run_step()
            storage.step()
    for name, model in (("full batch", full), ("accumulated", micro)):
        params = torch.cat([model.linear.weight.detach().flatten(), model.linear.bias.detach()])
        assert_within(params, ref_params, ref_bound, "parameters after 3 steps, " + name)
    # logged: the mean over the micro-batches, which for these losses is the full batch's value;
    # total_loss is their sum in Python floats
    ref_losses = [
        dict(d, total_loss=tuple(a + b for a, b in zip(d["loss_sq"], d["loss_abs"])))
        for d in ref_losses
    ]
    for key in ("loss_sq", "loss_abs", "total_loss"):
        ref = torch.stack([d[key][0] for d in ref_losses])
        bound = torch.stack([d[key][1] for d in ref_losses])
        bound = bound + gamma(2, unit_roundoff(torch.float64)) * ref.abs()  # Python's sum
        for name, log in (("full batch", full_storage), ("accumulated", storage)):
            logged = torch.tensor([v for v, _ in log.history(key).values()], dtype=torch.float64)
            assert_within(logged, ref, bound, "logged {}, {}".format(key, name))
    assert (
        trainer.state_dict().keys() == inner.state_dict().keys()
    )  # checkpoints interchange with SimpleTrainer's


def test_accumulation_stops_on_a_non_finite_loss_before_the_step():
    samples = _samples(4)
    samples[3]["y"] = torch.tensor(float("nan"))
    model = _Regression()
    before = [p.detach().clone() for p in model.parameters()]
    trainer = GradientAccumulationTrainer(
        SimpleTrainer(model, _batches(samples, 2), torch.optim.SGD(model.parameters(), lr=0.1)), 2
    )
    with EventStorage(0), pytest.raises(FloatingPointError, match="NaN"):
        trainer.run_step()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.slow
def test_kd_trainer_with_gradient_accumulation(tiny_data_root, tmp_path, rcnn_teacher):
    """A distillation run: micro-batches of IMS_PER_BATCH / steps images, steps of them per
    iteration; resumable."""
    opts = [
        "KD.TEACHER.CONFIG",
        config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
        "KD.TEACHER.WEIGHTS",
        rcnn_teacher,
        "SOLVER.IMS_PER_BATCH",
        4,
        "SOLVER.GRAD_ACCUM_STEPS",
        2,
        "SOLVER.MAX_ITER",
        3,
        "DATASETS.TEST",
        (),
    ]
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
    # resumes to a longer schedule, here without accumulation: the optimizer state is under
    # SimpleTrainer's key
    cfg = tiny_cfg(
        "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
        tmp_path,
        opts + ["SOLVER.GRAD_ACCUM_STEPS", 1, "SOLVER.MAX_ITER", 4],
    )
    trainer = KDTrainer(cfg)
    assert type(trainer._trainer) is SimpleTrainer
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 3 and trainer._trainer.optimizer.state_dict()["state"]
    trainer.train()
    assert read_checkpoint(str(os.path.join(tmp_path, "model_final.pth")))["iteration"] == 3


def test_batch_that_does_not_split(tiny_data_root, tmp_path):
    cfg = tiny_cfg(
        "synthetic/faster_rcnn_R_18_FPN.yaml",
        tmp_path,
        ["SOLVER.IMS_PER_BATCH", 6, "SOLVER.GRAD_ACCUM_STEPS", 4],
    )
    with pytest.raises(
        ValueError,
        match="IMS_PER_BATCH=6 must be a multiple of SOLVER.GRAD_ACCUM_STEPS=4 times the 1 "
        "process",
    ):
        KDTrainer(cfg)

"""The gradient-ratio measurement and the distillation health monitor, on hand-built losses."""

import logging
import math

import pytest
import torch
from detectron2.engine import SimpleTrainer

from kd_det.engine.grad_ratio import measure_grad_ratios, student_parameters
from kd_det.engine.health import DistillHealthMonitor, health_problems

# gradients are exact multiples of float32 vectors, rounded once each (<= eps32 / 2 relative);
# the norms are summed in float64, so a ratio of two norms is within 2 * eps32 of the truth
RTOL = 2 * torch.finfo(torch.float32).eps


class ToyDetector(torch.nn.Module):
    """
    Linear losses of one weight vector w (n,): the detection loss c.w, and distillation terms
    k * (d.w) for the given (k, d): their gradient norms are exactly |c| and |k| |d|.
    """

    def __init__(self, c, terms, n=1000):
        super().__init__()
        self.w = torch.nn.Parameter(torch.ones(n))
        self.kd_adapter = torch.nn.Parameter(torch.ones(3))  # not the student's: left out
        self.c, self.terms = c, terms

    def forward(self, batch=None):
        out = {"loss_cls": (self.c * self.w).sum() * 0.5, "loss_box": (self.c * self.w).sum() * 0.5}
        for name, (k, d) in self.terms.items():
            if d is None:  # a term switched off: a constant 0 without graph
                out[name] = self.w.new_zeros(())
            else:
                out[name] = k * (d * self.w).sum() + 0 * self.kd_adapter.sum()
        return out


def _vectors(n=1000, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, generator=g), torch.randn(n, generator=g)


def test_measured_ratios_are_the_known_ones():
    c, d = _vectors()
    model = ToyDetector(
        c, {"loss_kd_a": (3.0, c), "loss_kd_b": (0.25, d), "loss_kd_off": (1, None)}
    )
    losses = model()
    m = measure_grad_ratios(losses, student_parameters(model))
    assert m.ratios["loss_kd_a"] == pytest.approx(3.0, rel=RTOL)
    expected = 0.25 * d.double().norm().item() / c.double().norm().item()
    assert m.ratios["loss_kd_b"] == pytest.approx(expected, rel=RTOL)
    assert m.norms["loss_kd_off"] == 0 and not m.active["loss_kd_off"] and m.active["loss_kd_a"]
    # .grad untouched, and the graph kept for the trainer's own backward
    assert model.w.grad is None and model.kd_adapter.grad is None
    sum(losses.values()).backward()
    assert torch.allclose(model.w.grad, c + 3.0 * c + 0.25 * d)


def test_amp_scale_leaves_ratios():
    c, d = _vectors()
    model = ToyDetector(c, {"loss_kd_b": (0.25, d)})
    plain = measure_grad_ratios(model(), student_parameters(model)).ratios["loss_kd_b"]
    scaled = measure_grad_ratios(model(), student_parameters(model), scale=2.0**16)
    assert scaled.ratios["loss_kd_b"] == pytest.approx(plain, rel=RTOL)


def test_overflowing_amp_scale_backs_off_as_the_grad_scaler_does():
    """fp16 gradients of |c| up to ~4 overflow at the scaler's first scale, 2**16 (fp16's max is
    65504): the measure halves the scale until they are finite, as the grad scaler backs off, and
    reports the ratio, not an infinite detection gradient.  Scaling by powers of two is exact in
    fp16, so the ratio is that of the fp16 vectors' norms (summed in float64)."""
    c, d = _vectors()
    c, d = c.half(), d.half()
    w = torch.nn.Parameter(torch.ones(c.numel(), dtype=torch.float16))
    assert not torch.isfinite(c.abs().max() * 2.0**16)
    losses = {"loss_cls": (c * w).sum(), "loss_kd_b": 0.25 * (d * w).sum()}
    m = measure_grad_ratios(losses, [w], scale=2.0**16)
    assert math.isfinite(float(m.norms["loss_kd_b"]))
    expected = 0.25 * d.double().norm().item() / c.double().norm().item()
    assert m.ratios["loss_kd_b"] == pytest.approx(expected, rel=RTOL)


def test_problems_zero_nonfinite_dominating_vanishing():
    c, d = _vectors()
    model = ToyDetector(
        c,
        {
            "loss_kd_zero": (0.0, d),
            "loss_kd_inf": (float("inf"), d),
            "loss_kd_big": (100.0, c),
            "loss_kd_tiny": (1e-5, c),
            "loss_kd_fine": (1.0, c),
            "loss_kd_off": (1.0, None),
        },
    )
    m = measure_grad_ratios(model(), student_parameters(model))
    kinds = {p.term: p.kind for p in health_problems(m, dominating=10, vanishing=1e-3)}
    assert kinds == {
        "loss_kd_zero": "zero",
        "loss_kd_inf": "non-finite",
        "loss_kd_big": "dominating",
        "loss_kd_tiny": "vanishing",
    }


def _train(model, hooks, iters):
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: the losses stay the same
    trainer = SimpleTrainer(model, [None] * 1000, opt)
    trainer.register_hooks(hooks)
    trainer.train(0, iters)
    return trainer


def test_monitor_warns_logs_every_period(caplog):
    c, d = _vectors()
    model = ToyDetector(c, {"loss_kd_zero": (0.0, d), "loss_kd_big": (100.0, c)})
    monitor = DistillHealthMonitor(period=2)
    with caplog.at_level(logging.WARNING, logger="kd_det.engine.health"):
        trainer = _train(model, [monitor], 5)
    hist = trainer.storage.history("kd_grad_ratio/loss_kd_big")
    assert [it for _, it in hist.values()] == [0, 2, 4]  # every 2nd step
    assert hist.latest() == pytest.approx(100.0, rel=RTOL)
    text = caplog.text
    # each problem warned once (it persists), with its fix
    assert text.count("loss_kd_zero: zero") == 1 and "teacher loaded" in text
    assert text.count("loss_kd_big: dominating") == 1 and "lower the term's weight" in text
    # and in the storage, which metrics.json is written from
    dominating = trainer.storage.history("kd_health/loss_kd_big/dominating")
    assert [it for _, it in dominating.values()] == [0, 2, 4]
    assert dominating.latest() == pytest.approx(100.0, rel=RTOL)
    assert "kd_health/loss_kd_zero/zero" in trainer.storage.latest()


def test_monitor_flags_ap_drop(caplog):
    c, _ = _vectors()
    model = ToyDetector(c, {"loss_kd_a": (1.0, c)})
    monitor = DistillHealthMonitor(period=100, ap_drop=0.5)

    from detectron2.engine import HookBase

    class PutAP(HookBase):
        def after_step(self):
            ap = {1: 40.0, 3: 30.0, 5: 10.0}.get(self.trainer.iter)
            if ap is not None:
                self.trainer.storage.put_scalars(**{"val/bbox/AP": ap, "teacher/bbox/AP": 1.0})

    with caplog.at_level(logging.WARNING, logger="kd_det.engine.health"):
        trainer = _train(model, [PutAP(), monitor], 6)
    assert monitor.ap_drops == [("val/bbox/AP", 5, 30.0, 10.0)]
    drop = trainer.storage.latest()["kd_health/ap_drop.val.bbox.AP"]
    assert drop == (pytest.approx(10.0 / 30.0), 5)
    assert "fell from 30.00" in caplog.text
    assert monitor.state_dict()["last_ap"] == {"val/bbox/AP": [10.0, 5]}
    assert math.isfinite(monitor.last.det_norm)


def test_scheduled_terms_from_config_and_model():
    """LAKD's stage starts (KD.LAKD.START_ITERS; a built model's kd_lakd) schedule loss_kd_lakd."""
    from types import SimpleNamespace

    from kd_det import get_kd_cfg
    from kd_det.engine.health import model_scheduled_terms, scheduled_terms, term_started

    cfg = get_kd_cfg()
    assert scheduled_terms(cfg) == {}
    cfg.KD.LAKD.ENABLED = True
    assert scheduled_terms(cfg) == {}  # every stage from iteration 0
    cfg.KD.LAKD.START_ITERS = [0, 10, 20, 30]
    assert scheduled_terms(cfg) == {"loss_kd_lakd": [0, 10, 20, 30]}
    lakd = SimpleNamespace(start_iters=[5, 10], loss=SimpleNamespace(short_name="lakd"))
    model = SimpleNamespace(module=SimpleNamespace(kd_lakd=lakd))  # a DDP wrapper
    starts = model_scheduled_terms(model)
    assert starts == {"loss_kd_lakd": [5, 10]}
    assert not term_started("loss_kd_lakd", 4, starts) and term_started("loss_kd_lakd", 5, starts)
    assert term_started("loss_kd_ssim", 0, starts)


def test_monitor_warns_on_a_non_finite_term_before_the_trainer_stops(caplog):
    c, d = _vectors()
    model = ToyDetector(c, {"loss_kd_nan": (float("nan"), d)})
    with caplog.at_level(logging.WARNING, logger="kd_det.engine.health"):
        with pytest.raises(FloatingPointError):  # Detectron2's own stop, after the monitor
            _train(model, [DistillHealthMonitor(period=1)], 2)
    assert "loss_kd_nan: non-finite" in caplog.text and "lower its weight" in caplog.text

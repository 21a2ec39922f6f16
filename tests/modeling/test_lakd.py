"""
LAKD (KD.LAKD, LocalAttentionDistiller): the activation-map loss against a float64
reference, gradients of a stage's loss to that stage only (and of the detection loss to all),
the schedule, and both synthetic configs training.
"""

import json
import os

import pytest
import torch
from conftest import config_path, tiny_cfg
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.utils.events import EventStorage
from tolerances import Bounded, assert_bounded, feature_loss_bounded
from torch import nn

from kd_det.engine import KDTrainer
from kd_det.losses import NonDirectionalAttentionLoss, non_directional_attention
from kd_det.modeling import LocalAttentionDistiller, ModuleOutputRecorder
from kd_det.modeling.distillers.local_attention import backbone_stage, running_stats_untouched

STAGES = ["res2", "res3", "res4", "res5"]
LAKD_CONFIGS = {
    "rcnn": "synthetic/distill/lakd_faster_rcnn_R50_to_R18.yaml",
    "retina": "synthetic/distill/lakd_retinanet_R50_to_R18.yaml",
}
TEACHER_CONFIGS = {
    "rcnn": "synthetic/faster_rcnn_R_50_FPN.yaml",
    "retina": "synthetic/retinanet_R_50_FPN.yaml",
}


# --- the activation-map loss ------------------------------------------------------------


def _bounded_map(x: torch.Tensor, p: float, size: int) -> Bounded:
    """non_directional_attention in running error analysis: (N, S, S), float64 values."""
    n, _, h, w = x.shape
    a = (Bounded.exact(x).abs() ** p).mean(dim=1)  # (N, H, W)
    # adaptive average pooling of divisible sizes: the mean of each (H/S, W/S) block
    a = a.map(lambda v: v.reshape(n, size, h // size, size, w // size)).mean(dim=(2, 4))
    norm = (a * a).sum(dim=(1, 2)).sqrt().clamp_min(1e-12)
    return a / norm.map(lambda v: v[:, None, None])


@pytest.mark.numeric
@pytest.mark.parametrize("p", [2.0, 3.0])
def test_activation_map_loss_matches_float64(p):
    """
    float32 NonDirectionalAttentionLoss against the float64 evaluation of the same formula,
    within its running error bound (tolerances.Bounded: the powers, channel mean, pooling,
    norm, division, squared difference and mean over images); student and teacher differ in
    channels.
    """
    g = torch.Generator().manual_seed(0)
    student = torch.randn(3, 5, 16, 12, generator=g)
    teacher = 4.0 * torch.randn(3, 11, 16, 12, generator=g)
    loss = NonDirectionalAttentionLoss(p=p, map_size=4)
    got = loss([student], [teacher], level_weights=[1.0])
    qs, qt = _bounded_map(student, p, 4), _bounded_map(teacher, p, 4)
    diff = qs - qt
    lmap = diff * diff * 16.0  # times S*S: the mean over positions is their sum
    expected = feature_loss_bounded([lmap], [1.0])
    assert_bounded(got, expected, "loss p={}".format(p))
    # and against the float64 run of the implementation itself (a second formula check)
    ref64 = loss([student.double()], [teacher.double()], level_weights=[1.0])
    assert_bounded(got, expected, "loss vs float64 run", reference=ref64)
    assert 0.0 < got.item() <= 2.0


def test_activation_map_is_non_directional_and_channel_agnostic():
    """Sign-free (x and -x, or flipped channels, give the same map exactly), scale-free,
    and 0 for equal maps across channel counts; its gradient is right (gradcheck)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 6, 8, 8, generator=g)
    loss = NonDirectionalAttentionLoss(p=2.0, map_size=4)
    # exactly: |x| is |-x|, and a channel mean of the same values in the same order
    signs = torch.tensor([1.0, -1.0, 1.0, -1.0, -1.0, 1.0])[None, :, None, None]
    assert torch.equal(non_directional_attention(x, 2.0, 4), non_directional_attention(-x, 2.0, 4))
    assert torch.equal(
        non_directional_attention(x, 2.0, 4), non_directional_attention(x * signs, 2.0, 4)
    )
    assert loss([x * signs], [-x], level_weights=[1.0]).item() == 0.0
    # a teacher of 2x the channels with the same per-position energy: maps equal up to rounding
    wide = torch.cat([x, x.flip(1)], dim=1) * 3.0
    assert loss([x], [wide], level_weights=[1.0]).item() < 1e-6
    y = torch.randn(2, 5, 4, 4, generator=g, dtype=torch.float64)
    xs = x[:, :3, :4, :4].double().requires_grad_()
    assert torch.autograd.gradcheck(
        lambda s: NonDirectionalAttentionLoss(p=3.0, map_size=2)([s], [y], level_weights=[1.0]),
        (xs,),
    )
    with pytest.raises(ValueError, match="KD.LAKD.P"):
        NonDirectionalAttentionLoss(p=0.5)


# --- local modules on tiny hand-built backbones ----------------------------------------------


class _TinyResNet(nn.Module):
    """A stem and four stages res2..res5 (conv, BatchNorm, ReLU), stride 2 each after res2."""

    def __init__(self, widths):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], 3, padding=1)
        self.stage_names = tuple(STAGES)
        channels = widths[0]
        for k, (name, width) in enumerate(zip(STAGES, widths)):
            stride = 1 if k == 0 else 2
            conv = nn.Conv2d(channels, width, 3, stride=stride, padding=1)
            self.add_module(name, nn.Sequential(conv, nn.BatchNorm2d(width), nn.ReLU()))
            channels = width

    def forward(self, x):
        x = self.stem(x)
        out = {}
        for name in self.stage_names:
            x = getattr(self, name)(x)
            out[name] = x
        return out


class _TinyFPN(nn.Module):
    """An FPN-like backbone: ``bottom_up`` stages and a 1x1 output conv on each (the 'FPN')."""

    def __init__(self, widths):
        super().__init__()
        self.bottom_up = _TinyResNet(widths)
        self.lateral = nn.ModuleList(nn.Conv2d(w, 4, 1) for w in widths)

    def forward(self, x):
        feats = self.bottom_up(x)
        return {"p" + k[-1]: conv(feats[k]) for k, conv in zip(STAGES, self.lateral)}


def _tiny_pair():
    torch.manual_seed(0)
    student = _TinyFPN([4, 6, 8, 10]).train()
    teacher = _TinyFPN([8, 12, 16, 20]).eval().requires_grad_(False)
    return student, teacher


def _lakd_losses(distiller, student, teacher, x, iteration):
    """What the meta-architecture does: record, run both, distil."""
    s_rec = ModuleOutputRecorder(student, distiller.stage_input_sources(student, prefix=""))
    t_rec = ModuleOutputRecorder(teacher, distiller.stage_output_sources(teacher))
    try:
        out = student(x)
        with torch.no_grad():
            teacher(x)
        recorded, t_out = s_rec.pop(), t_rec.pop()
        stages = {s: backbone_stage(student, s) for s in distiller.stages}
        inputs = {s: recorded["lakd_input_" + s] for s in distiller.stages}
        return out, distiller(stages, inputs, t_out, iteration)["loss_kd_lakd"]
    finally:
        s_rec.remove()
        t_rec.remove()


def _grads(loss, model):
    """name -> gradient of ``loss`` (zeros where it does not reach)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    grads = torch.autograd.grad(loss, [p for _, p in named], retain_graph=True, allow_unused=True)
    return {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, grads)}


def _reached(grads):
    """The stages (or 'other') whose parameters got a non-zero gradient."""
    out = set()
    for name, g in grads.items():
        if g.abs().sum() > 0:
            hit = [s for s in STAGES if ".{}.".format(s) in "." + name]
            out.add(hit[0] if hit else "other:" + name)
    return out


@pytest.mark.parametrize("stage", STAGES)
def test_stage_loss_reaches_its_stage_only(stage):
    """
    A stage's LAKD loss gives gradients to that stage's parameters only (the others', the
    stem's and the 'FPN's exactly zero); the detection loss of the same pass reaches every
    stage; the second run leaves BatchNorm's running statistics as the normal pass left them.
    """
    student, teacher = _tiny_pair()
    x = torch.randn(2, 3, 32, 32)
    distiller = LocalAttentionDistiller(
        stages=[stage], loss=NonDirectionalAttentionLoss(p=2.0, map_size=2), weight=1.0
    )
    stats = {}

    def keep_stats(module, inputs, output):  # the BN buffers right after the normal pass
        stats.update({k: v.clone() for k, v in student.state_dict().items() if "running" in k})

    handle = student.bottom_up.register_forward_hook(keep_stats)
    out, loss = _lakd_losses(distiller, student, teacher, x, 0)
    handle.remove()
    assert loss.item() > 0
    assert _reached(_grads(loss, student)) == {stage}
    detection = sum(v.pow(2).mean() for v in out.values())
    assert _reached(_grads(detection, student)) >= set(STAGES)
    after = {k: v for k, v in student.state_dict().items() if "running" in k}
    assert all(torch.equal(stats[k], after[k]) for k in stats)


def test_without_the_stop_gradient_the_loss_would_reach_earlier_stages():
    """The control of the test above: the same loss on the normal pass's stage output (no
    second run on a detached input) reaches every stage before it, and a plain second run
    counts the batch twice in BatchNorm's statistics."""
    student, teacher = _tiny_pair()
    x = torch.randn(2, 3, 32, 32)
    out = student.bottom_up(x)
    with torch.no_grad():
        t = teacher.bottom_up(x)
    loss = NonDirectionalAttentionLoss(p=2.0, map_size=2)([out["res4"]], [t["res4"]])
    reached = _reached(_grads(loss, student))
    assert {"res2", "res3", "res4"} <= reached and "res5" not in reached
    assert {"other:bottom_up.stem.weight", "other:bottom_up.stem.bias"} <= reached
    stage = student.bottom_up.res3
    before = stage[1].running_mean.clone()
    with running_stats_untouched(stage):
        stage(out["res2"].detach())
    assert torch.equal(stage[1].running_mean, before)
    stage(out["res2"].detach())
    assert not torch.equal(stage[1].running_mean, before)


def test_schedule_switches_stages_on_at_their_iterations():
    distiller = LocalAttentionDistiller(
        stages=STAGES,
        start_iters=[2, 5, 5, 9],
        loss=NonDirectionalAttentionLoss(map_size=2),
        weight=0.5,
    )
    assert [distiller.active_stages(i) for i in (0, 1, 2, 4, 5, 8, 9, 100)] == [
        [],
        [],
        ["res2"],
        ["res2"],
        ["res2", "res3", "res4"],
        ["res2", "res3", "res4"],
        STAGES,
        STAGES,
    ]
    student, teacher = _tiny_pair()
    x = torch.randn(2, 3, 32, 32)
    _, zero = _lakd_losses(distiller, student, teacher, x, 1)
    assert zero.item() == 0.0 and not zero.requires_grad
    # the stages' terms add up: at iteration 5 the sum of the three stages' own losses
    _, loss = _lakd_losses(distiller, student, teacher, x, 5)
    assert _reached(_grads(loss, student)) == {"res2", "res3", "res4"}
    parts = []
    for s in ["res2", "res3", "res4"]:
        one = LocalAttentionDistiller(stages=[s], loss=distiller.loss, weight=0.5)
        parts.append(_lakd_losses(one, student, teacher, x, 5)[1])
    assert torch.allclose(loss, sum(parts), rtol=1e-6, atol=0)
    with pytest.raises(ValueError, match="START_ITERS"):
        LocalAttentionDistiller(stages=STAGES, start_iters=[0, 1], loss=distiller.loss, weight=1.0)


# --- the meta-architectures ------------------------------------------------------------------


def _lakd_cfg(kind, teacher, out, opts=()):
    return tiny_cfg(
        LAKD_CONFIGS[kind],
        out,
        [
            "KD.TEACHER.CONFIG",
            config_path(TEACHER_CONFIGS[kind]),
            "KD.TEACHER.WEIGHTS",
            teacher,
        ]
        + list(opts),
    )


@pytest.mark.parametrize("kind", ["rcnn", "retina"])
def test_detector_schedule_and_gradients(
    kind, tiny_data_root, tmp_path, rcnn_teacher, retina_teacher
):
    """
    In a Distill* student: at each iteration, loss_kd_lakd reaches exactly the stages
    switched on by then (backbone.bottom_up.resK; nothing in the stem, FPN or heads), and the
    detection loss reaches every stage.
    """
    teacher = rcnn_teacher if kind == "rcnn" else retina_teacher
    cfg = _lakd_cfg(kind, teacher, tmp_path, ["KD.LAKD.START_ITERS", [0, 1, 1, 3]])
    model = build_model(cfg).train()
    batch = next(iter(build_detection_train_loader(cfg)))
    expected = {0: {"res2"}, 1: {"res2", "res3", "res4"}, 3: set(STAGES)}
    for iteration, stages in expected.items():
        with EventStorage(iteration):
            losses = model(batch)
        lakd = losses.pop("loss_kd_lakd")
        assert lakd.item() > 0
        assert _reached(_grads(lakd, model)) == stages, iteration
    detection = sum(losses.values())
    assert _reached(_grads(detection, model)) >= set(STAGES)


def test_lakd_errors(tiny_data_root, tmp_path, rcnn_teacher):
    with pytest.raises(ValueError, match="frozen"):
        build_model(_lakd_cfg("rcnn", rcnn_teacher, tmp_path, ["MODEL.BACKBONE.FREEZE_AT", 2]))
    with pytest.raises(ValueError, match="no submodule 'bottom_up.res6'"):
        build_model(
            _lakd_cfg(
                "rcnn",
                rcnn_teacher,
                tmp_path,
                ["KD.LAKD.STAGES", ["res6"], "KD.LAKD.START_ITERS", []],
            )
        )
    with pytest.raises(ValueError, match="KD.LAKD"):
        build_model(
            _lakd_cfg(
                "rcnn",
                rcnn_teacher,
                tmp_path,
                [
                    "KD.TEACHER.CONFIG",
                    "",
                    "KD.MULTI_TEACHER.CONFIGS",
                    [config_path(TEACHER_CONFIGS["rcnn"])] * 2,
                    "KD.MULTI_TEACHER.WEIGHTS",
                    [rcnn_teacher] * 2,
                    "KD.FEATURE.ENABLED",
                    True,
                ],
            )
        )


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["rcnn", "retina"])
def test_synthetic_lakd_config_trains(kind, tiny_data_root, tmp_path, rcnn_teacher, retina_teacher):
    """The shipped synthetic LAKD configs train 2 iterations (stages switched on at 0 and 1)."""
    teacher = rcnn_teacher if kind == "rcnn" else retina_teacher
    cfg = _lakd_cfg(
        kind,
        teacher,
        tmp_path,
        ["SOLVER.MAX_ITER", 2, "KD.LAKD.START_ITERS", [0, 1, 1, 1], "DATASETS.TEST", ()],
    )
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    with open(os.path.join(cfg.OUTPUT_DIR, "metrics.json")) as f:
        logged = [json.loads(line) for line in f if line.strip()]
    values = [r["loss_kd_lakd"] for r in logged if "loss_kd_lakd" in r]
    assert values and all(v > 0 for v in values)


def test_run_summary_names_lakd():
    """MODEL_ZOO.md's method column (kd_det.config.run) names LAKD, and the feature loss is off."""
    from kd_det import get_kd_cfg, merge_kd_config
    from kd_det.config.run import distillation_summary

    for config in LAKD_CONFIGS.values():
        cfg = merge_kd_config(get_kd_cfg(), config_path(config))
        assert distillation_summary(cfg).methods == ("LAKD",)


@pytest.mark.slow
def test_overhead_benchmark_runs():
    """benchmarks/bench_lakd_overhead.py times both settings (one tiny step each)."""
    import runpy

    from conftest import REPO

    script = runpy.run_path(os.path.join(REPO, "benchmarks", "bench_lakd_overhead.py"))
    result = script["main"](["--steps", "1", "--warmup", "0", "--batch", "1", "--size", "64"])
    assert result["off"]["median_ms"] > 0 and result["lakd"]["median_ms"] > 0
    assert set(result) >= {"extra_median_ms", "extra_median_cpu_ms"}


def test_lazy_config_form_is_the_yacs_one():
    """``L(LocalAttentionDistiller)(...)`` (docs/methods.md's LazyConfig piece) builds what
    KD.LAKD builds."""
    from detectron2.config import LazyCall as L
    from detectron2.config import instantiate

    from kd_det import get_kd_cfg, merge_kd_config

    lazy = instantiate(
        L(LocalAttentionDistiller)(
            stages=STAGES,
            start_iters=[0, 20, 40, 60],
            loss=L(NonDirectionalAttentionLoss)(p=2.0, map_size=8),
            weight=1.0,
        )
    )
    yacs = LocalAttentionDistiller(merge_kd_config(get_kd_cfg(), config_path(LAKD_CONFIGS["rcnn"])))
    for d in (lazy, yacs):
        assert (d.stages, d.start_iters, d.weight, d.loss.p, d.loss.map_size) == (
            STAGES,
            [0, 20, 40, 60],
            1.0,
            2.0,
            8,
        )
    assert list(lazy.state_dict()) == []  # nothing to save or export

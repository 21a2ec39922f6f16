"""Automatic distillation weights on hand-built losses: the target ratio, resume, DDP."""

import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from detectron2.engine import SimpleTrainer
from detectron2.utils.events import EventStorage
from test_health_monitor import RTOL, ToyDetector, _vectors

from kd_det.engine.auto_weight import AutoWeightHook
from kd_det.engine.grad_ratio import measure_grad_ratios, student_parameters


def _trainer(model, hooks, lr=0.0):
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    trainer = SimpleTrainer(model, [None] * 1000, opt)
    trainer.register_hooks(hooks)
    return trainer


def _ratio_after(model, hook):
    """The gradient-norm ratios of the loss dict as the trainer sees it (hook applied)."""
    with EventStorage(10**6):
        losses = hook._on_losses(model())
        return measure_grad_ratios(losses, student_parameters(model)).ratios


def test_weights_reach_target_ratio_and_are_logged():
    c, d = _vectors()
    model = ToyDetector(c, {"loss_kd_a": (7.0, d), "loss_kd_b": (0.001, c)})
    hook = AutoWeightHook(fraction=0.5, iters=3)
    trainer = _trainer(model, [hook])
    trainer.train(0, 5)
    ratios = _ratio_after(model, hook)
    assert ratios["loss_kd_a"] == pytest.approx(0.5, rel=4 * RTOL)
    assert ratios["loss_kd_b"] == pytest.approx(0.5, rel=4 * RTOL)
    assert hook.scales["loss_kd_b"] == pytest.approx(500.0, rel=4 * RTOL)
    # calibrated over iterations 0-2 only; logged
    hist = trainer.storage.history("kd_auto_weight/loss_kd_a")
    assert [it for _, it in hist.values()] == [0, 1, 2]
    # the logged loss is the scaled one
    assert trainer.storage.history("loss_kd_b").latest() == pytest.approx(
        0.001 * 500 * c.dot(model.w.detach()).item(), rel=1e-5
    )


def test_weights_restored_from_checkpoint_and_not_recalibrated():
    c, d = _vectors()
    model = ToyDetector(c, {"loss_kd_a": (7.0, d)})
    hook = AutoWeightHook(fraction=0.5, iters=2)
    trainer = _trainer(model, [hook], lr=0.01)
    trainer.train(0, 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "ckpt.pth")
        torch.save({"trainer": trainer.state_dict()}, path)
        saved = torch.load(path)["trainer"]
    assert saved["hooks"]["AutoWeightHook"]["scales"] == hook.scales
    # another model (other losses): a resumed run keeps the saved factors
    other = ToyDetector(c * 10, {"loss_kd_a": (7.0, d)})
    resumed = AutoWeightHook(fraction=0.5, iters=2)
    trainer2 = _trainer(other, [resumed])
    trainer2.load_state_dict(saved)
    trainer2.train(3, 5)
    assert resumed.scales == hook.scales


def test_scheduled_term_calibrated_at_each_start():
    c, d = _vectors()
    model = ToyDetector(c, {"loss_kd_lakd": (1.0, None), "loss_kd_a": (2.0, c)})
    hook = AutoWeightHook(fraction=0.5, iters=2, start_iters={"loss_kd_lakd": [3, 6]})
    trainer = _trainer(model, [hook])

    def schedule_hook(losses):
        """LAKD's progressive schedule: off before 3, one stage from 3, two from 6."""
        it = trainer.storage.iter
        if it >= 3:
            k = 3.0 if it < 6 else 30.0  # the second stage makes the term 10x stronger
            losses["loss_kd_lakd"] = k * (d * model.w).sum()
        return losses

    from kd_det.engine.loss_tap import LossDictTap

    tap = LossDictTap(schedule_hook)  # registered first: runs before the auto weights
    tap.attach(model)
    trainer.train(0, 9)
    hist = trainer.storage.history("kd_auto_weight/loss_kd_lakd")
    assert [it for _, it in hist.values()] == [3, 4, 6, 7]
    ratios = _ratio_after(model, hook)
    assert ratios["loss_kd_lakd"] == pytest.approx(0.5, rel=4 * RTOL)
    assert ratios["loss_kd_a"] == pytest.approx(0.5, rel=4 * RTOL)


def _ddp_worker(rank, port, result_file):
    dist.init_process_group(
        "gloo", init_method="tcp://127.0.0.1:{}".format(port), world_size=2, rank=rank
    )
    torch.manual_seed(0)
    c, d = _vectors(seed=rank)  # other data on each process: other gradient norms
    model = ToyDetector(c, {"loss_kd_a": (7.0, d)})
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    hook = AutoWeightHook(fraction=0.5, iters=2)
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    trainer = SimpleTrainer(ddp, [None] * 1000, opt)
    trainer.register_hooks([hook])
    trainer.train(0, 3)
    out = [torch.tensor([hook.scales["loss_kd_a"]]), model.w.detach().clone()]
    gathered = [[None, None], [None, None]]
    dist.all_gather_object(gathered, out)
    if rank == 0:
        torch.save(gathered, result_file)
    dist.destroy_process_group()


def test_gradient_accumulation_measures_first_micro_batch():
    from kd_det.engine.accumulation import GradientAccumulationTrainer

    c, d = _vectors()
    model = ToyDetector(c, {"loss_kd_a": (7.0, d)})
    hook = AutoWeightHook(fraction=0.5, iters=2)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    trainer = GradientAccumulationTrainer(SimpleTrainer(model, [None] * 1000, opt), steps=3)
    trainer.register_hooks([hook])
    trainer.train(0, 3)
    hist = trainer.storage.history("kd_auto_weight/loss_kd_a")
    assert [it for _, it in hist.values()] == [0, 1]
    assert _ratio_after(model, hook)["loss_kd_a"] == pytest.approx(0.5, rel=4 * RTOL)


def test_ddp_same_weights_on_every_process_and_gradients_all_reduced(tmp_path):
    """
    Two gloo processes: the measurement (autograd.grad inside DDP's forward) leaves DDP's
    all-reduce alone (the weights stay equal on both), and both use one factor: the mean
    detection norm over the mean term norm.
    """
    from detectron2.engine.launch import _find_free_port

    result = str(tmp_path / "ddp.pt")
    mp.spawn(_ddp_worker, args=(_find_free_port(), result), nprocs=2)
    (s0, w0), (s1, w1) = torch.load(result)
    assert s0.item() == s1.item()
    assert torch.equal(w0, w1) and not torch.equal(w0, torch.ones_like(w0))
    norms = [
        (_vectors(seed=r)[0].double().norm(), 7 * _vectors(seed=r)[1].double().norm())
        for r in (0, 1)
    ]
    # the weights move, so the norms of steps 0 and 1 differ: only the same-step mean is checked
    expected = 0.5 * (norms[0][0] + norms[1][0]) / (norms[0][1] + norms[1][1])
    assert s0.item() == pytest.approx(expected.item(), rel=4 * RTOL)


@pytest.mark.slow
def test_kd_trainer_saves_and_resumes_auto_weights(tiny_data_root, tmp_path, rcnn_teacher):
    """
    Through KDTrainer: the monitor (on by default) and the automatic weights log to
    metrics.json; the factors are in the checkpoint and a --resume keeps them.
    """
    import json

    from conftest import config_path, tiny_cfg

    from kd_det.checkpoint import read_checkpoint
    from kd_det.engine import KDTrainer
    from kd_det.engine.health import DistillHealthMonitor

    opts = [
        "KD.TEACHER.CONFIG", config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
        "KD.TEACHER.WEIGHTS", rcnn_teacher,
        "KD.AUTO_WEIGHT.ENABLED", True, "KD.AUTO_WEIGHT.ITERS", 1, "KD.AUTO_WEIGHT.FRACTION", 0.25,
        "KD.MONITOR.PERIOD", 2, "SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 3,
        "DATASETS.TEST", (),
    ]  # fmt: skip
    cfg = tiny_cfg("synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml", tmp_path, opts)
    trainer = KDTrainer(cfg)
    kinds = [type(h) for h in trainer._hooks]
    assert kinds.index(AutoWeightHook) < kinds.index(DistillHealthMonitor)
    trainer.resume_or_load(resume=False)
    trainer.train()
    hook = next(h for h in trainer._hooks if isinstance(h, AutoWeightHook))
    monitor = next(h for h in trainer._hooks if isinstance(h, DistillHealthMonitor))
    scale = hook.scales["loss_kd_ssim"]
    # the monitor measures the re-weighted term after the weights: at iteration 0, the one
    # calibration step, on the same loss dict, exactly the fraction (float32 gradients of the
    # rescaled term: a few units of roundoff); later, on other batches, only near it
    history = trainer.storage.history
    first = history("kd_grad_ratio/loss_kd_ssim").values()[0]
    assert first[1] == 0 and first[0] == pytest.approx(0.25, rel=1e-5)
    assert monitor.last is not None
    with open(os.path.join(tmp_path, "metrics.json")) as f:
        metrics = [json.loads(line) for line in f]
    assert [i for _, i in history("kd_grad_ratio/loss_kd_ssim").values()] == [0, 2]
    assert [i for _, i in history("kd_auto_weight/loss_kd_ssim").values()] == [0]
    # Detectron2's JSONWriter writes the latest value of each key at each write (here one)
    assert [m["iteration"] for m in metrics if "kd_grad_ratio/loss_kd_ssim" in m] == [2]
    assert [m["iteration"] for m in metrics if "kd_auto_weight/loss_kd_ssim" in m] == [0]
    saved = read_checkpoint(os.path.join(tmp_path, "model_final.pth"))
    assert saved["trainer"]["hooks"]["AutoWeightHook"]["scales"] == {"loss_kd_ssim": scale}
    cfg = tiny_cfg(
        "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
        tmp_path,
        opts + ["SOLVER.MAX_ITER", 4],
    )
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=True)
    resumed = next(h for h in trainer._hooks if isinstance(h, AutoWeightHook))
    assert trainer.start_iter == 3 and resumed.scales == {"loss_kd_ssim": scale}
    trainer.train()
    assert resumed.scales == {"loss_kd_ssim": scale}  # not calibrated again

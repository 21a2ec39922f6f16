"""Crash safety: atomic checkpoints, and resuming a training killed with SIGKILL."""

import errno
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import REPO, config_path
from detectron2.checkpoint import DetectionCheckpointer
from test_train import SMALL, _metrics
from torch import nn

from kd_det.checkpoint import AtomicDetectionCheckpointer, read_checkpoint


def test_checkpoint_interrupted_mid_write_leaves_previous_intact(tmp_path, monkeypatch):
    model = nn.Linear(3, 2)
    ckpt = AtomicDetectionCheckpointer(model, str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()

    def crash(obj, f, *a, **k):
        f.write(b"partial")
        raise KeyboardInterrupt("killed during save")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save("model_0000002", iteration=2)
    monkeypatch.undo()
    assert not (tmp_path / "model_0000002.pth").exists()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert not [p for p in os.listdir(tmp_path) if ".tmp" in p]
    # and Detectron2 resumes from it
    assert (
        DetectionCheckpointer(nn.Linear(3, 2), str(tmp_path)).resume_or_load("", resume=True)[
            "iteration"
        ]
        == 1
    )


def _open_on_a_disk_with(free_bytes):
    """``open`` whose binary files raise ENOSPC, as a full disk does, once ``free_bytes`` are
    written."""
    real_open = open

    class FullDiskFile:
        def __init__(self, f):
            self._f, self._left = f, free_bytes

        def write(self, data):
            if len(data) > self._left:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            self._left -= len(data)
            return self._f.write(data)

        def __getattr__(self, name):
            return getattr(self._f, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._f.close()

    def fake_open(path, mode="r", *args, **kwargs):
        f = real_open(path, mode, *args, **kwargs)
        return FullDiskFile(f) if "b" in mode and "w" in mode else f

    return fake_open


def test_full_disk_during_save_names_the_intact_checkpoint(tmp_path, monkeypatch):
    import kd_det.checkpoint.atomic as checkpoint_module

    ckpt = AtomicDetectionCheckpointer(nn.Linear(3, 2), str(tmp_path))
    ckpt.save("model_0000001", iteration=1)
    before = (tmp_path / "model_0000001.pth").read_bytes()
    big = AtomicDetectionCheckpointer(nn.Linear(300, 300), str(tmp_path))
    # module global shadows the builtin: only the checkpointer's writes see the full disk
    monkeypatch.setattr(checkpoint_module, "open", _open_on_a_disk_with(4096), raising=False)
    # torch.save's zip writer turns the write's OSError into "RuntimeError: unexpected pos";
    # the user must see the disk, the file, what is intact and how to go on instead
    with pytest.raises(OSError) as info:
        big.save("model_0000002", iteration=2)
    monkeypatch.undo()
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC
    assert "No space left on device" in message and "model_0000002.pth" in message
    assert str(tmp_path / "model_0000001.pth") in message and "--resume" in message
    assert (tmp_path / "model_0000001.pth").read_bytes() == before
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000001.pth"]


@pytest.mark.slow
def test_training_killed_with_sigkill_resumes(tmp_path):
    out = tmp_path / "run"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), PYTHONUNBUFFERED="1")
    args = [
        sys.executable,
        os.path.join(REPO, "tools", "train_net.py"),
        "--config-file",
        config_path("synthetic/retinanet_R_18_FPN.yaml"),
        "SOLVER.CHECKPOINT_PERIOD",
        "2",
        "SOLVER.MAX_ITER",
        "12",
        "OUTPUT_DIR",
        str(out),
        "DATASETS.TEST",
        "()",
    ] + SMALL
    proc = subprocess.Popen(
        args, cwd=str(tmp_path), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    deadline = time.time() + 600
    # kill as soon as a second periodic checkpoint exists (training is mid-run, maybe mid-save)
    while time.time() < deadline and not (out / "model_0000003.pth").exists():
        if proc.poll() is not None:
            pytest.fail(
                "training ended before it could be killed (exit {})".format(proc.returncode)
            )
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "model_final.pth").exists()
    last = (out / "last_checkpoint").read_text().strip()
    # a complete, loadable file (the tag may still name the previous one if the kill fell between
    # the two renames)
    killed_at = read_checkpoint(str(out / last))["iteration"]
    assert killed_at in (1, 3, 5, 7, 9)

    done = subprocess.run(
        args[:2] + ["--resume"] + args[2:],
        cwd=str(tmp_path),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    final = read_checkpoint(str(out / "model_final.pth"))
    assert final["iteration"] == 11
    assert (
        final["trainer"]["hooks"]["LRScheduler"]["last_epoch"] == 12
    )  # LR schedule continued, not restarted
    assert final["trainer"]["_trainer"]["optimizer"][
        "state"
    ]  # optimizer moments are checkpointed too
    logged = sorted({m["iteration"] for m in _metrics(out) if "total_loss" in m})
    assert logged[-1] == 11


@pytest.mark.slow
def test_two_process_cpu_distillation(tmp_path, retina_teacher):
    """--num-gpus 2 without GPUs: two gloo processes, DDP over the student only, teacher
    replicated."""
    out = tmp_path / "ddp"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), PYTHONUNBUFFERED="1")
    args = [
        sys.executable,
        os.path.join(REPO, "tools", "train_net.py"),
        "--num-gpus",
        "2",
        "--config-file",
        config_path("synthetic/distill/ssim_retinanet_R50_to_R18.yaml"),
        "KD.TEACHER.CONFIG",
        config_path("synthetic/retinanet_R_50_FPN.yaml"),
        "KD.TEACHER.WEIGHTS",
        retina_teacher,
        "SOLVER.MAX_ITER",
        "3",
        "OUTPUT_DIR",
        str(out),
        # the teacher is evaluated first, by both processes (each scores half the test set)
        "KD.TEACHER.EVAL_BEFORE_TRAIN",
        "True",
        "DATASETS.TEST",
        "('kd_synthetic_val',)",
        "KD.TEACHER.OPTS",
        "['INPUT.MIN_SIZE_TEST', '64', 'INPUT.MAX_SIZE_TEST', '64']",
    ] + SMALL
    proc = subprocess.run(
        args, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert "World size: 2" in log
    assert (
        "Start inference on 75 batches" in log
    )  # half of the 150 validation images, for the teacher
    assert [m["iteration"] for m in _metrics(out) if "teacher/bbox/AP" in m] == [0]
    final = read_checkpoint(str(out / "model_final.pth"))
    assert final["iteration"] == 2
    assert not [k for k in final["model"] if k.startswith("teacher") or k.startswith("module.")]
    assert any(k.startswith("kd_feature.adapters") for k in final["model"])
    assert any("loss_kd_ssim" in m for m in _metrics(out))


@pytest.mark.slow
def test_two_process_cpu_self_distillation(tmp_path):
    """
    DDP over a student that carries its FRSKD self-teacher: every kd_self_* parameter takes part in
    each step; gradients accumulated over micro-batches are all-reduced once per step.
    """
    out = tmp_path / "ddp_self"
    env = dict(os.environ, DETECTRON2_DATASETS=str(tmp_path / "datasets"), PYTHONUNBUFFERED="1")
    args = (
        [
            sys.executable,
            os.path.join(REPO, "tools", "train_net.py"),
            "--num-gpus",
            "2",
            "--config-file",
            config_path("synthetic/distill/self_frskd_retinanet_R18.yaml"),
            "SOLVER.MAX_ITER",
            "3",
            "OUTPUT_DIR",
            str(out),
            "DATASETS.TEST",
            "()",
        ]
        + SMALL
        + [
            # and gradient accumulation under DDP: 2 micro-batches of 1 image per process and step
            "SOLVER.IMS_PER_BATCH",
            "4",
            "SOLVER.GRAD_ACCUM_STEPS",
            "2",
            # and the health monitor and automatic weights (issue 35), measured inside DDP's
            # forward on the first micro-batch, averaged over both processes
            "KD.MONITOR.PERIOD",
            "2",
            "KD.AUTO_WEIGHT.ENABLED",
            "True",
            "KD.AUTO_WEIGHT.ITERS",
            "2",
        ]
    )
    proc = subprocess.run(
        args, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=600
    )
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    final = read_checkpoint(str(out / "model_final.pth"))
    assert final["iteration"] == 2
    assert any(k.startswith("kd_self_teacher.") for k in final["model"])
    logged = [m for m in _metrics(out) if "loss_kd_at" in m]
    assert logged and all("loss_self_cls" in m for m in logged)
    assert any("kd_grad_ratio/loss_kd_at" in m for m in _metrics(out))
    assert "KD.AUTO_WEIGHT: loss_kd_at multiplied by" in log
    assert final["trainer"]["hooks"]["AutoWeightHook"]["scales"]["loss_kd_at"] > 0


@pytest.mark.slow
def test_non_finite_kd_loss_stops_training_and_keeps_the_checkpoint(
    tiny_data_root, tmp_path, rcnn_teacher
):
    from conftest import tiny_cfg
    from detectron2.engine import HookBase

    from kd_det.engine import KDTrainer

    cfg = tiny_cfg(
        "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
        tmp_path,
        [
            "KD.TEACHER.CONFIG",
            config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
            "KD.TEACHER.WEIGHTS",
            rcnn_teacher,
            "SOLVER.MAX_ITER",
            5,
            "SOLVER.CHECKPOINT_PERIOD",
            2,
            "DATASETS.TEST",
            (),
        ],
    )
    trainer = KDTrainer(cfg)

    class PoisonKDWeight(HookBase):
        def before_step(self):
            if self.trainer.iter == 3:
                self.trainer.model.kd_feature.weight = float("nan")

    trainer.register_hooks([PoisonKDWeight()])
    trainer.resume_or_load(resume=False)
    with pytest.raises(
        FloatingPointError, match=r"(?s)iteration=3.*loss_kd_ssim.*model_0000001.pth.*--resume"
    ):
        trainer.train()
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000001.pth"
    ckpt = read_checkpoint(str(tmp_path / "model_0000001.pth"))
    assert ckpt["iteration"] == 1 and all(
        torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point()
    )
    assert not (tmp_path / "model_final.pth").exists()


@pytest.mark.slow
def test_same_seed_same_losses(tiny_data_root, tmp_path, rcnn_teacher):
    """
    Fixed seed, no loader workers, CPU: two distillation runs log identical losses.

    Exact equality is the right test: both runs are the same computation in one process, with
    the same kernels and thread count, and PyTorch's CPU kernels are deterministic for a fixed
    thread count (no atomics); so this holds on any machine, whatever its kernels round to.
    """
    from conftest import tiny_cfg

    from kd_det.engine import KDTrainer

    histories = []
    for run in ("a", "b"):
        cfg = tiny_cfg(
            "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
            tmp_path / run,
            [
                "KD.TEACHER.CONFIG",
                config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
                "KD.TEACHER.WEIGHTS",
                rcnn_teacher,
                "SOLVER.MAX_ITER",
                3,
                "SEED",
                11,
                "DATASETS.TEST",
                (),
            ],
        )
        from detectron2.engine import default_setup

        default_setup(
            cfg, argparse_namespace()
        )  # seeds every RNG from cfg.SEED, as tools/train_net.py does
        trainer = KDTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        histories.append(
            {
                k: [v for v, _ in h.values()]
                for k, h in trainer.storage.histories().items()
                if k.startswith("loss_") or k == "total_loss"
            }
        )
    assert histories[0].keys() == histories[1].keys() and "loss_kd_ssim" in histories[0]
    for k in histories[0]:
        assert histories[0][k] == histories[1][k], k


def argparse_namespace():
    import argparse

    return argparse.Namespace(
        config_file="",
        eval_only=False,
        num_gpus=1,
        num_machines=1,
        machine_rank=0,
        dist_url="auto",
        resume=False,
        opts=[],
    )

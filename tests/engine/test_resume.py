"""
Crash leftovers, checkpoint retention and exact resume (issue 36): temporary files of killed
saves are removed, SOLVER.CHECKPOINT_KEEP keeps the newest periodic checkpoints, and a run
stopped and resumed ends bit for bit where an uninterrupted one does.
"""

import logging
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from conftest import REPO, config_path, tiny_cfg
from detectron2.engine import HookBase
from detectron2.utils.env import seed_all_rng
from torch import nn

from kd_det.checkpoint import (
    AtomicDetectionCheckpointer,
    read_checkpoint,
    remove_leftover_temp_files,
)
from kd_det.checkpoint.leftovers import (
    WriterId,
    current_writer,
    parse_temp_name,
    process_start_ms,
    temp_path,
)
from kd_det.data.stream import (
    BatchPlan,
    RepeatFactorPasses,
    ResumableTrainLoader,
    ShuffledPasses,
)
from kd_det.engine import KDTrainer
from kd_det.engine.hooks import PeriodicCheckpointer

# ---------------------------------------------------------------- temporary files of killed saves


def test_temp_file_names_its_writer(tmp_path):
    me = current_writer()
    tmp = temp_path(str(tmp_path / "model_0000001.pth"))
    name = os.path.basename(tmp)
    assert name.startswith("model_0000001.pth.tmp.")
    assert parse_temp_name(name) == ("model_0000001.pth", me)
    assert me.pid == os.getpid()
    # the start time is the process's, not the moment of the save
    assert abs(me.start_ms - process_start_ms(os.getpid())) <= 2000
    assert me.start_ms <= time.time() * 1000
    # the older form is still recognised, without a writer
    assert parse_temp_name("model_0000031.pth.tmp.10150") == ("model_0000031.pth", None)
    assert parse_temp_name("model_0000031.pth") is None


def _leftover(directory, name, size, age_s=0.0):
    path = directory / name
    path.write_bytes(b"\0" * size)
    if age_s:
        t = time.time() - age_s
        os.utime(path, (t, t))
    return path


def test_leftovers_of_gone_writers_are_removed_live_ones_kept(tmp_path, caplog):
    me = current_writer()
    run_start = int(time.time() * 1000)
    # a live writer: another process of this host, busy saving
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        deadline = time.time() + 10
        while process_start_ms(live.pid) is None and time.time() < deadline:
            time.sleep(0.01)
        live_id = WriterId(me.host, live.pid, process_start_ms(live.pid))
        gone = subprocess.Popen([sys.executable, "-c", "pass"])
        gone.wait()
        gone_id = WriterId(me.host, gone.pid, me.start_ms)
        kept = [
            _leftover(tmp_path, os.path.basename(temp_path("model_0000009.pth", live_id)), 10),
            # another host's save, still being written (this run started before its last write)
            _leftover(tmp_path, "model_0000011.pth.tmp.other-host.77.{}".format(run_start - 1), 10),
            tmp_path / "model_0000001.pth",  # not a temporary file
        ]
        kept[-1].write_bytes(b"complete")
        removed = [
            # its process has exited
            _leftover(tmp_path, os.path.basename(temp_path("model_0000003.pth", gone_id)), 3000),
            # a live process id, but another process: the id was reused
            _leftover(
                tmp_path,
                os.path.basename(temp_path("model_0000005.pth", WriterId(me.host, live.pid, 1000))),
                1000,
            ),
            # another host's, from before this run and untouched since
            _leftover(tmp_path, "model_0000007.pth.tmp.other-host.77.1000", 100, age_s=3600),
            # the older form (kd_det before issue 36), from before this run
            _leftover(tmp_path, "model_0000031.pth.tmp.10150", 2048 * 1024, age_s=3600),
        ]
        with caplog.at_level(logging.INFO, logger="kd_det.checkpoint.leftovers"):
            got = remove_leftover_temp_files(str(tmp_path), run_start_ms=run_start)
    finally:
        live.kill()
        live.wait()
    assert sorted(got) == sorted(str(p) for p in removed)
    assert all(p.exists() for p in kept) and not any(p.exists() for p in removed)
    assert "4 temporary file(s)" in caplog.text and "2.0 MB freed" in caplog.text
    assert "model_0000031.pth.tmp.10150 (2.0 MB)" in caplog.text


# ---------------------------------------------------------------- SOLVER.CHECKPOINT_KEEP


def _saved(directory):
    return sorted(n for n in os.listdir(directory) if n.endswith(".pth"))


def test_checkpoint_keep_counts_the_folder_across_resumes(tmp_path):
    ckpt = AtomicDetectionCheckpointer(nn.Linear(2, 2), str(tmp_path))
    hook = PeriodicCheckpointer(ckpt, period=2, keep=2)
    hook.max_iter = 12
    for it in range(6):  # the first run, stopped after iteration 5
        hook.step(it)
        assert len([n for n in _saved(tmp_path) if n != "model_final.pth"]) <= 2
    assert _saved(tmp_path) == ["model_0000003.pth", "model_0000005.pth"]
    # a resumed run: a new hook, whose memory (unlike fvcore's max_to_keep) is the folder
    hook = PeriodicCheckpointer(ckpt, period=2, keep=2)
    hook.max_iter = 12
    for it in range(6, 12):
        hook.step(it)
    assert _saved(tmp_path) == ["model_0000009.pth", "model_0000011.pth", "model_final.pth"]
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    with pytest.raises(ValueError, match="CHECKPOINT_KEEP must be >= 0"):
        PeriodicCheckpointer(ckpt, period=1, keep=-1)


def test_checkpoint_keep_spares_the_tagged_file(tmp_path):
    from kd_det.checkpoint import prune_checkpoints

    for it in (1, 3, 5, 7):
        (tmp_path / "model_{:07d}.pth".format(it)).write_bytes(b"x")
    (tmp_path / "model_final.pth").write_bytes(b"x")
    # a kill between a save's rename and its tag leaves the tag on the older file
    (tmp_path / "last_checkpoint").write_text("model_0000003.pth")
    removed = prune_checkpoints(str(tmp_path), 1)
    assert sorted(os.path.basename(p) for p in removed) == [
        "model_0000001.pth",
        "model_0000005.pth",
    ]
    assert _saved(tmp_path) == ["model_0000003.pth", "model_0000007.pth", "model_final.pth"]
    assert prune_checkpoints(str(tmp_path), 0) == []  # 0 keeps all


# ---------------------------------------------------------------- the resumable data stream


def test_batch_plan_resumes_and_splits_between_processes():
    stream = ShuffledPasses(10)
    landscape = [i % 3 == 0 for i in range(10)]
    head = [b for _, b in zip(range(30), BatchPlan(stream, 5, 2, landscape=landscape))]
    # a plan started at batch k is the tail of the plan from 0
    tail = [b for _, b in zip(range(20), BatchPlan(stream, 5, 2, landscape=landscape, start=10))]
    assert tail == head[10:]
    # aspect-ratio grouping: one orientation per batch; every position once, in order per bucket
    assert all(len({landscape[i] for i, _ in b}) == 1 for b in head)
    positions = [p for b in head for _, p in b]
    assert len(set(positions)) == len(positions)
    # epochs are permutations, drawn from (seed, epoch) alone
    assert sorted(stream.epoch(5, 3)) == list(range(10))
    assert stream.epoch(5, 3) == ShuffledPasses(10).epoch(5, 3) != stream.epoch(6, 3)
    # two processes share the stream: disjoint positions, rank r takes p = r (mod 2)
    ranks = [
        [b for _, b in zip(range(15), BatchPlan(stream, 5, 2, r, 2, landscape))] for r in (0, 1)
    ]
    for r in (0, 1):
        assert all(p % 2 == r for b in ranks[r] for _, p in b)
    mine = {p for b in ranks[0] for _, p in b}
    assert mine.isdisjoint({p for b in ranks[1] for _, p in b})


def test_repeat_factor_stream():
    stream = RepeatFactorPasses([1.0, 2.0, 1.5, 3.0])
    counts = np.zeros((200, 4))
    for e in range(200):
        for i in stream.epoch(1, e):
            counts[e, i] += 1
    assert (counts[:, 0] == 1).all() and (counts[:, 1] == 2).all() and (counts[:, 3] == 3).all()
    assert set(counts[:, 2]) == {1, 2} and 0.35 < (counts[:, 2] == 2).mean() < 0.65
    assert stream.epoch(1, 7) == RepeatFactorPasses([1.0, 2.0, 1.5, 3.0]).epoch(1, 7)


def _random_mapper(record):
    # augmentation randomness from all three global generators
    return {
        "image_id": record["image_id"],
        "draws": (random.random(), float(np.random.rand()), float(torch.rand(1))),
    }


def _records(n=12):
    return [{"image_id": i, "width": 64 + 8 * (i % 2), "height": 64} for i in range(n)]


def _take(loader, n):
    it = iter(loader)
    return [next(it) for _ in range(n)]


def test_resumable_loader_is_independent_of_workers_and_resumes():
    def loader(workers):
        return ResumableTrainLoader(
            _records(), _random_mapper, ShuffledPasses(12), 3, num_workers=workers, seed=4
        )

    uninterrupted = _take(loader(0), 9)
    assert uninterrupted == _take(loader(2), 9)  # whichever process maps an item
    first = loader(0)
    torch.manual_seed(123)
    state_before = torch.get_rng_state()
    head = _take(first, 4)
    assert torch.equal(torch.get_rng_state(), state_before)  # the training process's RNG untouched
    state = first.state_dict()
    assert state["position"] == 4 and state["seed"] == 4
    resumed = loader(2)
    resumed.load_state_dict(state)
    assert head + _take(resumed, 5) == uninterrupted
    # draws differ between items (the seeding does not repeat itself)
    draws = [d["draws"] for b in uninterrupted for d in b]
    assert len(set(draws)) == len(draws)


def test_resumable_loader_warns_about_another_dataset(caplog):
    first = ResumableTrainLoader(_records(12), _random_mapper, ShuffledPasses(12), 2, seed=1)
    _take(first, 2)
    other = ResumableTrainLoader(_records(10), _random_mapper, ShuffledPasses(10), 2, seed=9)
    with caplog.at_level(logging.WARNING, logger="kd_det.data.stream"):
        other.load_state_dict(first.state_dict(), expected_position=2)
    assert "SEED=9 differs from the checkpoint's data-stream seed 1" in caplog.text
    assert "dataset_size 12 -> 10" in caplog.text
    assert other.seed == 1 and other.position == 2


# ---------------------------------------------------------------- training: kill and resume

_KILLED_IN_SAVE = r"""
import os, signal, sys
sys.path.insert(0, {tests!r})
from conftest import TINY_PREFIX, TINY_SPEC, tiny_cfg
from kd_det.data import register_synthetic_datasets
import kd_det.checkpoint.atomic as atomic
from kd_det.engine import KDTrainer

real = atomic.atomic_write_bytes


def write_then_die(path, write):
    if not path.endswith({kill_at!r}):
        return real(path, write)

    class Dying:  # the save's own file: SIGKILL once 1 MB of it is written
        def __init__(self, f):
            self.f, self.n = f, 0

        def write(self, data):
            if self.n > 1 << 20:
                self.f.flush()
                os.kill(os.getpid(), signal.SIGKILL)
            self.n += len(data)
            return self.f.write(data)

        def flush(self):
            return self.f.flush()

    return real(path, lambda f: write(Dying(f)))


atomic.atomic_write_bytes = write_then_die
register_synthetic_datasets({root!r}, TINY_SPEC, prefix=TINY_PREFIX)
cfg = tiny_cfg("synthetic/faster_rcnn_R_18_FPN.yaml", {out!r}, {opts!r})
trainer = KDTrainer(cfg)
trainer.resume_or_load(resume=False)
trainer.train()
"""


@pytest.mark.slow
def test_sigkill_inside_a_save_then_resume(tiny_data_root, tmp_path, caplog):
    out = tmp_path / "run"
    opts = ["SOLVER.MAX_ITER", 3, "SOLVER.CHECKPOINT_PERIOD", 1, "DATASETS.TEST", ()]
    script = _KILLED_IN_SAVE.format(
        tests=os.path.join(REPO, "tests"),
        kill_at="model_0000001.pth",
        root=tiny_data_root,
        out=str(out),
        opts=opts,
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-3000:]
    leftovers = [n for n in os.listdir(out) if ".tmp." in n]
    assert len(leftovers) == 1, os.listdir(out)
    target, writer = parse_temp_name(leftovers[0])
    assert target == "model_0000001.pth" and writer.host == current_writer().host
    assert os.path.getsize(out / leftovers[0]) > 1 << 20
    assert (out / "last_checkpoint").read_text() == "model_0000000.pth"

    # --resume: the leftover is removed (its writer is gone) and training goes on from
    # the previous checkpoint
    cfg = tiny_cfg("synthetic/faster_rcnn_R_18_FPN.yaml", out, opts)
    trainer = KDTrainer(cfg)
    with caplog.at_level(logging.INFO, logger="kd_det.checkpoint.leftovers"):
        trainer.resume_or_load(resume=True)
    assert not [n for n in os.listdir(out) if ".tmp." in n]
    assert leftovers[0] in caplog.text and "freed" in caplog.text
    assert trainer.start_iter == 1
    trainer.train()
    final = read_checkpoint(str(out / "model_final.pth"))
    assert final["iteration"] == 2
    assert final["trainer"]["data_stream"]["position"] == 3
    assert read_checkpoint(str(out / "model_0000001.pth"))["iteration"] == 1


class _Stop(Exception):
    pass


class _StopAfter(HookBase):
    """Stops the run right after iteration ``k``'s hooks (its checkpoint included)."""

    def __init__(self, k):
        self.k = k

    def after_step(self):
        if self.trainer.iter == self.k:
            raise _Stop("stopped after iteration {}".format(self.k))


@pytest.mark.slow
def test_stopped_and_resumed_twice_ends_as_uninterrupted(tiny_data_root, tmp_path, rcnn_teacher):
    """
    Faster R-CNN with SSIM distillation, 2 micro-batches per step: an uninterrupted run
    and one stopped after iterations 0 and 1 and resumed each time, with 2 loader workers
    in its middle part, end with the same weights, bit for bit (CPU, one process, the same
    threads: PyTorch's CPU kernels are deterministic). CHECKPOINT_KEEP 2 keeps the newest two
    periodic checkpoints of both.
    """

    def cfg_of(out, workers=0):
        return tiny_cfg(
            "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
            out,
            [
                "KD.TEACHER.CONFIG",
                config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
                "KD.TEACHER.WEIGHTS",
                rcnn_teacher,
                "SOLVER.MAX_ITER",
                4,
                "SOLVER.CHECKPOINT_PERIOD",
                1,
                "SOLVER.CHECKPOINT_KEEP",
                2,
                "SOLVER.GRAD_ACCUM_STEPS",
                2,
                "DATALOADER.NUM_WORKERS",
                workers,
                "SEED",
                11,
                "DATASETS.TEST",
                (),
            ],
        )

    def run(out, resume, workers=0, stop_after=None):
        cfg = cfg_of(out, workers)
        seed_all_rng(cfg.SEED)  # as default_setup does
        trainer = KDTrainer(cfg)
        if stop_after is not None:
            trainer.register_hooks([_StopAfter(stop_after)])
        trainer.resume_or_load(resume=resume)
        if stop_after is None:
            trainer.train()
            return trainer
        with pytest.raises(_Stop):
            trainer.train()
        return trainer

    run(tmp_path / "a", resume=False)
    run(tmp_path / "b", resume=False, stop_after=0)
    resumed = run(tmp_path / "b", resume=True, workers=2, stop_after=1)
    assert resumed.start_iter == 1
    # its stream went on from the checkpoint's batch (2 micro-batches per iteration)
    assert resumed._trainer.data_loader.position == 4
    run(tmp_path / "b", resume=True)

    a = read_checkpoint(str(tmp_path / "a" / "model_final.pth"))
    b = read_checkpoint(str(tmp_path / "b" / "model_final.pth"))
    assert a["iteration"] == b["iteration"] == 3
    assert a["model"].keys() == b["model"].keys()
    different = [k for k in a["model"] if not torch.equal(a["model"][k], b["model"][k])]
    assert not different, different[:5]
    for d in ("a", "b"):
        assert _saved(tmp_path / d) == ["model_0000002.pth", "model_0000003.pth", "model_final.pth"]


def test_lazy_training_loader_becomes_resumable():
    from detectron2.config import LazyCall as L
    from detectron2.config import LazyConfig, instantiate
    from detectron2.data.samplers import RepeatFactorTrainingSampler

    from kd_det.data.curriculum import curriculum_sampler
    from kd_det.data.stream import build_resumable_train_loader
    from kd_det.engine.lazy import resumable_loader_call

    lazy = LazyConfig.load(config_path("synthetic/faster_rcnn_R_50_FPN_lazy.py"))
    call = resumable_loader_call(lazy.dataloader.train, seed=5)
    assert call._target_ is build_resumable_train_loader and call.seed == 5
    assert call.mapper == lazy.dataloader.train.mapper and "sampler" not in call
    assert "build_detection_train_loader" in str(lazy.dataloader.train._target_)  # a copy
    # a repeat-factor sampler becomes the repeat-factor stream of the same factors
    lazy.dataloader.train.sampler = L(RepeatFactorTrainingSampler)(repeat_factors=[1.0, 2.5])
    call = resumable_loader_call(lazy.dataloader.train)
    assert isinstance(instantiate(call.stream), RepeatFactorPasses)
    # another sampler (a curriculum) stays with Detectron2's loader
    lazy.dataloader.train.sampler = L(curriculum_sampler)(scores="s.json")
    call = resumable_loader_call(lazy.dataloader.train)
    assert "build_detection_train_loader" in str(call._target_)


def test_kd_trainer_loader_for_each_sampler(tiny_data_root, tmp_path):
    def loader(sampler):
        cfg = tiny_cfg(
            "synthetic/faster_rcnn_R_18_FPN.yaml",
            tmp_path,
            ["DATALOADER.SAMPLER_TRAIN", sampler, "DATALOADER.REPEAT_THRESHOLD", 0.5],
        )
        return KDTrainer.build_train_loader(cfg)

    rf = loader("RepeatFactorTrainingSampler")
    assert isinstance(rf, ResumableTrainLoader) and isinstance(rf.stream, RepeatFactorPasses)
    assert len(next(iter(rf))) == 2 and rf.state_dict()["position"] == 1
    assert isinstance(loader("TrainingSampler").stream, ShuffledPasses)
    # a sampler without a resumable stream goes to Detectron2's loader (which knows no such one)
    with pytest.raises(ValueError, match="Unknown training sampler: NoSuchSampler"):
        loader("NoSuchSampler")

"""Shared fixtures: a tiny synthetic dataset and tiny CPU configs."""

import os
import tempfile

import pytest
import torch

import kd_det  # noqa: F401  # isort: skip  (first: kd_det/_compat.py; registers meta-architectures)
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from kd_det import get_kd_cfg, merge_kd_config
from kd_det.data import SyntheticSpec, ensure_synthetic_dataset, register_synthetic_datasets

# DATASETS.VALIDATE full's image check cache: a fresh one per session, not the user's ~/.cache
# (subprocesses of tools/train_net.py inherit it)
os.environ.setdefault("KD_DET_CACHE", tempfile.mkdtemp(prefix="kd_det_test_cache_"))

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# the tests check that crafted checkpoints are refused: a developer's KD_DET_TRUST_PICKLE=1
# (the opt-out) must not turn the refusals off
os.environ.pop("KD_DET_TRUST_PICKLE", None)
TINY_SPEC = SyntheticSpec(
    num_train=16,
    num_val=6,
    image_size=64,
    min_object_size=8,
    max_object_size=28,
    max_objects=4,
    seed=3,
)
TINY_PREFIX = "kd_test_tiny"

# at most 2 threads (the CI machine has 2 cores), fewer where OMP_NUM_THREADS says so; one per
# pytest-xdist worker (`make test` runs two), so that the workers do not oversubscribe the cores
torch.set_num_threads(
    1 if os.environ.get("PYTEST_XDIST_WORKER") else min(2, torch.get_num_threads())
)


def pytest_addoption(parser):
    parser.addoption(
        "--ssim-variants",
        action="store_true",
        help="also run the fused SSIM kernel's tests with the ring and band "
        "vertical passes of benchmarks/ssim_vertical_variants.py (GPU sessions; "
        "make test does not)",
    )


@pytest.fixture(scope="session")
def tiny_data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("data") / "kd_synthetic_tiny")
    register_synthetic_datasets(root, TINY_SPEC, prefix=TINY_PREFIX)
    # written now, not on first load: evaluators read the json when they are built
    ensure_synthetic_dataset(root, TINY_SPEC)
    return root


def config_path(rel):
    return os.path.join(REPO, "configs", rel)


def tiny_cfg(config, output_dir, opts=()):
    """A repo config shrunk to seconds on a CPU: 64 px inputs, batch 2, narrow FPN."""
    cfg = merge_kd_config(
        get_kd_cfg(),
        config_path(config),
        [
            "DATASETS.TRAIN",
            (TINY_PREFIX + "_train",),
            "DATASETS.TEST",
            (TINY_PREFIX + "_val",),
            "INPUT.MIN_SIZE_TRAIN",
            (64,),
            "INPUT.MAX_SIZE_TRAIN",
            64,
            "INPUT.MIN_SIZE_TEST",
            64,
            "INPUT.MAX_SIZE_TEST",
            64,
            "SOLVER.IMS_PER_BATCH",
            2,
            "SOLVER.MAX_ITER",
            4,
            "SOLVER.WARMUP_ITERS",
            1,
            "SOLVER.STEPS",
            (),
            "SOLVER.CHECKPOINT_PERIOD",
            1000,
            "DATALOADER.NUM_WORKERS",
            0,
            "MODEL.RPN.PRE_NMS_TOPK_TRAIN",
            200,
            "MODEL.RPN.POST_NMS_TOPK_TRAIN",
            64,
            "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE",
            32,
            "OUTPUT_DIR",
            str(output_dir),
            "SEED",
            7,
        ]
        + list(opts),
    )
    return cfg


def save_random_teacher(config, path, opts=()):
    """A teacher checkpoint in Detectron2 format (randomly initialised: tests need its shapes, not
    its skill)."""
    cfg = tiny_cfg(config, os.path.dirname(path), opts)
    torch.manual_seed(0)
    model = build_model(cfg)
    DetectionCheckpointer(model, save_dir=os.path.dirname(path)).save(
        os.path.splitext(os.path.basename(path))[0]
    )
    return path


@pytest.fixture(scope="session")
def rcnn_teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("rcnn_teacher")
    return save_random_teacher("synthetic/faster_rcnn_R_50_FPN.yaml", str(d / "teacher.pth"))


@pytest.fixture(scope="session")
def retina_teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("retina_teacher")
    return save_random_teacher("synthetic/retinanet_R_50_FPN.yaml", str(d / "teacher.pth"))


def distill_cfg(config, teacher_config, teacher_weights, out, opts=()):
    """A tiny distillation config whose teacher is ``teacher_config`` with ``teacher_weights``."""
    return tiny_cfg(
        config,
        out,
        ["KD.TEACHER.CONFIG", config_path(teacher_config), "KD.TEACHER.WEIGHTS", teacher_weights]
        + list(opts),
    )


def one_step(model, cfg):
    """One training step of ``model`` on ``cfg``'s loader; returns (losses, optimizer)."""
    loader = iter(build_detection_train_loader(cfg))
    optimizer = build_optimizer(cfg, model)
    model.train()
    with EventStorage(0):
        losses = model(next(loader))
        sum(losses.values()).backward()
        optimizer.step()
    return losses, optimizer

"""Instance-level curriculum: the sampler's phases, ranks and resume; scoring; training with it."""

import itertools
import json
import os
import runpy

import pytest
from conftest import REPO, tiny_cfg
from detectron2.data import get_detection_dataset_dicts

import kd_det.data.curriculum as curriculum
from kd_det.data import CurriculumSampler, load_scores
from kd_det.data.curriculum import find_curriculum_sampler
from kd_det.engine import KDTrainer

SCORES = [5.0, 1.0, 4.0, 0.5, 3.0, 2.0, 6.0, 0.1]  # easiest: 7, 3, 1, 5, 4, 2, 0, 6


def _take(sampler, n):
    return list(itertools.islice(iter(sampler), n))


def test_phases_draw_from_the_easiest_images():
    s = CurriculumSampler(
        SCORES, phase_iters=[2, 4], phase_fractions=[0.25, 0.5], images_per_iter=3, seed=0
    )
    stream = _take(s, 30)
    assert set(stream[:6]) == {7, 3}  # iterations 0-1: easiest 2 of 8
    assert set(stream[6:12]) <= {7, 3, 1, 5}  # iterations 2-3: easiest 4
    assert len(set(stream[6:12])) == 4  # shuffled passes cover the pool
    assert set(stream[12:]) == set(range(8))  # then every image
    assert s.pool(0) == [7, 3] and s.pool(3) == [7, 3, 1, 5] and s.pool(4) == list(range(8))


def test_ranks_split_one_global_stream(monkeypatch):
    whole = _take(CurriculumSampler(SCORES, [2], [0.5], images_per_iter=4, seed=3), 40)
    parts = []
    for rank in range(2):
        monkeypatch.setattr(curriculum.comm, "get_rank", lambda r=rank: r)
        monkeypatch.setattr(curriculum.comm, "get_world_size", lambda: 2)
        parts.append(_take(CurriculumSampler(SCORES, [2], [0.5], images_per_iter=4, seed=3), 20))
    assert parts[0] == whole[0::2] and parts[1] == whole[1::2]


def test_resume_continues_the_same_stream():
    whole = _take(CurriculumSampler(SCORES, [2, 5], [0.25, 0.75], images_per_iter=3, seed=1), 45)
    resumed = CurriculumSampler(SCORES, [2, 5], [0.25, 0.75], images_per_iter=3, seed=1)
    resumed.set_start_iter(4)
    assert _take(resumed, 33) == whole[12:]


@pytest.mark.parametrize(
    "iters,fractions,match",
    [
        ([2, 1], [0.5, 0.7], "increasing"),
        ([2], [0.5, 0.7], "one entry per phase"),
        ([2], [1.5], r"\(0, 1\]"),
    ],
)
def test_sampler_errors(iters, fractions, match):
    with pytest.raises(ValueError, match=match):
        CurriculumSampler(SCORES, iters, fractions, images_per_iter=2)


def test_load_scores_errors(tmp_path):
    records = [{"image_id": 1, "file_name": "a.jpg"}, {"image_id": 2, "file_name": "b.jpg"}]
    with pytest.raises(FileNotFoundError, match="score_images.py"):
        load_scores(str(tmp_path / "none.json"), records)
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ValueError, match="not a scores file"):
        load_scores(str(bad), records)
    partial = tmp_path / "partial.json"
    partial.write_text(json.dumps({"scores": {"1": 0.5}}))
    with pytest.raises(
        ValueError, match=r"1 of 2 training images have no score \(first: \['2'\]\)"
    ):
        load_scores(str(partial), records)
    full = tmp_path / "full.json"
    full.write_text(json.dumps({"scores": {"1": 0.5, "2": 0.25}}))
    assert load_scores(str(full), records) == [0.5, 0.25]


@pytest.mark.slow
def test_score_tool_then_curriculum_training(tiny_data_root, tmp_path):
    """tools/score_images.py with a snapshot, then KDTrainer feeding the easiest images first."""
    config = "synthetic/faster_rcnn_R_18_FPN.yaml"
    snap_cfg = tiny_cfg(config, tmp_path / "snap", ["SOLVER.MAX_ITER", 1])
    os.makedirs(snap_cfg.OUTPUT_DIR, exist_ok=True)
    trainer = KDTrainer(snap_cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    snapshot = os.path.join(snap_cfg.OUTPUT_DIR, "model_final.pth")
    scores_file = str(tmp_path / "scores.json")
    opts = [k if isinstance(k, str) else str(k) for pair in _opts_of(snap_cfg) for k in pair]
    tool = runpy.run_path(os.path.join(REPO, "tools", "score_images.py"))
    tool["main"](
        [
            "--config-file",
            os.path.join(REPO, "configs", config),
            "--snapshot",
            snapshot,
            "--output",
            scores_file,
        ]
        + opts
    )
    dataset = get_detection_dataset_dicts(snap_cfg.DATASETS.TRAIN)
    scores = load_scores(scores_file, dataset)
    assert len(scores) == len(dataset) and all(s > 0 for s in scores)

    cfg = tiny_cfg(
        config,
        tmp_path / "cur",
        [
            "TRAINER.CURRICULUM.ENABLED",
            True,
            "TRAINER.CURRICULUM.SCORES",
            scores_file,
            "TRAINER.CURRICULUM.PHASE_ITERS",
            [2],
            "TRAINER.CURRICULUM.PHASE_FRACTIONS",
            [0.25],
            "SOLVER.MAX_ITER",
            2,
        ],
    )
    trainer = KDTrainer(cfg)
    sampler = find_curriculum_sampler(trainer.data_loader)
    assert sampler is not None
    easiest = {dataset[i]["image_id"] for i in sampler.pool(0)}
    assert len(easiest) == 4  # 25% of 16
    seen = []
    trainer._trainer._data_loader_iter = (
        [seen.extend(r["image_id"] for r in batch) or batch][0] for batch in trainer.data_loader
    )
    trainer.resume_or_load(resume=False)
    trainer.train()
    assert seen and set(seen) <= easiest
    # --resume: the stream restarts at the resumed iteration's place in the curriculum
    resumed = KDTrainer(cfg)
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 2
    assert find_curriculum_sampler(resumed.data_loader)._start == 2 * cfg.SOLVER.IMS_PER_BATCH


def _opts_of(cfg):
    """The tiny-data overrides a scoring run needs (datasets and sizes)."""
    return [
        ("DATASETS.TRAIN", str(tuple(cfg.DATASETS.TRAIN))),
        ("INPUT.MIN_SIZE_TEST", cfg.INPUT.MIN_SIZE_TEST),
        ("INPUT.MAX_SIZE_TEST", cfg.INPUT.MAX_SIZE_TEST),
        ("MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", 32),
    ]

"""bench_accuracy's statistics and verdict, and reading evaluation results from train_net's log."""

import math
import os
import runpy

import pytest
from conftest import REPO

from kd_det.utils.runs import parse_copypaste_bbox

BENCH = runpy.run_path(os.path.join(REPO, "benchmarks", "bench_accuracy.py"))


def _runs(*aps):
    return [{"AP": a, "AP50": 2 * a, "AP75": a / 2} for a in aps]


def test_table_and_verdict():
    results = {
        "teacher": {"label": "teacher", "runs": _runs(10.0)},
        "vanilla": {"label": "vanilla", "runs": _runs(4.0, 5.0)},
        "l2": {"label": "l2", "runs": _runs(5.0, 5.5)},
        "ssim": {"label": "ssim", "runs": _runs(7.0, 7.5)},
        "l2_channel": {"label": "l2 standardised", "runs": _runs(6.9, 7.1)},
    }
    md, stats = BENCH["table"](results)
    assert stats["vanilla"]["AP"]["mean"] == 4.5 and stats["vanilla"]["AP"]["spread"] == 1.0
    # statistics.stdev of 7.0 and 7.5 in Python's float64: 0.5 / sqrt(2), rounded a few times
    assert stats["ssim"]["AP"]["std"] == pytest.approx(0.5 / math.sqrt(2), rel=8 * 2.0**-53)
    assert (
        "| ssim | 2 | 7.25 ± 0.35 | 0.50 | 14.50 | 3.62 | 50% |" in md
    )  # (7.25 - 4.5) / (10 - 4.5)
    verdict = BENCH["verdict"](stats)
    assert "SSIM 7.25 vs vanilla 4.50: beyond" in verdict
    assert "SSIM vs l2 5.25: beyond" in verdict and "gap closed 50% (target 40%: met)" in verdict
    # every L2 baseline present is checked: the standardised one is within the spread
    assert "SSIM vs l2_channel 7.00: NOT beyond the larger spread (0.50)" in verdict
    results["ssim"]["runs"] = _runs(4.0, 7.0)  # spread 3 swamps the difference
    verdict = BENCH["verdict"](BENCH["table"](results)[1])
    assert "NOT beyond" in verdict


def test_parse_copypaste_takes_the_last_bbox_block():
    log = "\n".join(
        [
            "[d2.evaluation.testing]: copypaste: Task: bbox",
            "[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl",
            "[d2.evaluation.testing]: copypaste: 1.0,2.0,3.0,4.0,5.0,nan",
            "[d2.evaluation.testing]: copypaste: Task: bbox",
            "[d2.evaluation.testing]: copypaste: AP,AP50,AP75,APs,APm,APl",
            "[d2.evaluation.testing]: copypaste: 9.5632,18.6948,8.2168,8.6302,14.3321,nan",
        ]
    )
    got = parse_copypaste_bbox(log)
    assert got["AP"] == 9.5632 and got["APm"] == 14.3321
    with pytest.raises(KeyError, match="no COCO box metrics"):
        parse_copypaste_bbox("nothing here")


def test_student_schedule_of_the_setting_reaches_students_not_the_teacher(monkeypatch, tmp_path):
    """RetinaNet's CPU students train 300 iterations, its teacher its own config's 600; user opts
    come last."""
    import argparse

    import kd_det.data

    calls = []

    def fake_train_and_evaluate(name, config, out_dir, opts, reuse=False, eval_only=False, *, root):
        assert root == REPO  # the benchmark's own checkout runs tools/train_net.py
        calls.append((name, opts))
        return {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}, 0.0

    monkeypatch.setitem(
        BENCH["run_benchmark"].__globals__, "train_and_evaluate", fake_train_and_evaluate
    )
    monkeypatch.setattr(kd_det.data, "prepare_datasets", lambda names: None)
    monkeypatch.chdir(REPO)  # run_benchmark changes into the repository; restored afterwards
    args = argparse.Namespace(
        arch="retinanet",
        methods=["vanilla", "ssim"],
        seeds=[1],
        setting="cpu",
        teacher_weights="",
        train_dataset="",
        test_dataset="",
        num_classes=None,
        output_root=str(tmp_path),
        reuse=False,
        jobs=2,  # the students run side by side: the calls must not depend on that
        opts=["SOLVER.MAX_ITER", "7"],
    )
    BENCH["run_benchmark"](args)
    by_name = dict(calls)
    assert "300" not in by_name["teacher"] and by_name["teacher"][-2:] == ["SEED", "1"]
    for student in ("vanilla/seed1", "ssim/seed1"):
        opts = by_name[student]
        # the setting's student schedule, then the user's override of it, then the seed
        assert opts.index("300") < opts.index("7") < opts.index("SEED")
    assert (
        "KD.TEACHER.WEIGHTS" in by_name["ssim/seed1"]
        and "KD.TEACHER.WEIGHTS" not in by_name["vanilla/seed1"]
    )


def test_run_parallel_keeps_order_and_raises_the_failure():
    import threading
    import time

    run_parallel = BENCH["run_parallel"]
    seen = set()

    def slow_square(x):
        seen.add(threading.get_ident())
        time.sleep(0.05 * (3 - x))  # the first item ends last
        return x * x

    assert run_parallel(slow_square, [0, 1, 2], jobs=3) == [0, 1, 4]
    assert len(seen) > 1
    assert run_parallel(slow_square, [2, 1], jobs=1) == [4, 1]

    def fail_on_one(x):
        if x == 1:
            raise SystemExit("run 1 failed")
        return x

    with pytest.raises(SystemExit, match="run 1 failed"):
        run_parallel(fail_on_one, [0, 1, 2], jobs=2)


def test_auto_weight_variants(monkeypatch, tmp_path, capsys):
    """ssim_auto / l2_auto: the method's config with KD.AUTO_WEIGHT.ENABLED True (issue 35)."""
    import argparse

    import kd_det.data

    with pytest.raises(SystemExit):
        BENCH["main"](["--help"])
    assert "ssim_auto" in capsys.readouterr().out
    calls = []

    def fake_train_and_evaluate(name, config, out_dir, opts, reuse=False, eval_only=False, *, root):
        calls.append((name, config, opts))
        return {"AP": 1.0, "AP50": 2.0, "AP75": 0.5}, 0.0

    monkeypatch.setitem(
        BENCH["run_benchmark"].__globals__, "train_and_evaluate", fake_train_and_evaluate
    )
    monkeypatch.setattr(kd_det.data, "prepare_datasets", lambda names: None)
    monkeypatch.chdir(REPO)
    for arch in ("faster_rcnn", "retinanet"):
        calls.clear()
        args = argparse.Namespace(
            arch=arch,
            methods=["ssim", "ssim_auto", "l2_auto"],
            seeds=[1],
            setting="cpu",
            teacher_weights="",
            train_dataset="",
            test_dataset="",
            num_classes=None,
            output_root=str(tmp_path),
            reuse=False,
            jobs=1,
            opts=[],
        )
        BENCH["run_benchmark"](args)
        runs = {name: (config, opts) for name, config, opts in calls}
        assert runs["ssim_auto/seed1"][0] == runs["ssim/seed1"][0]
        assert "KD.AUTO_WEIGHT.ENABLED" not in runs["ssim/seed1"][1]
        for name in ("ssim_auto/seed1", "l2_auto/seed1"):
            opts = runs[name][1]
            at = opts.index("KD.AUTO_WEIGHT.ENABLED")
            assert opts[at + 1] == "True" and "KD.TEACHER.WEIGHTS" in opts

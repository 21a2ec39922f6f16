"""End-to-end: Detectron2 trainers on the synthetic data, COCO and VOC evaluation, the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import REPO, TINY_PREFIX, config_path, tiny_cfg
from detectron2.evaluation import COCOEvaluator, PascalVOCDetectionEvaluator
from detectron2.utils.env import seed_all_rng

from kd_det.checkpoint import read_checkpoint
from kd_det.engine import KDTrainer, get_trainer_class
from kd_det.evaluation import build_evaluator


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.mark.parametrize(
    "config", ["synthetic/faster_rcnn_R_18_FPN.yaml", "synthetic/retinanet_R_18_FPN.yaml"]
)
def test_train_and_evaluate_coco_and_voc(config, tiny_data_root, tmp_path):
    cfg = tiny_cfg(
        config,
        tmp_path,
        ["SOLVER.MAX_ITER", 6, "DATASETS.TEST", (TINY_PREFIX + "_val", TINY_PREFIX + "_voc_val")],
    )
    trainer = get_trainer_class(cfg)(cfg)
    assert isinstance(trainer, KDTrainer)
    trainer.resume_or_load(resume=False)
    trainer.train()
    results = KDTrainer.test(cfg, trainer.model)
    coco, voc = results[TINY_PREFIX + "_val"]["bbox"], results[TINY_PREFIX + "_voc_val"]["bbox"]
    assert {"AP", "AP50", "AP75", "APs", "APm", "APl"} <= set(coco)
    assert {"AP", "AP50", "AP75"} <= set(voc)
    for v in list(coco.values()) + list(voc.values()):
        assert v != v or 0.0 <= v <= 100.0  # NaN only for empty size ranges
    assert os.path.isfile(os.path.join(tmp_path, "model_final.pth"))
    assert max(m["iteration"] for m in _metrics(tmp_path) if "total_loss" in m) == 5


def test_evaluator_registry(tiny_data_root, tmp_path):
    cfg = tiny_cfg("synthetic/faster_rcnn_R_18_FPN.yaml", tmp_path)
    assert isinstance(build_evaluator(cfg, TINY_PREFIX + "_val"), COCOEvaluator)
    assert isinstance(build_evaluator(cfg, TINY_PREFIX + "_voc_val"), PascalVOCDetectionEvaluator)
    cfg.TEST.EVALUATOR = "coco"
    assert isinstance(build_evaluator(cfg, TINY_PREFIX + "_voc_val"), COCOEvaluator)
    cfg.TEST.EVALUATOR = "lvis"
    with pytest.raises(KeyError, match="unknown TEST.EVALUATOR 'lvis'"):
        build_evaluator(cfg, TINY_PREFIX + "_val")
    cfg.TRAINER.NAME = "NoSuchTrainer"
    with pytest.raises(KeyError, match="NoSuchTrainer.*KDTrainer"):
        get_trainer_class(cfg)


@pytest.mark.slow
def test_ssim_distillation_lowers_the_ssim_loss(tiny_data_root, tmp_path, rcnn_teacher):
    cfg = tiny_cfg(
        "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
        tmp_path,
        [
            "KD.TEACHER.CONFIG",
            config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
            "KD.TEACHER.WEIGHTS",
            rcnn_teacher,
            "SOLVER.MAX_ITER",
            40,
            "SOLVER.BASE_LR",
            0.002,
            "KD.FEATURE.WEIGHT",
            4.0,
        ],
    )
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    ssim = [v for v, _ in trainer.storage.history("loss_kd_ssim").values()]
    assert len(ssim) == 40
    first, last = sum(ssim[:4]) / 4, sum(ssim[-4:]) / 4
    assert last < 0.92 * first, ssim


def _train_net(args, cwd):
    env = dict(os.environ, DETECTRON2_DATASETS=str(cwd / "datasets"), PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, os.path.join(REPO, "tools", "train_net.py")] + args,
        cwd=str(cwd),
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def _copypaste_values(proc):
    """The values of Detectron2's "copypaste:" result lines (e.g. ["1.23,4.56,..."])."""
    lines = [
        line.split("copypaste: ", 1)[1]
        for line in (proc.stdout + proc.stderr).splitlines()
        if "copypaste: " in line
    ]
    return [v for v in lines if not v.startswith("AP")]


SMALL = [
    "INPUT.MIN_SIZE_TRAIN",
    "(64,)",
    "INPUT.MAX_SIZE_TRAIN",
    "64",
    "INPUT.MIN_SIZE_TEST",
    "64",
    "INPUT.MAX_SIZE_TEST",
    "64",
    "SOLVER.IMS_PER_BATCH",
    "2",
    "DATALOADER.NUM_WORKERS",
    "0",
    "SOLVER.STEPS",
    "()",
    "SOLVER.WARMUP_ITERS",
    "1",
]


@pytest.mark.slow
def test_cli_teacher_then_distilled_student(tmp_path):
    """The user path of the SSIM issue: train a teacher with the tool, distil a student from it."""
    teacher_out = tmp_path / "teacher"
    _train_net(
        [
            "--config-file",
            config_path("synthetic/retinanet_R_50_FPN.yaml"),
            "SOLVER.MAX_ITER",
            "3",
            "OUTPUT_DIR",
            str(teacher_out),
            "DATASETS.TEST",
            "()",
        ]
        + SMALL,
        tmp_path,
    )
    student_out = tmp_path / "student"
    proc = _train_net(
        [
            "--config-file",
            config_path("synthetic/distill/ssim_retinanet_R50_to_R18.yaml"),
            "KD.TEACHER.CONFIG",
            config_path("synthetic/retinanet_R_50_FPN.yaml"),
            "KD.TEACHER.WEIGHTS",
            str(teacher_out / "model_final.pth"),
            "SOLVER.MAX_ITER",
            "3",
            "OUTPUT_DIR",
            str(student_out),
        ]
        + SMALL,
        tmp_path,
    )
    assert "copypaste: AP,AP50,AP75,APs,APm,APl" in proc.stdout + proc.stderr
    assert any("loss_kd_ssim" in m for m in _metrics(student_out))
    # the generated default data was used (and made on first use)
    assert (tmp_path / "datasets" / "kd_synthetic" / "SPEC.json").is_file()
    # --eval-only on the student's checkpoint: the student alone, the same AP, no teacher weights
    # needed,
    # and no training set either (this machine has no VOC 2012)
    trained_ap = _copypaste_values(proc)
    proc = _train_net(
        [
            "--config-file",
            config_path("synthetic/distill/ssim_retinanet_R50_to_R18.yaml"),
            "--eval-only",
            "KD.TEACHER.CONFIG",
            config_path("synthetic/retinanet_R_50_FPN.yaml"),
            "KD.TEACHER.WEIGHTS",
            str(tmp_path / "teacher_weights_not_here.pth"),
            "DATASETS.TRAIN",
            "('voc_2012_trainval',)",
            "MODEL.WEIGHTS",
            str(student_out / "model_final.pth"),
            "OUTPUT_DIR",
            str(student_out),
        ]
        + SMALL,
        tmp_path,
    )
    assert _copypaste_values(proc) == trained_ap and trained_ap
    assert (
        "not used by the model" not in proc.stdout + proc.stderr
    )  # the kd_ adapter weights are skipped quietly
    assert read_checkpoint(str(student_out / "model_final.pth"))["iteration"] == 2

    # --resume continues from the last checkpoint (iteration 3) to the new MAX_ITER
    proc = _train_net(
        [
            "--config-file",
            config_path("synthetic/distill/ssim_retinanet_R50_to_R18.yaml"),
            "--resume",
            "KD.TEACHER.CONFIG",
            config_path("synthetic/retinanet_R_50_FPN.yaml"),
            "KD.TEACHER.WEIGHTS",
            str(teacher_out / "model_final.pth"),
            "SOLVER.MAX_ITER",
            "5",
            "OUTPUT_DIR",
            str(student_out),
        ]
        + SMALL,
        tmp_path,
    )
    assert read_checkpoint(str(student_out / "model_final.pth"))["iteration"] == 4
    assert "Starting training from iteration 3" in proc.stdout + proc.stderr  # not from 0
    assert 4 in [m["iteration"] for m in _metrics(student_out) if "total_loss" in m]

    # release: student-only checkpoint + MODEL_ZOO.md from the evaluation; curves from metrics.json
    tools = os.path.join(REPO, "tools")
    zoo = tmp_path / "MODEL_ZOO.md"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(tools, "model_zoo.py"),
            str(student_out),
            "--release-dir",
            str(tmp_path / "release"),
            "-o",
            str(zoo),
            "--torchscript",
        ],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    row = [line for line in zoo.read_text().splitlines() if line.startswith("| student |")]
    assert (
        len(row) == 1 and "RetinaNet R-18-FPN" in row[0] and "| SSIM |" in row[0]
    ), zoo.read_text()
    assert (
        "warning: no flop count" not in proc.stderr and "| - | - |" not in row[0]
    )  # params and GFLOPs filled
    assert (
        tmp_path / "release" / "student" / "model.ts"
    ).is_file()  # checked against the model as it was traced
    from kd_det.release.student import file_sha256

    assert file_sha256(str(tmp_path / "release" / "student" / "model_final.pth"))[:12] in row[0]
    png = tmp_path / "curves.png"
    proc = subprocess.run(
        [
            sys.executable,
            os.path.join(tools, "plot_metrics.py"),
            str(teacher_out),
            str(student_out),
            "-o",
            str(png),
        ],
        cwd=str(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "loss_kd_ssim" in proc.stdout


def test_adamw_optimizer_and_unknown_optimizer(tiny_data_root, tmp_path):
    cfg = tiny_cfg("synthetic/retinanet_R_18_FPN.yaml", tmp_path)
    from detectron2.modeling import build_model

    model = build_model(cfg)
    assert cfg.SOLVER.OPTIMIZER == "AdamW"
    opt = KDTrainer.build_optimizer(cfg, model)
    assert isinstance(opt, torch.optim.AdamW)
    cfg.SOLVER.OPTIMIZER = "SGD"
    assert isinstance(KDTrainer.build_optimizer(cfg, model), torch.optim.SGD)
    cfg.SOLVER.OPTIMIZER = "Lion"
    with pytest.raises(ValueError, match="SOLVER.OPTIMIZER 'Lion'"):
        KDTrainer.build_optimizer(cfg, model)


@pytest.mark.slow
def test_teacher_evaluation_leaves_training_unchanged(tiny_data_root, tmp_path, rcnn_teacher):
    """KD.TEACHER.EVAL_BEFORE_TRAIN only logs: the same seed trains the same student with it or
    without it."""
    teacher = [
        "KD.TEACHER.CONFIG",
        config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
        "KD.TEACHER.WEIGHTS",
        rcnn_teacher,
    ]
    students = {}
    for evaluate in (False, True):
        cfg = tiny_cfg(
            "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
            tmp_path / str(evaluate),
            teacher + ["KD.TEACHER.EVAL_BEFORE_TRAIN", evaluate, "SOLVER.MAX_ITER", 2],
        )
        seed_all_rng(cfg.SEED)  # as tools/train_net.py's default_setup does
        trainer = KDTrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
        assert any(k.startswith("teacher/") for k in trainer.storage.latest()) == evaluate
        students[evaluate] = trainer.model.state_dict()  # the student and its adapters
    # bitwise: the same computation twice in one process (same kernels, same thread count)
    assert students[False].keys() == students[True].keys()
    assert all(torch.equal(students[False][k], students[True][k]) for k in students[False])


@pytest.mark.slow
def test_teacher_evaluated_before_training(tiny_data_root, tmp_path, rcnn_teacher):
    """KD.TEACHER.EVAL_BEFORE_TRAIN logs the teacher's own AP; KD.TEACHER.MIN_AP stops a run whose
    teacher is below it."""
    teacher = [
        "KD.TEACHER.CONFIG",
        config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
        "KD.TEACHER.WEIGHTS",
        rcnn_teacher,
    ]
    out = tmp_path / "logged"
    cfg = tiny_cfg(
        "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
        out,
        teacher + ["KD.TEACHER.EVAL_BEFORE_TRAIN", True, "SOLVER.MAX_ITER", 2],
    )
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    trainer.train()
    logged = {k: v for k, (v, it) in trainer.storage.latest().items() if k.startswith("teacher/")}
    assert all(
        it == 0 for k, (v, it) in trainer.storage.latest().items() if k.startswith("teacher/")
    )
    # the same as Detectron2's own evaluation of the teacher model with the teacher's config
    from kd_det.config.detector import load_detector_config

    tcfg = load_detector_config(trainer.model.teacher.config)
    tcfg.DATASETS.TEST, tcfg.OUTPUT_DIR = cfg.DATASETS.TEST, str(tmp_path / "reference")
    reference = KDTrainer.test(tcfg, trainer.model.teacher.model)["bbox"]
    expected = {"teacher/bbox/" + k: v for k, v in reference.items()}
    assert logged.keys() == expected.keys()
    assert all(
        logged[k] == v or (v != v and logged[k] != logged[k]) for k, v in expected.items()
    )  # NaN: no objects
    with open(
        out / "inference_teacher" / (TINY_PREFIX + "_val") / "coco_instances_results.json"
    ) as f:
        hook_detections = json.load(f)
    with open(tmp_path / "reference" / "inference" / "coco_instances_results.json") as f:
        assert (
            json.load(f) == hook_detections and hook_detections
        )  # the teacher's detections, not the student's
    assert [m for m in _metrics(out) if "teacher/bbox/AP" in m][0]["iteration"] == 0
    # and the model zoo row of the run shows it
    sys.path.insert(0, os.path.join(REPO, "tools"))
    from model_zoo import release_run  # tools/model_zoo.py

    (out / "config.yaml").write_text(cfg.dump())  # as tools/train_net.py's default_setup writes it
    row = release_run(str(out), str(tmp_path / "release"))
    assert row["teacher_ap"] == "{:.2f}".format(reference["AP"]) and row["distillation"] == "SSIM"
    assert (
        float(row["params"]) > 1 and float(row["gflops"]) > 0
    )  # the student's, from its test images

    # MIN_AP above the teacher's AP: stopped before the first iteration, nothing saved
    too_high = reference["AP"] + 1.0
    stopped = tmp_path / "stopped"
    cfg = tiny_cfg(
        "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
        stopped,
        teacher + ["KD.TEACHER.MIN_AP", too_high, "SOLVER.MAX_ITER", 2],
    )
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=False)
    with pytest.raises(
        ValueError,
        match=r"teacher \(weights .*teacher.pth\) has box AP [0-9.]+ on {}, "
        r"below KD.TEACHER.MIN_AP={}; training did not start".format(
            TINY_PREFIX + "_val", too_high
        ),
    ):
        trainer.train()
    assert "loss_kd_ssim" not in trainer.storage.latest() and not os.path.exists(
        stopped / "model_final.pth"
    )

    with pytest.raises(
        ValueError,
        match=r"MIN_AP=.* is checked on the test sets \(DATASETS.TEST; .*which are empty",
    ):
        KDTrainer(
            tiny_cfg(
                "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
                stopped,
                teacher + ["KD.TEACHER.MIN_AP", too_high, "DATASETS.TEST", ()],
            )
        )

    # a resumed run does not evaluate the teacher again
    cfg = tiny_cfg(
        "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
        out,
        teacher + ["KD.TEACHER.MIN_AP", too_high, "SOLVER.MAX_ITER", 3],
    )
    trainer = KDTrainer(cfg)
    trainer.resume_or_load(resume=True)
    assert trainer.start_iter == 2
    trainer.train()
    assert not any(k.startswith("teacher/") for k in trainer.storage.latest())

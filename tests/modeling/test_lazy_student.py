"""A distilled student written as a LazyConfig, and tools/lazyconfig_train_net.py."""

import copy
import importlib.util
import json
import os

import pytest
import torch
from conftest import REPO, TINY_PREFIX, config_path, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig, instantiate
from detectron2.data import MetadataCatalog
from detectron2.modeling import GeneralizedRCNN, build_model
from omegaconf import OmegaConf
from tolerances import assert_within, gamma

from kd_det.modeling import DistillGeneralizedRCNN
from kd_det.modeling import lazy_student as compat
from kd_det.modeling.lazy_student import lazy_student_model
from kd_det.release import deploy
from kd_det.release.student import file_sha256

LAZY_SSIM = config_path("synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py")
YAML_SSIM = "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml"


def _load_module(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    return tool


def _load_tool():
    return _load_module("lazyconfig_train_net")


def _teacher_opts(weights):
    return [
        "model.teacher.config=" + config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
        "model.teacher.weights=" + weights,
    ]


def _tiny_run(teacher_weights, out, batch, *extra):
    """Overrides that train LAZY_SSIM on the tiny data, writing to ``out``."""
    return (
        _teacher_opts(teacher_weights)
        + [
            "dataloader.train.dataset.names={}_train".format(TINY_PREFIX),
            "dataloader.test.dataset.names={}_val".format(TINY_PREFIX),
            "dataloader.train.total_batch_size={}".format(batch),
            "train.output_dir=" + str(out),
        ]
        + list(extra)
    )


def metrics_of(out):
    return [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]


def _shapes(model):
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _seeded(build, seed=3):
    torch.manual_seed(seed)
    return build()


def assert_same_weights(a, b):
    """Two models with the same state_dict keys and bitwise equal tensors."""
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    assert not [k for k in sa if not torch.equal(sa[k], sb[k])]


def assert_same_losses(a, b, batch, seed=4):
    """One training forward of each on ``batch`` (same random sampling): equal loss dicts."""
    from detectron2.utils.events import EventStorage

    losses = []
    for model in (a, b):
        torch.manual_seed(seed)
        with EventStorage(0):
            losses.append(model.train()(batch))
    assert sorted(losses[0]) == sorted(losses[1])
    assert all(torch.equal(losses[0][k], losses[1][k]) for k in losses[0]), losses
    return losses[0]


def test_lazy_student_is_the_yaml_student(tiny_data_root, tmp_path, rcnn_teacher):
    lazy = LazyConfig.apply_overrides(
        LazyConfig.load(LAZY_SSIM),
        _teacher_opts(rcnn_teacher)
        + [
            "dataloader.train.dataset.names={}_train".format(TINY_PREFIX),
            "dataloader.train.total_batch_size=2",
            "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
            "dataloader.train.mapper.augmentations.0.max_size=64",
        ],
    )
    cfg = tiny_cfg(
        YAML_SSIM,
        tmp_path,
        [
            "KD.TEACHER.CONFIG",
            config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
            "KD.TEACHER.WEIGHTS",
            rcnn_teacher,
        ],
    )
    # built in the yacs twin's order (student, teacher, adapters): the same initial weights
    model = _seeded(lambda: instantiate(lazy.model))
    yacs = _seeded(lambda: build_model(cfg))
    assert type(model) is DistillGeneralizedRCNN
    assert any(k.startswith("kd_feature.adapters") for k in model.state_dict())
    assert_same_weights(model, yacs)
    assert model.kd_feature.level_weights == yacs.kd_feature.level_weights
    assert model.kd_feature.weight == yacs.kd_feature.weight == 2.0
    saved = torch.load(rcnn_teacher, map_location="cpu", weights_only=False)["model"]
    assert all(torch.equal(saved[k], v) for k, v in model.teacher.model.state_dict().items())
    # ... and the same losses, distillation included, on one batch
    yacs.roi_heads.batch_size_per_image = model.roi_heads.batch_size_per_image  # tiny_cfg's 32
    yacs.proposal_generator.pre_nms_topk = model.proposal_generator.pre_nms_topk
    yacs.proposal_generator.post_nms_topk = model.proposal_generator.post_nms_topk
    losses = assert_same_losses(model, yacs, next(iter(instantiate(lazy.dataloader.train))))
    assert losses["loss_kd_ssim"] > 0
    # the class check reads the dataloader's training set (an interpolation in the config)
    assert list(instantiate(lazy.model.teacher.expected_classes)) == list(
        MetadataCatalog.get(TINY_PREFIX + "_train").thing_classes
    )
    student = instantiate(lazy_student_model(lazy.model))
    assert type(student) is GeneralizedRCNN and _shapes(student) == {
        k: v for k, v in _shapes(yacs).items() if not k.startswith("kd_")
    }
    # command-line overrides name the real arguments
    over = LazyConfig.apply_overrides(lazy, ["model.feature_distiller.weight=1.0"])
    assert instantiate(over.model).kd_feature.weight == 1.0


@pytest.mark.slow
def test_lazy_faster_rcnn_student_with_roi_soft_labels(tiny_data_root, rcnn_teacher):
    """Soft-label KD on the student's sampled RoIs (the teacher's box head scoring them) from a
    LazyConfig."""
    from detectron2.utils.events import EventStorage

    from kd_det.losses import SoftmaxKDLoss
    from kd_det.modeling import RoISoftLabelDistiller

    lazy = LazyConfig.apply_overrides(
        LazyConfig.load(LAZY_SSIM),
        _teacher_opts(rcnn_teacher)
        + [
            "dataloader.train.dataset.names={}_train".format(TINY_PREFIX),
            "dataloader.train.total_batch_size=2",
        ],
    )
    lazy.model.roi_soft_label = L(RoISoftLabelDistiller)(
        loss=L(SoftmaxKDLoss)(temperature=1.0), weight=1.0
    )
    model = instantiate(lazy.model).train()
    with EventStorage(0):
        losses = model(next(iter(instantiate(lazy.dataloader.train))))
    assert {"loss_kd_soft", "loss_kd_ssim", "loss_cls", "loss_rpn_cls"} <= set(losses)
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert all(p.grad is None for p in model.teacher.model.parameters())


def test_teacher_follows_the_student_to_a_device_or_dtype(tiny_data_root, rcnn_teacher):
    lazy = LazyConfig.apply_overrides(LazyConfig.load(LAZY_SSIM), _teacher_opts(rcnn_teacher))
    model = instantiate(lazy.model)
    model.to(torch.float64)
    assert all(p.dtype == torch.float64 for p in model.teacher.model.parameters())
    assert all(not p.requires_grad for p in model.teacher.model.parameters())
    assert model.teacher.model.pixel_mean.dtype == torch.float64


# not `numeric`: its traced-student check is compare_detections, which test_export's numeric
# tests rerun with other CPU kernels; this one is about the LazyConfig path
@pytest.mark.slow
def test_lazy_student_trains_resumes_and_evaluates_without_its_teacher(
    tiny_data_root, tmp_path, rcnn_teacher
):
    tool = _load_tool()
    out = tmp_path / "run"
    small = _tiny_run(rcnn_teacher, out, 2, "train.checkpointer.period=1")
    tool.main(
        tool.default_argument_parser().parse_args(
            ["--config-file", LAZY_SSIM]
            + small
            + ["train.max_iter=2", "train.teacher_eval.enabled=True"]
        )
    )
    final = torch.load(out / "model_final.pth", weights_only=False)
    assert final["iteration"] == 1
    assert not [k for k in final["model"] if k.startswith("teacher")]
    assert any(k.startswith("kd_feature.adapters") for k in final["model"])
    # resumable: the optimizer's state and the LR schedule's position are saved with the weights
    assert "optimizer" in final["trainer"] and "LRScheduler" in final["trainer"]["hooks"]
    metrics = [json.loads(line) for line in (out / "metrics.json").read_text().splitlines()]
    assert all("loss_kd_ssim" in m for m in metrics if "total_loss" in m)
    assert any("bbox/AP" in m for m in metrics)  # evaluated at the end
    # the distillation health monitor, on by default (train.kd_monitor), measured iteration 0
    assert any("kd_grad_ratio/loss_kd_ssim" in m for m in metrics)
    # the teacher, scored before the first step (train.teacher_eval), as tools/train_net.py logs it
    teacher_ap = [m for m in metrics if "teacher/bbox/AP" in m]
    assert len(teacher_ap) == 1 and teacher_ap[0]["iteration"] == 0
    assert (
        out / "inference_teacher" / (TINY_PREFIX + "_val") / "coco_instances_results.json"
    ).is_file()

    tool.main(
        tool.default_argument_parser().parse_args(
            ["--config-file", LAZY_SSIM, "--resume"] + small + ["train.max_iter=3"]
        )
    )
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 2
    assert (out / "last_checkpoint").read_text() == "model_final.pth"
    assert len([m for m in metrics_of(out) if "teacher/bbox/AP" in m]) == 1  # not again on --resume

    # evaluation builds the student alone: the teacher's weights need not exist
    results = tool.main(
        tool.default_argument_parser().parse_args(
            [
                "--config-file",
                LAZY_SSIM,
                "--eval-only",
                "model.teacher.weights=/nonexistent/teacher.pth",
                "dataloader.test.dataset.names={}_val".format(TINY_PREFIX),
                "train.output_dir=" + str(tmp_path / "eval"),
                "train.init_checkpoint=" + str(out / "model_final.pth"),
            ]
        )
    )
    assert "AP" in results["bbox"]

    # release: the student's weights and a LazyConfig whose model vanilla Detectron2 builds
    export = _load_module("export_student")
    out_release = export.main(
        [
            "--config-file",
            LAZY_SSIM,
            "--weights",
            str(out / "model_final.pth"),
            "--output-dir",
            str(tmp_path / "release"),
        ]
    )
    released = LazyConfig.load(out_release["config"])
    assert released.train.init_checkpoint == out_release["weights"]
    assert "kd_det" not in json.dumps(OmegaConf.to_container(released.model))
    student = instantiate(released.model)
    assert type(student) is GeneralizedRCNN
    incompatible = DetectionCheckpointer(student)._load_model(
        torch.load(out_release["weights"], weights_only=False)
    )
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    trained = torch.load(out / "model_final.pth", weights_only=False)["model"]
    assert all(torch.equal(v, trained[k]) for k, v in student.state_dict().items())

    # TorchScript and ONNX of the released LazyConfig student, preprocessing from its
    # dataloader.test
    deployed = export.main(
        [
            "--config-file",
            LAZY_SSIM,
            "--weights",
            str(out / "model_final.pth"),
            "--output-dir",
            str(tmp_path / "release_ts"),
            "--torchscript",
            "--onnx",
            "dataloader.test.dataset.names={}_val".format(TINY_PREFIX),
            "model.roi_heads.box_predictor.test_score_thresh=0.0",
        ]
    )
    for sidecar in ("torchscript.json", "onnx.json"):
        meta = json.loads((tmp_path / "release_ts" / sidecar).read_text())
        assert meta["meta_architecture"] == "GeneralizedRCNN" and meta["score_thresh_test"] == 0.0
        assert meta["input"]["format"] == "BGR" and (
            meta["input"]["min_size_test"],
            meta["input"]["max_size_test"],
        ) == (
            128,
            256,
        )  # the config's test ResizeShortestEdge
        assert meta["classes"] == MetadataCatalog.get(TINY_PREFIX + "_val").thing_classes
        assert meta["traced_on"].endswith("val_000000.jpg") and all(
            row["detections"] for row in meta["checked"]
        )
    released = LazyConfig.load(deployed["config"])
    student = instantiate(released.model).eval()
    DetectionCheckpointer(student).load(deployed["weights"])
    traced = torch.jit.load(deployed["torchscript"])
    image = torch.randint(0, 255, (3, 96, 128)).float()
    # matched one to one within the bounds derived from the student, as the export's own check
    rows = deploy.compare_detections(student, traced, [image], "the reloaded TorchScript student")
    assert rows[0]["detections"] > 0 and rows[0]["matched"] > 0

    # a model-zoo row from the run's own records (its LazyConfig config.yaml, metrics.json)
    row = _load_module("model_zoo").release_run(str(out), str(tmp_path / "zoo"))
    assert (row["arch"], row["backbone"], row["distillation"]) == (
        "GeneralizedRCNN",
        "R-18-FPN",
        "SSIM",
    )
    assert row["teacher"] == config_path("synthetic/faster_rcnn_R_50_FPN.yaml")
    assert row["teacher_ap"] == "{:.2f}".format(teacher_ap[0]["teacher/bbox/AP"])
    assert row["schedule"] == "3 it x 2 img" and row["dataset"] == "{0}_train / {0}_val".format(
        TINY_PREFIX
    )
    # (NaN after 3 iterations: nothing detected yet)
    assert row["ap"]["AP"] == pytest.approx(
        [m for m in metrics_of(out) if "bbox/AP" in m][-1]["bbox/AP"], nan_ok=True
    )
    assert (
        float(row["params"]) > 1
        and float(row["gflops"]) > 0
        and row["sha256"] == file_sha256(row["weights"])
    )
    assert type(instantiate(LazyConfig.load(row["config"]).model)) is GeneralizedRCNN


def test_lazy_config_overrides_must_be_key_value(tmp_path):
    tool = _load_tool()
    with pytest.raises(SystemExit):
        tool.cli(["--config-file", LAZY_SSIM, "train.max_iter", "3"])


def test_lazy_student_errors(tiny_data_root, rcnn_teacher):
    def lazy(*opts):  # apply_overrides changes the config it is given
        return LazyConfig.apply_overrides(
            LazyConfig.load(LAZY_SSIM), _teacher_opts(rcnn_teacher) + list(opts)
        )

    # shapes a config gives as numbers are checked against the backbones, naming the argument
    bad = lazy("model.feature_distiller.teacher_channels=256")
    with pytest.raises(
        ValueError,
        match=r"feature_distiller was built for 256 channels of the "
        r"teacher at level 'p2', but its backbone outputs 128: "
        r"set teacher_channels=128",
    ):
        instantiate(bad.model)
    bad = lazy("model.feature_distiller.levels=[p3,p7]")
    with pytest.raises(
        ValueError,
        match=r"feature_distiller imitates level 'p7', which the "
        r"student's backbone does not output",
    ):
        instantiate(bad.model)
    bad = lazy("model.feature_distiller.student_channels={p2: 64}")
    with pytest.raises(
        ValueError,
        match=r"student_channels \{'p2': 64\} gives no channel count "
        r"for levels \['p3', 'p4', 'p5', 'p6'\]",
    ):
        instantiate(bad.model)
    bad = lazy("model.teacher=null")
    with pytest.raises(
        ValueError,
        match=r"teacher must be a FrozenTeacher, e.g. built by "
        r"L\(kd_det.modeling.build_teacher\)",
    ):
        instantiate(bad.model)
    # the teacher's own checks apply as they are: a missing checkpoint
    bad = lazy("model.teacher.weights=/nonexistent/teacher.pth")
    with pytest.raises(
        FileNotFoundError,
        match="teacher weights " "KD.TEACHER.WEIGHTS='/nonexistent/teacher.pth' " "not found",
    ):
        instantiate(bad.model)
    # a plain LazyCall is not a distilled one: lazy_student_model leaves it as it is
    plain = L(GeneralizedRCNN)(backbone=None)
    assert lazy_student_model(plain) is plain
    # the student alone: the arguments only distillation takes are dropped (read from the
    # constructors), and the interpolations they held with them
    student = lazy_student_model(lazy().model)
    assert student._target_ is GeneralizedRCNN and set(student.keys()) == {
        "_target_",
        "backbone",
        "proposal_generator",
        "roi_heads",
        "pixel_mean",
        "pixel_std",
        "input_format",
    }


def test_old_form_kd_errors(tiny_data_root, rcnn_teacher):
    """The deprecated kd={...} form keeps its checks, when the config loads and when it builds."""
    student = lazy_student_model(LazyConfig.load(LAZY_SSIM).model)
    with pytest.raises(ValueError, match=r"does not fit kd_det's KD keys.*FEATURE.LOSSS"):
        compat.lazy_distilled_model(student, kd={"FEATURE": {"LOSSS": "SSIMFeatureLoss"}})
    with pytest.raises(
        ValueError, match=r"KD.CURRICULUM, which only tools/train_net.py's KDTrainer reads"
    ):
        compat.lazy_distilled_model(student, kd={"CURRICULUM": {"ENABLED": True}})
    with pytest.raises(
        ValueError,
        match=r"meta_architecture 'DistillRetinaNet' distils a "
        r"RetinaNet student, but the LazyCall builds a "
        r"GeneralizedRCNN",
    ):
        compat.lazy_distilled_model(student, kd={}, meta_architecture="DistillRetinaNet")
    with pytest.raises(
        ValueError,
        match=r"'SelfDistillRetinaNet' is not a kd_det distillation meta-architecture "
        r"with a teacher",
    ):
        compat.lazy_distilled_model(student, kd={}, meta_architecture="SelfDistillRetinaNet")
    with pytest.raises(ValueError, match=r"takes the student's LazyCall"):
        compat.lazy_distilled_model({"backbone": None}, kd={})
    old = LazyConfig.load(LAZY_SSIM)
    old.model = compat.lazy_distilled_model(
        student,
        kd={
            "TEACHER": {
                "CONFIG": config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
                "WEIGHTS": rcnn_teacher,
            }
        },
    )
    bad = LazyConfig.apply_overrides(old, ["model.kd.FEATURE.LOSS=SSIMLoss"])
    with pytest.raises(KeyError, match="SSIMLoss"):
        instantiate(bad.model)
    assert compat.build_distilled_model is bad.model._target_


@pytest.mark.slow
def test_teacher_min_ap_stops_a_lazy_run_before_its_first_step(
    tiny_data_root, tmp_path, rcnn_teacher
):
    from kd_det.engine.lazy import lazy_teacher_eval_hook

    tool = _load_tool()
    out = tmp_path / "run"
    opts = _tiny_run(rcnn_teacher, out, 2, "train.max_iter=2", "train.teacher_eval.min_ap=99.0")
    with pytest.raises(
        ValueError,
        match=r"teacher \(weights .*\) has box AP [0-9.]+ on {}, below "
        r"train.teacher_eval.min_ap=99.0; training did not "
        r"start".format(TINY_PREFIX + "_val"),
    ):
        tool.main(tool.default_argument_parser().parse_args(["--config-file", LAZY_SSIM] + opts))
    assert not list(out.glob("model_*.pth"))
    # nothing to check it on: refused by name
    lazy = LazyConfig.apply_overrides(
        LazyConfig.load(LAZY_SSIM),
        ["train.teacher_eval.min_ap=30", "dataloader.test.dataset.names=[]"],
    )
    with pytest.raises(
        ValueError,
        match=r"min_ap=30.0 is checked on the test sets " r".*dataloader.test.dataset.names",
    ):
        lazy_teacher_eval_hook(lazy)
    typo = LazyConfig.apply_overrides(LazyConfig.load(LAZY_SSIM), ["train.teacher_eval.min_AP=3"])
    with pytest.raises(
        ValueError, match=r"train.teacher_eval takes enabled and min_ap " r".*not \['min_AP'\]"
    ):
        lazy_teacher_eval_hook(typo)
    assert lazy_teacher_eval_hook(LazyConfig.load(LAZY_SSIM)) is None  # not asked for
    assert (
        lazy_teacher_eval_hook(
            LazyConfig.load(config_path("synthetic/faster_rcnn_R_50_FPN_lazy.py"))
        )
        is None
    )


@pytest.mark.slow
def test_lazy_gradient_accumulation(tiny_data_root, tmp_path, rcnn_teacher):
    """train.grad_accum_steps: micro-batches of total_batch_size / k, one optimizer step per
    iteration."""
    from kd_det.engine import GradientAccumulationTrainer
    from kd_det.engine.lazy import build_lazy_trainer

    out = tmp_path / "run"
    opts = _tiny_run(rcnn_teacher, out, 4, "train.max_iter=1", "train.grad_accum_steps=2")
    lazy = LazyConfig.apply_overrides(LazyConfig.load(LAZY_SSIM), opts)
    model = instantiate(lazy.model)
    lazy.optimizer.params.model = model
    trainer = build_lazy_trainer(lazy, model, instantiate(lazy.optimizer))
    assert isinstance(trainer, GradientAccumulationTrainer) and trainer.steps == 2
    assert len(next(iter(trainer.data_loader))) == 2  # 4 images per iteration, 2 per micro-batch
    assert lazy.dataloader.train.total_batch_size == 4  # the config itself is left as it is
    with pytest.raises(
        ValueError,
        match=r"dataloader.train.total_batch_size=4 must be a multiple of "
        r"train.grad_accum_steps=3",
    ):
        build_lazy_trainer(
            LazyConfig.apply_overrides(lazy, ["train.grad_accum_steps=3"]), model, trainer.optimizer
        )

    tool = _load_tool()
    tool.main(tool.default_argument_parser().parse_args(["--config-file", LAZY_SSIM] + opts))
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 0
    assert [m for m in metrics_of(out) if "loss_kd_ssim" in m]


CURRICULUM_CONFIG = """
from detectron2.config import LazyCall as L
from detectron2.config import LazyConfig

from kd_det.data.curriculum import curriculum_sampler

_base = LazyConfig.load({base!r})
model, dataloader, optimizer, lr_multiplier, train = (
    _base.model, _base.dataloader, _base.optimizer, _base.lr_multiplier, _base.train)
dataloader.train.sampler = L(curriculum_sampler)(
    dataset="${{..dataset}}", scores={scores!r}, phase_iters=[3], phase_fractions=[0.25])
"""


@pytest.mark.slow
def test_lazy_curriculum(tiny_data_root, tmp_path, rcnn_teacher):
    """A curriculum in a LazyConfig is the training loader's sampler; its phases count whole
    iterations."""
    from detectron2.data import get_detection_dataset_dicts

    from kd_det.data.curriculum import find_curriculum_sampler, image_key
    from kd_det.engine.curriculum import restart_curriculum
    from kd_det.engine.lazy import build_lazy_trainer

    out = tmp_path / "run"
    opts = _tiny_run(rcnn_teacher, out, 2, "train.max_iter=2", "train.grad_accum_steps=2")
    # a student snapshot scores every training image (tools/score_images.py reads the LazyConfig
    # too)
    torch.manual_seed(0)
    DetectionCheckpointer(
        instantiate(LazyConfig.apply_overrides(LazyConfig.load(LAZY_SSIM), opts).model),
        save_dir=str(tmp_path),
    ).save("snapshot")
    _load_module("score_images").main(
        [
            "--config-file",
            LAZY_SSIM,
            "--snapshot",
            str(tmp_path / "snapshot.pth"),
            "--score",
            "total",
            "--output",
            str(tmp_path / "scores.json"),
        ]
        + opts
    )
    scores = json.loads((tmp_path / "scores.json").read_text())
    dataset = get_detection_dataset_dicts(TINY_PREFIX + "_train")
    assert scores["datasets"] == [TINY_PREFIX + "_train"] and len(scores["scores"]) == len(dataset)
    assert all(v > 0 for v in scores["scores"].values())
    # ... and tools/visualize_distillation.py maps its feature loss on dataloader.test's set
    # (adapters included)
    vis = _load_module("visualize_distillation").main(
        [
            "--config-file",
            LAZY_SSIM,
            "--weights",
            str(tmp_path / "snapshot.pth"),
            "--num-images",
            "1",
            "--output-dir",
            str(tmp_path / "vis"),
        ]
        + opts
    )
    assert vis["dataset"] == TINY_PREFIX + "_val" and vis["feature_loss"] == "SSIMFeatureLoss"
    assert (
        len(vis["images"]) == 1
        and vis["images"][0]["loss"] > 0
        and len(vis["images"][0]["levels"]) == 5
    )

    config = tmp_path / "curriculum_lazy.py"
    config.write_text(
        CURRICULUM_CONFIG.format(base=LAZY_SSIM, scores=str(tmp_path / "scores.json"))
    )
    lazy = LazyConfig.apply_overrides(LazyConfig.load(str(config)), opts)
    model = instantiate(lazy.model)
    lazy.optimizer.params.model = model
    trainer = build_lazy_trainer(lazy, model, instantiate(lazy.optimizer))
    sampler = find_curriculum_sampler(trainer.data_loader)
    assert (
        sampler is not None and sampler._images_per_iter == 2
    )  # both micro-batches of an iteration
    easiest = {dataset[i]["image_id"] for i in sampler.pool(0)}
    by_score = sorted(dataset, key=lambda r: (scores["scores"][image_key(r)], r["image_id"]))
    assert len(easiest) == len(dataset) // 4 and easiest == {
        r["image_id"] for r in by_score[: len(dataset) // 4]
    }
    seen = [r["image_id"] for _ in range(4) for r in next(trainer._data_loader_iter)]
    assert len(seen) == 4 and set(seen) <= easiest  # 2 iterations of 2 micro-batches of 1 image
    assert (
        restart_curriculum(trainer, 2) and sampler._start == 2 * 2
    )  # --resume: where iteration 2 begins

    tool = _load_tool()
    tool.main(tool.default_argument_parser().parse_args(["--config-file", str(config)] + opts))
    tool.main(
        tool.default_argument_parser().parse_args(
            ["--config-file", str(config), "--resume"]
            + opts[:-2]
            + ["train.max_iter=3", "train.grad_accum_steps=2"]
        )
    )
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 2
    # in the deprecated kd={...} form, the curriculum is refused with the LazyConfig form named
    with pytest.raises(
        ValueError, match=r"dataloader.train.sampler = L\(kd_det.data.curriculum.curriculum_sampler"
    ):
        compat.lazy_distilled_model(
            lazy_student_model(lazy.model), kd={"CURRICULUM": {"ENABLED": True}}
        )


LAZY_FRSKD = config_path("synthetic/distill/self_frskd_faster_rcnn_R18_lazy.py")


@pytest.mark.slow
def test_lazy_self_distilled_student_is_the_yaml_one_and_trains(tiny_data_root, tmp_path):
    """FRSKD from a LazyConfig: the yaml twin's modules (self-teacher, its heads), trained and
    released without them."""
    from kd_det.modeling import SelfDistillGeneralizedRCNN

    lazy = LazyConfig.load(LAZY_FRSKD)
    # built in the yacs twin's order (student, self-teacher, its feature target, its heads)
    model = _seeded(lambda: instantiate(lazy.model))
    yacs_cfg = tiny_cfg("synthetic/distill/self_frskd_faster_rcnn_R18.yaml", tmp_path)
    yacs = _seeded(lambda: build_model(yacs_cfg))
    assert type(model) is SelfDistillGeneralizedRCNN
    assert_same_weights(model, yacs)
    assert any(k.startswith("kd_self_roi_heads.") for k in _shapes(model))
    # the self-teacher's heads are initialised on their own, not copies of the student's weights
    assert not torch.equal(
        model.kd_self_roi_heads.box_predictor.cls_score.weight,
        model.roi_heads.box_predictor.cls_score.weight,
    )
    assert type(instantiate(lazy_student_model(lazy.model))) is GeneralizedRCNN
    from kd_det.engine.lazy import lazy_teacher_eval_hook

    assert lazy_teacher_eval_hook(lazy) is None  # no teacher, no train.teacher_eval
    # a self-teacher built for other channels than the student's is refused by name
    bad = LazyConfig.apply_overrides(
        LazyConfig.load(LAZY_FRSKD), ["model.self_teacher.input_shapes=128"]
    )
    with pytest.raises(
        ValueError,
        match=r"self_teacher was built for 128 channels at level 'p2', "
        r"but the student's backbone outputs 64: set its "
        r"input_shapes=64",
    ):
        instantiate(bad.model)
    bad = LazyConfig.apply_overrides(LazyConfig.load(LAZY_FRSKD), ["model.self_teacher.width=128"])
    with pytest.raises(
        ValueError,
        match=r"self_proposal_generator takes 64 channels, but the "
        r"self-teacher's refined maps have 128 \(its width; "
        r"KD.SELF.WIDTH_MULTIPLIER\)",
    ):
        instantiate(bad.model)

    tool = _load_tool()
    out = tmp_path / "run"
    opts = [
        "dataloader.train.dataset.names={}_train".format(TINY_PREFIX),
        "dataloader.test.dataset.names={}_val".format(TINY_PREFIX),
        "dataloader.train.total_batch_size=2",
        "train.output_dir=" + str(out),
        "train.max_iter=1",
    ]
    tool.main(tool.default_argument_parser().parse_args(["--config-file", LAZY_FRSKD] + opts))
    logged = [m for m in metrics_of(out) if "total_loss" in m]
    assert logged and {"loss_kd_at", "loss_self_cls", "loss_self_rpn_cls"} <= set(logged[-1])
    released = _load_module("export_student").main(
        [
            "--config-file",
            LAZY_FRSKD,
            "--weights",
            str(out / "model_final.pth"),
            "--output-dir",
            str(tmp_path / "release"),
        ]
        + opts
    )
    student = instantiate(LazyConfig.load(released["config"]).model)
    incompatible = DetectionCheckpointer(student)._load_model(
        torch.load(released["weights"], weights_only=False)
    )
    assert (
        type(student) is GeneralizedRCNN
        and not incompatible.missing_keys
        and not incompatible.unexpected_keys
    )
    row = _load_module("model_zoo").release_run(str(out), str(tmp_path / "zoo"))
    assert (row["arch"], row["distillation"], row["teacher"]) == (
        "GeneralizedRCNN",
        "FRSKD self-distillation (AttentionTransfer)",
        "",
    )


def test_retinanet_self_distillation_from_explicit_arguments(tiny_data_root, tmp_path):
    """SelfDistillRetinaNet from explicit arguments (as a LazyConfig composes it): its yacs twin."""
    from detectron2.modeling import RetinaNet
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    from kd_det.losses import AttentionTransferLoss, SoftLabelKDLoss
    from kd_det.modeling import (
        BiFPNSelfTeacher,
        DensePredictionDistiller,
        FeatureDistiller,
        SelfDistillRetinaNet,
    )

    cfg = tiny_cfg("synthetic/distill/self_frskd_retinanet_R18.yaml", tmp_path)
    soft = cfg.KD.SELF.SOFT_LABEL

    def explicit(width=64):
        student = RetinaNet.from_config(cfg)
        levels = list(student["head_in_features"])
        return SelfDistillRetinaNet(
            **student,
            self_teacher=BiFPNSelfTeacher(
                in_features=levels, input_shapes=64, width=width, norm=cfg.KD.SELF.NORM
            ),
            feature_distiller=FeatureDistiller(
                levels=levels,
                student_channels=64,
                teacher_channels=width,
                loss=AttentionTransferLoss(),
                weight=cfg.KD.FEATURE.WEIGHT,
            ),
            self_head=RetinaNetHead(cfg, [student["backbone"].output_shape()[f] for f in levels]),
            prediction_distiller=DensePredictionDistiller(
                num_classes=student["num_classes"],
                soft_label_loss=SoftLabelKDLoss(temperature=soft.TEMPERATURE),
                soft_label_weight=soft.WEIGHT,
            )
        )

    model = _seeded(explicit)
    yacs = _seeded(lambda: build_model(cfg))
    assert type(model) is SelfDistillRetinaNet
    assert_same_weights(model, yacs)
    assert model.kd_prediction.soft_label_weight == yacs.kd_prediction.soft_label_weight > 0
    # a head for the student's channels on wider refined maps is refused by name
    with pytest.raises(
        ValueError,
        match=r"self_head takes 64 channels, but the self-teacher's " r"refined maps have 128",
    ):
        explicit(width=128)


def test_old_form_self_distillation_still_builds(tiny_data_root, tmp_path):
    """build_self_distilled_model (the deprecated form's target) for a RetinaNet student."""
    from detectron2.modeling import RetinaNet
    from detectron2.modeling.meta_arch.retinanet import RetinaNetHead

    from kd_det.modeling import SelfDistillRetinaNet

    yacs_cfg = tiny_cfg("synthetic/distill/self_frskd_retinanet_R18.yaml", tmp_path)
    kd = {
        "FEATURE": {"LOSS": yacs_cfg.KD.FEATURE.LOSS, "WEIGHT": yacs_cfg.KD.FEATURE.WEIGHT},
        "SELF": {"SOFT_LABEL": {"WEIGHT": yacs_cfg.KD.SELF.SOFT_LABEL.WEIGHT}},
    }
    student = RetinaNet.from_config(yacs_cfg)
    head = RetinaNetHead(
        yacs_cfg, [student["backbone"].output_shape()[f] for f in student["head_in_features"]]
    )
    model = compat.build_self_distilled_model("SelfDistillRetinaNet", kd, self_head=head, **student)
    assert type(model) is SelfDistillRetinaNet and _shapes(model) == _shapes(build_model(yacs_cfg))
    assert model.kd_prediction.soft_label_weight == yacs_cfg.KD.SELF.SOFT_LABEL.WEIGHT > 0
    # copied heads take the student's channels: a wider self-teacher is refused by name
    wide = dict(kd, SELF={"WIDTH_MULTIPLIER": 2.0})
    with pytest.raises(
        ValueError,
        match=r"take \[64\] channels, but the refined maps have 128 "
        r"\(KD.SELF.WIDTH_MULTIPLIER\)",
    ):
        compat.build_self_distilled_model(
            "SelfDistillRetinaNet", wide, self_head=head, **RetinaNet.from_config(yacs_cfg)
        )
    # KD.SELF belongs to self-distillation: a distilled (teacher) student refuses it and names the
    # way
    with pytest.raises(ValueError, match=r"KD.SELF.*lazy_self_distilled_model"):
        compat.lazy_distilled_model(
            lazy_student_model(LazyConfig.load(LAZY_SSIM).model), kd={"SELF": {"NORM": "BN"}}
        )
    with pytest.raises(ValueError, match=r"'DistillRetinaNet' is not a kd_det self-distillation"):
        compat.lazy_self_distilled_model(
            L(RetinaNet)(), kd={}, meta_architecture="DistillRetinaNet"
        )
    old = compat.lazy_self_distilled_model(
        lazy_student_model(LazyConfig.load(LAZY_SSIM).model),
        kd={"FEATURE": {"LOSS": "AttentionTransferLoss", "WEIGHT": 1.0}},
    )
    assert type(instantiate(lazy_student_model(old))) is GeneralizedRCNN


@pytest.mark.numeric
def test_clipped_optimizer_clips_each_parameter():
    from kd_det.engine.lazy import clipped_optimizer

    weight = torch.nn.Parameter(torch.zeros(4))
    opt = clipped_optimizer("torch.optim.SGD", [weight], clip_type="norm", clip_value=1.0, lr=1.0)
    weight.grad = torch.full((4,), 10.0)  # norm 20, exact
    opt.step()
    # the step used the clipped gradient: scaled by 1 / (20 + 1e-6) (torch's clip_grad_norm_), so
    # its norm is 1 - 5e-8, up to the roundings of that scale (2), the product, the step's
    # subtraction and the norm (4 squares summed, a square root): at most 8 in a row
    assert_within(weight.detach().norm(), 1.0, 1e-6 / 20 + gamma(8), "norm of the clipped step")
    with pytest.raises(ValueError, match="not a torch.optim.Optimizer class"):
        clipped_optimizer("torch.nn.Linear", [weight])
    with pytest.raises(ValueError, match="by 'value' or 'norm'"):
        clipped_optimizer(torch.optim.SGD, [weight], clip_type="full_model", lr=1.0)


@pytest.mark.slow
def test_plain_lazy_config_trains_and_missing_training_keys_are_named(tiny_data_root, tmp_path):
    tool = _load_tool()
    teacher_config = config_path("synthetic/faster_rcnn_R_50_FPN_lazy.py")
    out = tmp_path / "teacher"
    tool.main(
        tool.default_argument_parser().parse_args(
            [
                "--config-file",
                teacher_config,
                "dataloader.train.dataset.names={}_train".format(TINY_PREFIX),
                "dataloader.test.dataset.names={}_val".format(TINY_PREFIX),
                "dataloader.train.total_batch_size=2",
                "train.output_dir=" + str(out),
                "train.max_iter=1",
                "train.eval_period=0",
            ]
        )
    )
    assert torch.load(out / "model_final.pth", weights_only=False)["iteration"] == 0

    model_only = tmp_path / "model_only.py"
    model_only.write_text(
        "from detectron2.config import LazyCall as L\nfrom detectron2.modeling import "
        "GeneralizedRCNN\nmodel = L(GeneralizedRCNN)(backbone=None)\n"
    )
    with pytest.raises(
        ValueError, match=r"has no dataloader, optimizer, lr_multiplier, train: training needs"
    ):
        tool.main(tool.default_argument_parser().parse_args(["--config-file", str(model_only)]))


def test_retinanet_student_from_explicit_arguments(tiny_data_root, tmp_path, retina_teacher):
    """DistillRetinaNet, RM and PFI, from explicit arguments (as in a LazyConfig): its twin."""
    from detectron2.modeling import RetinaNet

    from kd_det.data.classes import thing_classes
    from kd_det.losses import L2FeatureLoss, RankMimickingLoss
    from kd_det.modeling import (
        DensePredictionDistiller,
        DistillRetinaNet,
        FeatureDistiller,
        build_teacher,
    )

    teacher_config = config_path("synthetic/retinanet_R_50_FPN.yaml")
    cfg = tiny_cfg(
        "synthetic/distill/rm_pfi_retinanet_R50_to_R18.yaml",
        tmp_path,
        ["KD.TEACHER.CONFIG", teacher_config, "KD.TEACHER.WEIGHTS", retina_teacher],
    )
    assert (cfg.KD.FEATURE.LOSS, cfg.KD.FEATURE.ADAPTER, cfg.KD.FEATURE.LEVEL_REDUCTION) == (
        "L2FeatureLoss",
        "auto",
        "mean",
    )

    def explicit(train_sets=(TINY_PREFIX + "_train",), **over):
        # in the yacs order: the student, the teacher, the adapters
        student = RetinaNet.from_config(cfg)
        teacher = build_teacher(
            teacher_config, retina_teacher, expected_classes=thing_classes(train_sets)
        )
        args = dict(
            feature_distiller=FeatureDistiller(
                levels=["p3", "p4", "p5", "p6", "p7"],
                student_channels=64,
                teacher_channels=128,
                loss=L2FeatureLoss(),
                weight=cfg.KD.FEATURE.WEIGHT,
            ),
            prediction_distiller=DensePredictionDistiller(
                num_classes=student["num_classes"],
                rm_loss=RankMimickingLoss(temperature=cfg.KD.RM.TEMPERATURE),
                rm_weight=cfg.KD.RM.WEIGHT,
            ),
            pfi=True,
        )
        return DistillRetinaNet(**student, teacher=teacher, **dict(args, **over))

    model = _seeded(explicit)
    yacs = _seeded(lambda: build_model(cfg))
    assert type(model) is DistillRetinaNet
    assert_same_weights(model, yacs)
    assert model.kd_prediction.rm_weight == yacs.kd_prediction.rm_weight > 0
    assert model.pfi and yacs.pfi
    losses = assert_same_losses(model, yacs, next(iter(_tiny_loader(cfg))))
    assert losses["loss_kd_rm"] > 0 and losses["loss_kd_l2"] > 0
    # a weight of 0 switches a distiller off, as in a yacs config
    off = explicit(
        prediction_distiller=DensePredictionDistiller(
            num_classes=cfg.MODEL.RETINANET.NUM_CLASSES, rm_loss=RankMimickingLoss(), rm_weight=0.0
        )
    )
    assert off.kd_prediction is None
    with pytest.raises(
        ValueError, match=r"prediction_distiller has num_classes=3 but the " r"student 5"
    ):
        explicit(
            prediction_distiller=DensePredictionDistiller(
                num_classes=3, rm_loss=RankMimickingLoss(), rm_weight=1.0
            )
        )
    with pytest.raises(ValueError, match=r"KD.PFI.ENABLED \(pfi\) weights the feature imitation"):
        explicit(feature_distiller=None)
    # the class check reads the student's training sets: a teacher of other classes is refused
    with pytest.raises(
        ValueError,
        match=r"trained on DATASETS.TRAIN=.*and the student on "
        r"\(.coco_2017_train.,\): they have other classes",
    ):
        explicit(train_sets="coco_2017_train")


def _tiny_loader(cfg):
    from detectron2.data import build_detection_train_loader

    return build_detection_train_loader(cfg)


def test_old_form_saved_config_still_builds_the_same_model(
    tiny_data_root, tmp_path, rcnn_teacher, monkeypatch
):
    """
    A run's config.yaml of the deprecated form (build_distilled_model with kd={...}, as earlier
    kd_det versions saved it) builds the same model as the new form, with one FutureWarning;
    its student, its teacher check and its model-zoo row still read.
    """
    import warnings

    from kd_det.config.run import distillation_summary
    from kd_det.engine.lazy import lazy_teacher_eval_hook

    new = LazyConfig.apply_overrides(
        LazyConfig.load(LAZY_SSIM),
        _teacher_opts(rcnn_teacher)
        + ["dataloader.train.dataset.names={}_train".format(TINY_PREFIX)],
    )
    old = LazyConfig.load(LAZY_SSIM)
    del old.train["teacher_eval"]
    old.model = compat.lazy_distilled_model(
        lazy_student_model(new.model),
        kd={
            "TEACHER": {
                "CONFIG": config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
                "WEIGHTS": rcnn_teacher,
                "MIN_AP": 10.0,
            },
            # an int weight, as people write it
            "FEATURE": {"LOSS": "SSIMFeatureLoss", "LEVEL_REDUCTION": "sum", "WEIGHT": 2},
        },
        train_datasets="${dataloader.train.dataset.names}",
    )
    old.dataloader.train.dataset.names = TINY_PREFIX + "_train"
    LazyConfig.save(old, str(tmp_path / "config.yaml"))
    text = (tmp_path / "config.yaml").read_text()
    assert "_target_: kd_det.modeling.lazy_student.build_distilled_model" in text and "kd:" in text

    monkeypatch.setattr(compat, "_WARNED", set())  # a fresh process
    saved = LazyConfig.load(str(tmp_path / "config.yaml"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = _seeded(lambda: instantiate(saved.model))
        instantiate(saved.model)  # warned once per process
    warned = [
        w for w in caught if issubclass(w.category, FutureWarning) and "kd={...}" in str(w.message)
    ]
    assert len(warned) == 1 and "model.teacher = L(build_teacher)" in str(warned[0].message)
    assert type(model) is DistillGeneralizedRCNN and model.kd_feature.weight == 2.0
    ours = _seeded(lambda: instantiate(new.model))
    assert _shapes(model) == _shapes(ours)
    assert model.kd_feature.level_weights == ours.kd_feature.level_weights
    # LazyConfig.save sorts the keys, so a saved config builds its modules in another order than
    # its .py did; the old form as the .py wrote it builds bitwise the new form's model
    assert_same_weights(_seeded(lambda: instantiate(old.model)), ours)
    assert type(instantiate(lazy_student_model(saved.model))) is GeneralizedRCNN
    hook = lazy_teacher_eval_hook(saved)  # its KD.TEACHER.MIN_AP still asks for the check
    assert hook is not None and hook._min_ap == 10.0
    assert hook._keys["min_ap"] == "model.kd.TEACHER.MIN_AP"
    summary = distillation_summary(saved)
    assert (summary.meta_architecture, summary.methods, summary.teacher) == (
        "DistillGeneralizedRCNN",
        ("SSIM",),
        config_path("synthetic/faster_rcnn_R_50_FPN.yaml"),
    )
    assert distillation_summary(new) == summary


@pytest.mark.slow
def test_lazy_multi_teacher_student_is_the_yaml_one(tiny_data_root, tmp_path, rcnn_teacher):
    """Several teachers, explicit: extra_teachers and a MultiTeacherDistiller, as in yacs."""
    from kd_det.losses import SSIMFeatureLoss
    from kd_det.modeling import FeatureDistiller, MultiTeacherDistiller, TeacherImportanceGate

    teacher_config = config_path("synthetic/faster_rcnn_R_50_FPN.yaml")
    cfg = tiny_cfg(
        "synthetic/distill/multi_ssim_faster_rcnn_to_R18.yaml",
        tmp_path,
        [
            "KD.MULTI_TEACHER.CONFIGS",
            [teacher_config] * 2,
            "KD.MULTI_TEACHER.WEIGHTS",
            [rcnn_teacher] * 2,
        ],
    )
    lazy = LazyConfig.apply_overrides(
        LazyConfig.load(LAZY_SSIM),
        _teacher_opts(rcnn_teacher)
        + ["dataloader.train.dataset.names={}_train".format(TINY_PREFIX)],
    )
    levels = ["p2", "p3", "p4", "p5", "p6"]
    lazy.model.extra_teachers = [copy.deepcopy(lazy.model.teacher)]
    distiller = L(FeatureDistiller)(
        levels=levels,
        student_channels=64,
        teacher_channels=128,
        loss=L(SSIMFeatureLoss)(),
        weight=2.0,
        level_reduction="sum",
    )
    lazy.model.multi_teacher = L(MultiTeacherDistiller)(
        distillers=[distiller, copy.deepcopy(distiller)],
        gate=L(TeacherImportanceGate)(
            levels=levels, channels=64, num_teachers=2, latent_dim=cfg.KD.MULTI_TEACHER.GATE_DIM
        ),
    )
    del lazy.model.feature_distiller
    model = _seeded(lambda: instantiate(lazy.model))
    yacs = _seeded(lambda: build_model(cfg))
    assert len(model.teachers) == 2 and model.kd_feature is None
    assert_same_weights(model, yacs)
    # several teachers need the multi-teacher distiller, and one feature distiller per teacher
    lazy.model.feature_distiller = distiller
    with pytest.raises(
        ValueError,
        match=r"several teachers .* are combined for feature imitation "
        r"only, by multi_teacher=MultiTeacherDistiller",
    ):
        instantiate(lazy.model)
    del lazy.model.feature_distiller
    lazy.model.multi_teacher.distillers = [distiller]
    with pytest.raises(ValueError, match=r"multi_teacher has 1 feature distillers for 2 teachers"):
        instantiate(lazy.model)

"""tools/train_net.py --dry-run and tools/lazyconfig_train_net.py --dry-run, in-process."""

import hashlib
import importlib.util
import os

import pytest
from conftest import REPO, TINY_PREFIX, config_path

RCNN_SSIM = "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml"
TEACHER = "synthetic/faster_rcnn_R_50_FPN.yaml"
# tests/conftest.py's tiny_cfg as command-line overrides
TINY = [
    "DATASETS.TRAIN", "('{}_train',)".format(TINY_PREFIX),
    "DATASETS.TEST", "('{}_val',)".format(TINY_PREFIX),
    "INPUT.MIN_SIZE_TRAIN", "(64,)", "INPUT.MAX_SIZE_TRAIN", "64",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", "40", "DATALOADER.NUM_WORKERS", "0",
    "MODEL.RPN.PRE_NMS_TOPK_TRAIN", "200", "MODEL.RPN.POST_NMS_TOPK_TRAIN", "64",
    "MODEL.ROI_HEADS.BATCH_SIZE_PER_IMAGE", "32", "SEED", "7",
]  # fmt: skip


def _tool(name):
    spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "tools", name + ".py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _sha(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def _dry_run(capsys, tmp_path, teacher_weights, opts=(), config=RCNN_SSIM):
    out = tmp_path / "out"
    argv = ["--config-file", config_path(config), "--dry-run", "--dry-run-steps", "2"]
    argv += TINY + ["OUTPUT_DIR", str(out), "KD.TEACHER.CONFIG", config_path(TEACHER)]
    argv += ["KD.TEACHER.WEIGHTS", teacher_weights] + list(opts)
    code = _tool("train_net").cli(argv)
    text = capsys.readouterr().out
    assert not out.exists() or not os.listdir(out), "the dry run wrote into OUTPUT_DIR"
    return code, text


def test_dry_run_passes_on_a_distillation_config(capsys, tmp_path, tiny_data_root, rcnn_teacher):
    before = _sha(rcnn_teacher)
    code, text = _dry_run(capsys, tmp_path, rcnn_teacher, ["KD.AUTO_WEIGHT.ENABLED", "True"])
    assert code == 0, text
    assert "100.0% of its" in text and "missing keys: 0; unexpected keys: 0" in text
    assert "classes: the same 5 as the student's, in order" in text
    for line in ("loss_kd_ssim", "loss_cls", "detection loss gradient norm"):
        assert line in text
    assert "KD.AUTO_WEIGHT would multiply it by" in text
    assert "peak memory of a step: CPU, peak RSS growth" in text
    assert "time per iteration" in text and "whole schedule (40 iterations)" in text
    assert "OK (" in text
    assert _sha(rcnn_teacher) == before


def test_dry_run_fails_on_teacher_weights_of_another_config(
    capsys, tmp_path, tiny_data_root, retina_teacher
):
    code, text = _dry_run(capsys, tmp_path, retina_teacher)
    assert code == 1
    share = text.split("weights {}: ".format(retina_teacher))[1].split("%")[0]
    assert 0 <= float(share) < 100
    assert "FAILED" in text and "do not fit its config" in text and "missing keys: " in text
    assert "the model is not built" in text


def test_dry_run_fails_on_a_missing_teacher_file(capsys, tmp_path, tiny_data_root):
    code, text = _dry_run(capsys, tmp_path, str(tmp_path / "nowhere.pth"))
    assert code == 1
    assert "PROBLEM (teacher): weights" in text and "not found" in text


@pytest.fixture
def other_classes_dataset(tiny_data_root):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    DatasetCatalog.register("kd_test_dry_other", lambda: [])
    MetadataCatalog.get("kd_test_dry_other").set(thing_classes=["cat", "dog", "car", "bus", "cow"])
    yield "kd_test_dry_other"
    DatasetCatalog.remove("kd_test_dry_other")
    MetadataCatalog.remove("kd_test_dry_other")


def test_dry_run_fails_on_a_mismatched_class_list(
    capsys, tmp_path, rcnn_teacher, other_classes_dataset
):
    opts = ["KD.TEACHER.OPTS", "['DATASETS.TRAIN', \"('{}',)\"]".format(other_classes_dataset)]
    code, text = _dry_run(capsys, tmp_path, rcnn_teacher, opts)
    assert code == 1
    assert "PROBLEM (teacher classes)" in text and "other classes" in text


def test_lazy_dry_run_passes(capsys, tmp_path, tiny_data_root, rcnn_teacher):
    out = tmp_path / "lazy_out"
    argv = [
        "--config-file",
        config_path("synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py"),
        "--dry-run",
        "--dry-run-steps",
        "1",
        "model.teacher.config=" + config_path(TEACHER),
        "model.teacher.weights=" + rcnn_teacher,
        "dataloader.train.dataset.names={}_train".format(TINY_PREFIX),
        "dataloader.test.dataset.names={}_val".format(TINY_PREFIX),
        "dataloader.train.total_batch_size=2",
        "dataloader.train.mapper.augmentations.0.short_edge_length=[64]",
        "dataloader.train.mapper.augmentations.0.max_size=64",
        "train.output_dir=" + str(out),
        "train.auto_weight.enabled=True",
    ]
    code = _tool("lazyconfig_train_net").cli(argv)
    text = capsys.readouterr().out
    assert code == 0, text
    assert "validated" in text and "100.0% of its" in text and "the same 5 as the student's" in text
    assert "loss_kd_ssim" in text and "KD.AUTO_WEIGHT would multiply it by" in text
    assert "time per iteration" in text and "OK (" in text
    assert not out.exists() or not os.listdir(out)


@pytest.fixture(scope="module")
def tv_teacher_weights(tmp_path_factory):
    """name -> a local file of kd_det's small torchvision detector (random, narrow FPN)."""
    import torch

    from kd_det.data import CLASS_NAMES
    from kd_det.modeling.teacher.torchvision_models import build_torchvision_detector

    categories = ["__background__"] + list(CLASS_NAMES)
    folder = tmp_path_factory.mktemp("tv_dry_run")
    out = {}
    for name in ("fasterrcnn_resnet18_fpn", "retinanet_resnet18_fpn"):
        torch.manual_seed(0)
        model = build_torchvision_detector(name, len(categories), fpn_channels=32)
        out[name] = str(folder / (name + ".pth"))
        torch.save({"model": model.state_dict(), "categories": categories}, out[name])
    return out


@pytest.mark.parametrize("weights_of", ["fasterrcnn_resnet18_fpn", "retinanet_resnet18_fpn"])
def test_dry_run_of_a_torchvision_teacher(
    capsys, tmp_path, tiny_data_root, tv_teacher_weights, weights_of
):
    """A torchvision:// teacher is checked by its own kind's builder: its weights pass, those of
    another torchvision model fail with the keys named."""
    opts = ["KD.TEACHER.CONFIG", "torchvision://fasterrcnn_resnet18_fpn"]
    opts += ["KD.TEACHER.OPTS", "['fpn_channels=32']", "KD.FEATURE.LOSS", "L2FeatureLoss"]
    code, text = _dry_run(capsys, tmp_path, tv_teacher_weights[weights_of], opts)
    if weights_of == "fasterrcnn_resnet18_fpn":
        assert code == 0, text
        assert "100.0% of its" in text and "TorchvisionTeacher" in text
        assert "classes: every student class is one of the teacher's, by name" in text
        assert "loss_kd_l2" in text and "OK (" in text
    else:
        assert code == 1
        assert "PROBLEM (teacher): torchvision://fasterrcnn_resnet18_fpn does not build" in text
        assert "do not fit the torchvision model" in text and "FAILED" in text

"""Model-zoo export: a student-only checkpoint + config that vanilla Detectron2 loads without
kd_det."""

import dataclasses
import json
import runpy
import subprocess
import sys
from unittest.mock import ANY

import numpy as np
import pytest
import torch
import yaml
from conftest import REPO, TINY_PREFIX, distill_cfg, one_step, tiny_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.data.detection_utils import read_image
from detectron2.engine import DefaultPredictor
from detectron2.modeling import build_model
from PIL import Image
from tolerances import U32, assert_within

from kd_det.checkpoint import read_checkpoint
from kd_det.config.student import student_model_config
from kd_det.release import deploy
from kd_det.release.deploy import detections, export_torchscript, load_sample_image
from kd_det.release.student import StudentCheckpointer, file_sha256, release_student
from kd_det.utils.complexity import model_complexity

# runs in a fresh interpreter: vanilla Detectron2 only
VANILLA_LOAD = r"""
import sys, torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.checkpoint import DetectionCheckpointer
cfg = get_cfg()
cfg.merge_from_file(sys.argv[1])
model = build_model(cfg).eval()
DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
image = torch.load(sys.argv[2])
with torch.no_grad():
    inst = model([{"image": image, "height": 64, "width": 64}])[0]["instances"]
assert not [m for m in sys.modules if m.startswith("kd_det")], "kd_det was imported"
torch.save({"boxes": inst.pred_boxes.tensor, "scores": inst.scores, "classes": inst.pred_classes,
            "arch": type(model).__name__}, sys.argv[3])
"""


def _distill_cfg_keeping_all_detections(kind, out, rcnn_teacher, retina_teacher):
    """A distillation config of each kind, score threshold 0 (detections to compare); and the
    student's architecture."""
    config, teacher_cfg, weights, arch = {
        "rcnn": (
            "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
            "synthetic/faster_rcnn_R_50_FPN.yaml",
            rcnn_teacher,
            "GeneralizedRCNN",
        ),
        "retina": (
            "synthetic/distill/rm_pfi_retinanet_R50_to_R18.yaml",
            "synthetic/retinanet_R_50_FPN.yaml",
            retina_teacher,
            "RetinaNet",
        ),
    }[kind]
    return (
        distill_cfg(
            config,
            teacher_cfg,
            weights,
            out,
            ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0],
        ),
        arch,
    )


def _postprocessed(model, image):
    """What ``model`` (eval) detects on ``image`` (3, H, W) by its ``forward``, in its pixels."""
    inputs = [{"image": image, "height": image.shape[1], "width": image.shape[2]}]
    instances = model(inputs)[0]["instances"]
    return instances.pred_boxes.tensor, instances.scores, instances.pred_classes


def assert_same_detections(
    model, reference, other, what, image_size, factor=1.0, postprocessed=True
):
    """
    ``other`` (boxes, scores, classes) from another process or an exported model are the
    detections ``reference()`` gives, matched as the export's own check matches them
    (deploy.match_detections, bounds from the model): one to one by IoU within the box and
    score bounds, in any order, a detection missing on one side only where another float32
    run can drop it (at the score threshold or the cap, or by NMS).

    Args:
        reference: runs ``model`` on the image (boxes in ``image_size``'s pixels).
        postprocessed: ``reference`` goes through detector_postprocess (empty boxes dropped).
    Returns:
        the DetectionMatch, for more checks.
    """
    bounds = deploy.detection_bounds(model, image_size, factor=factor, postprocessed=postprocessed)
    with torch.no_grad():
        detected = reference()
        with deploy.relaxed_test_settings(model, bounds.score):
            candidates = reference()
    assert len(detected[0]) > 0, "nothing detected: the comparison would be empty"
    match = deploy.match_detections(detected, other, bounds, candidates, ("the eager model", what))
    assert not match.disagreements, "{} on a {}x{} image:\n{}".format(
        what, image_size[0], image_size[1], "\n".join(match.disagreements)
    )
    return match


@pytest.mark.slow
@pytest.mark.numeric
@pytest.mark.parametrize("kind", ["rcnn", "retina"])
def test_export_round_trip(kind, tiny_data_root, tmp_path, rcnn_teacher, retina_teacher):
    cfg, arch = _distill_cfg_keeping_all_detections(kind, tmp_path, rcnn_teacher, retina_teacher)
    model = build_model(cfg)
    one_step(model, cfg)  # trained weights, BN statistics updated
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    out = release_student(cfg, str(tmp_path / "model_final.pth"), str(tmp_path / "release"))

    saved = read_checkpoint(str(out["weights"]))["model"]
    assert not [k for k in saved if k.startswith("kd_") or k.startswith("teacher")]
    assert len(saved) == len([k for k in model.state_dict() if not k.startswith("kd_")])
    assert out["sha256"] == file_sha256(out["weights"]) and len(out["sha256"]) == 64
    with open(out["config"]) as f:
        exported = yaml.safe_load(f)
    assert exported["MODEL"]["META_ARCHITECTURE"] == arch and "KD" not in exported

    torch.manual_seed(0)
    image = torch.randint(0, 255, (3, 64, 64)).float()
    torch.save(image, tmp_path / "image.pt")
    script = tmp_path / "vanilla_load.py"
    script.write_text(VANILLA_LOAD)
    # The script fails if anything imports kd_det.  The environment is kept as it is:
    # Detectron2 may be installed through PYTHONPATH (as on the GPU machine).
    subprocess.run(
        [
            sys.executable,
            str(script),
            out["config"],
            str(tmp_path / "image.pt"),
            str(tmp_path / "det.pt"),
        ],
        check=True,
        cwd=str(tmp_path),
    )
    vanilla = read_checkpoint(str(tmp_path / "det.pt"))
    assert vanilla["arch"] == arch
    model.eval()
    with torch.no_grad():
        ours = model([{"image": image, "height": 64, "width": 64}])[0]["instances"]

    # --eval-only's student: built without the teacher (its weights need not exist), kd_ weights
    # skipped
    cfg.defrost()
    cfg.KD.TEACHER.WEIGHTS = str(tmp_path / "no_teacher_here.pth")
    student = build_model(student_model_config(cfg)).eval()
    assert type(student).__name__ == arch and not hasattr(student, "teacher")
    incompatible = StudentCheckpointer(student)._load_model(
        {"model": read_checkpoint(str(tmp_path / "model_final.pth"))["model"]}
    )
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    with torch.no_grad():
        alone = student([{"image": image, "height": 64, "width": 64}])[0]["instances"]
    # exact: the same weights, input, process, kernels and thread count
    assert torch.equal(alone.pred_boxes.tensor, ours.pred_boxes.tensor) and torch.equal(
        alone.scores, ours.scores
    )

    # vanilla Detectron2 in the other process runs its own thread count, so its kernels may sum
    # in another order: matched within the student's bounds (the teacher's layers not counted)
    theirs = (vanilla["boxes"], vanilla["scores"], vanilla["classes"])
    assert_same_detections(
        student, lambda: _postprocessed(student, image), theirs, "vanilla Detectron2", (64, 64)
    )


def test_export_errors(tmp_path):
    from kd_det import get_kd_cfg

    with pytest.raises(FileNotFoundError, match="model_final.pth"):
        release_student(get_kd_cfg(), str(tmp_path / "missing.pth"), str(tmp_path / "out"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*bad.pth"):
        release_student(get_kd_cfg(), str(bad), str(tmp_path / "out"))
    torch.save({"weights": {}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="not a Detectron2 training checkpoint"):
        release_student(get_kd_cfg(), str(tmp_path / "odd.pth"), str(tmp_path / "out"))


# the first lines of each script below: importing any of BLOCKED (set per script) raises
BLOCK_IMPORTS = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Block())
"""
WITHOUT_DETECTRON2 = ("detectron2", "kd_det", "fvcore")
WITHOUT_TORCH = WITHOUT_DETECTRON2 + ("torch", "torchvision")

TORCHSCRIPT_LOAD = r"""
import torch, torchvision  # torchvision registers the nms / roi_align ops the graph calls
model = torch.jit.load(sys.argv[1])
images = torch.load(sys.argv[2])
with torch.no_grad():
    outs = [tuple(model(im)) for im in images]
torch.save(outs, sys.argv[3])
"""

ONNX_RUN = r"""
import numpy as np, onnxruntime
session = onnxruntime.InferenceSession(sys.argv[1], providers=["CPUExecutionProvider"])
images = np.load(sys.argv[2])
outs = {}
for i in range(int(images["n"])):
    for name, value in zip(
        ("boxes", "scores", "classes"), session.run(None, {"image": images[str(i)]})
    ):
        outs["{}_{}".format(name, i)] = value
np.savez(sys.argv[3], **outs)
"""

# tools/predict_exported.py as a deployment runs it
PREDICT_EXPORTED = r"""
import runpy
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def _run_without(blocked, script, args, cwd):
    """Run ``script`` in a fresh interpreter where importing any of ``blocked`` raises; its
    stdout."""
    path = cwd / "blocked_run.py"
    path.write_text("BLOCKED = {!r}\n".format(tuple(blocked)) + BLOCK_IMPORTS + script)
    return subprocess.run(
        [sys.executable, str(path)] + [str(a) for a in args],
        check=True,
        cwd=str(cwd),
        stdout=subprocess.PIPE,
        universal_newlines=True,
    ).stdout


def _check_predict_exported(model_file, student_cfg, image_file, blocked, factor, cwd):
    """tools/predict_exported.py on an image file gives DefaultPredictor's detections, in the
    image's pixels."""
    stdout = _run_without(
        blocked,
        PREDICT_EXPORTED,
        [REPO + "/tools/predict_exported.py", "--model", model_file, "--input", image_file],
        cwd,
    )
    result = json.loads(stdout.strip().splitlines()[-1])
    predictor = DefaultPredictor(student_cfg)
    image = read_image(str(image_file), format="BGR")

    def reference():
        instances = predictor(image)["instances"]
        return instances.pred_boxes.tensor, instances.scores, instances.pred_classes

    assert (result["height"], result["width"]) == image.shape[:2]
    dets = result["detections"]
    exported = (
        torch.tensor([d["box"] for d in dets]).reshape(-1, 4),
        torch.tensor([d["score"] for d in dets]),
        torch.tensor([d["class_id"] for d in dets]),
    )
    # bounds on the image's own pixels: those of the resized input, scaled back with the boxes
    assert_same_detections(
        predictor.model,
        reference,
        exported,
        "predict_exported.py with " + model_file,
        image.shape[:2],
        factor,
    )


@pytest.mark.slow
@pytest.mark.numeric
@pytest.mark.parametrize("kind", ["rcnn", "retina"])
def test_torchscript_and_onnx_export(kind, tiny_data_root, tmp_path, rcnn_teacher, retina_teacher):
    cfg, student_arch = _distill_cfg_keeping_all_detections(
        kind, tmp_path, rcnn_teacher, retina_teacher
    )
    torch.manual_seed(0)
    model = build_model(cfg)  # untrained: the trace's fidelity does not depend on skill
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    (tmp_path / "train.yaml").write_text(cfg.dump())

    tool = runpy.run_path(REPO + "/tools/export_student.py", run_name="export_student")
    out = tool["main"](
        [
            "--config-file",
            str(tmp_path / "train.yaml"),
            "--weights",
            str(tmp_path / "model_final.pth"),
            "--output-dir",
            str(tmp_path / "release"),
            "--torchscript",
            "--onnx",
        ]
    )
    meta = json.loads((tmp_path / "release" / "torchscript.json").read_text())
    assert (
        meta["sha256"] == file_sha256(out["torchscript"])
        and meta["meta_architecture"] == student_arch
    )
    assert meta["classes"] == MetadataCatalog.get(TINY_PREFIX + "_val").thing_classes
    assert meta["input"]["format"] == "BGR" and meta["input"]["min_size_test"] == 64
    assert meta["traced_on"].endswith("val_000000.jpg")
    sizes = [tuple(row["size"]) for row in meta["checked"]]
    assert len(set(sizes)) == 3 and all(row["detections"] > 0 for row in meta["checked"])

    # the released student (vanilla config + student-only weights) in eager mode, as the reference
    student_cfg = get_cfg()
    student_cfg.merge_from_file(out["config"])
    student = build_model(student_cfg).eval()
    DetectionCheckpointer(student).load(out["weights"])
    torch.manual_seed(1)
    images = [
        torch.randint(0, 255, (3, 64, 64)).float(),
        torch.randint(0, 255, (3, 56, 96)).float(),
        torch.zeros(3, 40, 72),
    ]
    torch.save(images, tmp_path / "images.pt")
    _run_without(
        WITHOUT_DETECTRON2,
        TORCHSCRIPT_LOAD,
        [out["torchscript"], tmp_path / "images.pt", tmp_path / "outs.pt"],
        tmp_path,
    )
    traced_outs = read_checkpoint(str(tmp_path / "outs.pt"))
    for image, traced in zip(images, traced_outs):
        assert len(traced) == 3
        assert_same_detections(
            student,
            lambda: detections(student, image),
            traced,
            "the TorchScript student",
            image.shape[1:],
            postprocessed=False,
        )

    # ONNX: the same sidecar, and ONNX Runtime without torch gives the eager student's detections
    onnx_meta = json.loads((tmp_path / "release" / "onnx.json").read_text())
    assert (
        onnx_meta["sha256"] == file_sha256(out["onnx"]) == out["onnx_sha256"]
        and onnx_meta["opset"] >= 16
    )
    assert onnx_meta["classes"] == meta["classes"] and onnx_meta["input"] == {
        **meta["input"],
        "tensor": ANY,
    }
    assert [row["size"] for row in onnx_meta["checked"]] == [row["size"] for row in meta["checked"]]
    np.savez(
        tmp_path / "images.npz",
        n=len(images),
        **{str(i): im.numpy() for i, im in enumerate(images)}
    )
    _run_without(
        WITHOUT_TORCH,
        ONNX_RUN,
        [out["onnx"], tmp_path / "images.npz", tmp_path / "onnx_outs.npz"],
        tmp_path,
    )
    onnx_outs = np.load(tmp_path / "onnx_outs.npz")
    for i, image in enumerate(images):
        outs = [onnx_outs["{}_{}".format(name, i)] for name in deploy.OUTPUT_NAMES]
        assert_same_detections(
            student,
            lambda: detections(student, image),
            outs,
            "the ONNX student",
            image.shape[1:],
            deploy.ONNX_FACTOR,
            postprocessed=False,
        )

    # a deployment's whole path on an image file of another size and aspect (resized 90x120 -> 64x85
    # and back)
    image_file = tmp_path / "photo.png"
    Image.fromarray(np.random.RandomState(2).randint(0, 255, (90, 120, 3), dtype=np.uint8)).save(
        image_file
    )
    _check_predict_exported(
        out["torchscript"], student_cfg, image_file, WITHOUT_DETECTRON2, 1.0, tmp_path
    )
    _check_predict_exported(
        out["onnx"], student_cfg, image_file, WITHOUT_TORCH, deploy.ONNX_FACTOR, tmp_path
    )


def test_predict_exported_resize_and_errors(tmp_path):
    """predict_exported.py's own resize rule is Detectron2's, and a missing sidecar or odd file is
    named."""
    from detectron2.data.transforms import ResizeShortestEdge

    tool = runpy.run_path(REPO + "/tools/predict_exported.py", run_name="predict_exported")
    for h, w, short, longest in [
        (90, 120, 64, 1333),
        (480, 640, 800, 1333),
        (640, 480, 800, 1333),
        (100, 1000, 800, 1333),
        (333, 500, 600, 1000),
        (7, 5, 64, 64),
    ]:
        assert tool["resized_shape"](h, w, short, longest) == ResizeShortestEdge.get_output_shape(
            h, w, short, longest
        )
    with pytest.raises(ValueError, match="neither an ONNX"):
        tool["load_metadata"](str(tmp_path / "model.pth"))
    with pytest.raises(FileNotFoundError, match="no onnx.json beside .* pass --metadata"):
        tool["load_metadata"](str(tmp_path / "model.onnx"))
    with pytest.raises(ValueError, match="input format 'YUV-BT.601'"):
        tool["preprocess"](
            Image.new("RGB", (8, 8)),
            {"input": {"format": "YUV-BT.601", "min_size_test": 8, "max_size_test": 8}},
        )
    boxes, scores, classes = tool["postprocess"](
        [[2, 2, 30, 10], [40, 5, 50, 8], [-4, 1, 8, 20]],
        [0.9, 0.8, 0.7],
        [0, 1, 2],
        (16, 32),
        (32, 64),
    )
    # scaled 2x, clipped to 64x32, and the box wholly right of the image (80..100) dropped
    assert boxes.tolist() == [[4, 4, 60, 20], [0, 2, 16, 32]] and classes.tolist() == [0, 2]


def test_torchscript_export_errors(tiny_data_root, tmp_path):
    cfg = tiny_cfg("synthetic/retinanet_R_18_FPN.yaml", tmp_path)
    cfg.DATASETS.TEST = ()
    with pytest.raises(ValueError, match="--sample-image PATH"):
        load_sample_image(cfg)
    with pytest.raises(FileNotFoundError, match="sample image .*nowhere.jpg"):
        load_sample_image(cfg, str(tmp_path / "nowhere.jpg"))
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        export_torchscript(cfg, str(tmp_path / "missing.pth"), str(tmp_path / "out"))
    # weights of another architecture: a clear error, not a trace of a half-random model
    rcnn = build_model(tiny_cfg("synthetic/faster_rcnn_R_18_FPN.yaml", tmp_path))
    DetectionCheckpointer(rcnn, save_dir=str(tmp_path)).save("rcnn")
    with pytest.raises(ValueError, match="lacks .* weights of the student"):
        export_torchscript(cfg, str(tmp_path / "rcnn.pth"), str(tmp_path / "out"))
    assert not (tmp_path / "out" / "model.ts").exists()
    # opset 11's RoiAlign has no half-pixel mode: boxes off by tens of pixels, so refused
    with pytest.raises(ValueError, match="opset 11 has no half-pixel RoiAlign"):
        deploy.export_onnx(cfg, str(tmp_path / "rcnn.pth"), str(tmp_path / "out"), opset=11)


def test_onnx_export_without_onnx_installed(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"pip install -e '\.\[onnx\]'"):
        deploy.export_onnx(
            tiny_cfg("synthetic/retinanet_R_18_FPN.yaml", tmp_path), "any.pth", str(tmp_path)
        )
    tool = runpy.run_path(REPO + "/tools/export_student.py", run_name="export_student")
    with pytest.raises(ImportError, match="onnx and onnxruntime"):  # before exporting anything
        tool["main"](
            [
                "--config-file",
                "any.yaml",
                "--weights",
                "any.pth",
                "--output-dir",
                str(tmp_path / "r"),
                "--onnx",
            ]
        )
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_onnx_export_that_disagrees_leaves_no_file(tiny_data_root, tmp_path, monkeypatch):
    cfg = tiny_cfg("synthetic/retinanet_R_18_FPN.yaml", tmp_path)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model_final")
    # negative bounds: any difference, even none, disagrees
    monkeypatch.setattr(deploy, "ONNX_FACTOR", -1.0)
    with pytest.raises(RuntimeError, match="the ONNX student .* disagrees with the model"):
        deploy.export_onnx(cfg, str(tmp_path / "model_final.pth"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


@pytest.mark.numeric
def test_compare_detections_names_the_disagreement(tmp_path):
    cfg = tiny_cfg("synthetic/retinanet_R_18_FPN.yaml", tmp_path)
    cfg.MODEL.RETINANET.SCORE_THRESH_TEST = 0.0
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    images = [torch.randint(0, 255, (3, 64, 64)).float()]
    with torch.no_grad():
        eager = detections(model, images[0])
    n = len(eager[0])

    def changed(box=0.0, score=0.0, cls=0):
        """The model's detections with the first one's box moved, score raised or class changed."""

        def run(image):
            boxes, scores, classes = (t.clone() for t in eager)
            boxes[0] += box
            scores[0] += score
            classes[0] = (classes[0] + cls) % cfg.MODEL.RETINANET.NUM_CLASSES
            return boxes, scores, classes

        return run

    rows = deploy.compare_detections(model, lambda image: eager, images)
    assert rows[0]["size"] == [64, 64] and rows[0]["detections"] == rows[0]["matched"] == n > 0
    assert rows[0]["max_box_diff"] == 0.0 and not rows[0]["unmatched"]
    # the order does not matter
    rows = deploy.compare_detections(model, lambda image: [t.flip(0) for t in eager], images)
    assert rows[0]["matched"] == n and rows[0]["max_box_diff"] == 0.0

    # every box moved by 0.05 px: within a bound of 0.1 px, matched and measured (b + 0.05 is
    # rounded to float32 once, off by at most u |b + 0.05| <= 65 u, boxes within 64 px)
    def shifted(image):
        boxes, scores, classes = eager
        return boxes + 0.05, scores, classes

    rows = deploy.compare_detections(model, shifted, images, "x", box_atol=0.1)
    assert rows[0]["matched"] == n
    assert_within(rows[0]["max_box_diff"], 0.05, 65 * U32, "measured box difference")
    message = (
        r"the ONNX student disagrees with the model on a 64x64 image, where it gives {0} "
        r"detections and the model {0}: detection \d+ of the ONNX student \(class .*box by "
        r"0.05 px \(bound 0.01 px\)".format(n)
    )
    with pytest.raises(RuntimeError, match=message):
        deploy.compare_detections(model, shifted, images, "the ONNX student", box_atol=1e-2)
    # one detection with another box, class or score is refused, with what differs
    bounds = deploy.detection_bounds(model, (64, 64))
    for change, differs in [
        ({"box": 1.0}, r"box by 1 px \(bound {:.3g} px\)".format(bounds.box)),
        ({"cls": 1}, r"class \d+ \(not \d+\)"),
        ({"score": 0.01}, r"score by 0.01 \(bound {:.3g}\)".format(bounds.score)),
    ]:
        with pytest.raises(
            RuntimeError, match=r"64x64 image, .*: detection 0 of .*differs: " + differs
        ):
            deploy.compare_detections(model, changed(**change), images)
    with pytest.raises(
        RuntimeError,
        match=r"where it gives 1 detections and the model {}: "
        r"detection \d+ of the model \(.*\) is not in the "
        r"traced student".format(n),
    ):
        deploy.compare_detections(model, lambda image: [t[:1] for t in eager], images)

    # a detection within the score bound of the threshold may be missing on either side
    bound = bounds.score
    near = "its score is within {:.2g} of the threshold".format(bound)
    tenth = float(eager[1].sort(descending=True).values[9])
    model.test_score_thresh = tenth - bound / 2  # the tenth detection just above it

    def without_lowest(image):
        boxes, scores, classes = detections(model, image)
        keep = scores > scores.min()
        return boxes[keep], scores[keep], classes[keep]

    rows = deploy.compare_detections(model, without_lowest, images)
    assert rows[0]["exported"] == rows[0]["matched"] == rows[0]["detections"] - 1
    assert len(rows[0]["unmatched"]) == 1 and near in rows[0]["unmatched"][0]
    with torch.no_grad():
        just_above = detections(model, images[0])  # the export's, with the tenth just above
    model.test_score_thresh = tenth + bound / 2  # the model's, the tenth just under
    rows = deploy.compare_detections(model, lambda image: just_above, images)
    assert rows[0]["exported"] == rows[0]["detections"] + 1 == rows[0]["matched"] + 1 == 10
    assert "of the traced student" in rows[0]["unmatched"][0] and near in rows[0]["unmatched"][0]
    # ... but not one further from it: a detection the model would keep
    model.test_score_thresh = tenth - 3 * bound
    with pytest.raises(
        RuntimeError, match=r"detection \d+ of the model .* is not in the traced " r"student"
    ):
        deploy.compare_detections(model, without_lowest, images)


def test_match_detections_allows_only_what_another_run_can_drop():
    """Ties at the score threshold, the cap and in NMS are allowed; nothing else is."""
    bounds = deploy.DetectionBounds(
        (100, 100), box=0.01, score=1e-4, score_thresh=0.05, nms_thresh=0.5, max_detections=100
    )

    def dets(*rows):
        """(box, score, class) rows as (boxes, scores, classes)."""
        return (
            torch.tensor([r[0] for r in rows], dtype=torch.float32).reshape(-1, 4),
            torch.tensor([r[1] for r in rows]),
            torch.tensor([r[2] for r in rows], dtype=torch.int64),
        )

    def match(a, b, candidates=None, **changes):
        return deploy.match_detections(
            dets(*a),
            dets(*b),
            dataclasses.replace(bounds, **changes),
            None if candidates is None else dets(*candidates),
        )

    p = ([10, 10, 50, 50], 0.9, 1)
    at_threshold = ([10 + 40 / 3, 10, 50 + 40 / 3, 50], 0.6, 1)  # IoU 0.5 with p: kept or not
    apart = ([10 + 20, 10, 50 + 20, 50], 0.6, 1)  # IoU 1/3
    other = ([60, 60, 90, 80], 0.7, 2)

    out = match([p, other, at_threshold], [at_threshold, other, p])  # any order
    assert out.pairs == [(0, 2), (1, 1), (2, 0)] and not out.unmatched and not out.disagreements
    out = match([p, other], [p, other, at_threshold], candidates=[p, other, at_threshold])
    assert len(out.pairs) == 2 and not out.disagreements
    assert "NMS in the model may suppress it by its detection 0 (IoU 0.5000" in out.unmatched[0]
    out = match([p, other], [p, other, apart], candidates=[p, other, apart])
    assert out.disagreements == [
        "detection 2 of the export (class 1, score 0.6, box [30.00, 10.00, 70.00, 50.00]) is not "
        "in the model: the nearest in the model, its detection 0 (IoU 0.333), differs: box by "
        "20 px (bound 0.01 px), score by 0.3 (bound 0.0001)"
    ]
    # a kept/suppressed swap of two overlapping boxes whose scores tie: each NMS keeps one ...
    q = ([12, 10, 52, 50], 0.9 - 5e-5, 1)  # IoU 0.905 with p
    out = match([p, other], [q, other], candidates=[p, q, other])
    assert len(out.pairs) == 1 and len(out.unmatched) == 2 and not out.disagreements
    # ... but a box the model does not detect at all is not a swap: it moved
    out = match([p, other], [q, other], candidates=[p, other])
    assert len(out.disagreements) == 1 and out.disagreements[0].startswith(
        "detection 0 of the export (class 1, score 0.89995, box [12.00, 10.00, 52.00, 50.00]) is "
        "not among what the model detects without NMS, cap or threshold: the nearest in them, its "
        "detection 0 (IoU 0.905), differs: box by 2 px"
    )
    # IoU well below the NMS threshold: either run keeps both boxes, so one missing is not explained
    out = match([p, apart], [p], candidates=[p, apart])
    assert out.disagreements and out.disagreements[0].startswith("detection 1 of the model")

    # near the score threshold, on either side
    low = ([60, 10, 90, 30], 0.05 + 5e-5, 3)
    out = match([p, low], [p], candidates=[p, low])
    assert not out.disagreements
    assert "its score is within 0.0001 of the threshold 0.05" in out.unmatched[0]
    out = match([p], [p, low], candidates=[p, low])
    assert not out.disagreements and out.unmatched[0].startswith("detection 1 of the export")
    out = match([p, ([60, 10, 90, 30], 0.0502, 3)], [p])
    assert out.disagreements and "is not in the export" in out.disagreements[0]
    # at the cap of a full run: the last detection may be another of the same score
    tied = ([60, 10, 90, 30], 0.7 - 5e-5, 3)
    out = match([p, other], [p, tied], candidates=[p, other, tied], max_detections=2)
    assert not out.disagreements
    assert all("ranks near the cap of 2 detections" in why for why in out.unmatched)
    assert match([p, other], [p, tied], candidates=[p, other, tied], max_detections=3).disagreements


def test_model_complexity_matches_a_count_by_hooks(tiny_data_root, tmp_path):
    cfg = tiny_cfg("synthetic/retinanet_R_18_FPN.yaml", tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg)
    out = model_complexity(cfg, model, num_images=2)
    assert out["images"] == 2 and out["size"] == "64x64" and model.training  # the mode is restored
    assert out["params_m"] == pytest.approx(sum(p.numel() for p in model.parameters()) / 1e6)

    # multiply-adds of every convolution, counted independently on one 64x64 test image
    macs = []

    def conv_hook(module, inputs, output):
        kh, kw = module.kernel_size
        macs.append(output.numel() * module.in_channels // module.groups * kh * kw)

    handles = [
        m.register_forward_hook(conv_hook)
        for m in model.modules()
        if isinstance(m, torch.nn.Conv2d)
    ]
    model.eval()
    with torch.no_grad():
        model([{"image": torch.zeros(3, 64, 64)}])
    for h in handles:
        h.remove()
    # fvcore also counts BatchNorm and upsampling: a little more than the convolutions alone
    assert sum(macs) / 1e9 <= out["gflops"] <= 1.02 * sum(macs) / 1e9


def test_deploy_settings_of_a_lazy_config():
    """A LazyConfig student's preprocessing comes from dataloader.test; what a sidecar cannot
    describe is refused."""
    import sys as _sys

    from detectron2.config import LazyConfig

    from kd_det.release.deploy import DeploySettings, deploy_settings

    lazy = LazyConfig.load(REPO + "/configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py")
    assert deploy_settings(lazy) == DeploySettings(
        "BGR", 128, 256, ("kd_synthetic_val",), ("kd_synthetic_train",)
    )

    def settings_with(*overrides):
        return deploy_settings(
            LazyConfig.apply_overrides(
                LazyConfig.load(
                    REPO + "/configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py"
                ),
                list(overrides),
            )
        )

    assert (
        settings_with("dataloader.test.mapper.augmentations.0.short_edge_length=[96]").min_size_test
        == 96
    )
    unlimited = LazyConfig.load(
        REPO + "/configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py"
    )
    del unlimited.dataloader.test.mapper.augmentations[0].max_size
    assert deploy_settings(unlimited).max_size_test == _sys.maxsize  # ResizeShortestEdge's default
    with pytest.raises(
        ValueError, match="draws its short edge from \\[96, 128\\].*short_edge_length=N"
    ):
        settings_with("dataloader.test.mapper.augmentations.0.short_edge_length=[96,128]")
    with pytest.raises(ValueError, match="interp=0; exports describe bilinear"):
        settings_with("dataloader.test.mapper.augmentations.0.interp=0")
    flipped = LazyConfig.load(
        REPO + "/configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py"
    )
    flipped.dataloader.test.mapper.augmentations.append(
        flipped.dataloader.train.mapper.augmentations[1]
    )
    with pytest.raises(ValueError, match="is 1 ResizeShortestEdge and \\['.*RandomFlip'\\]"):
        deploy_settings(flipped)
    del flipped.dataloader.test
    with pytest.raises(ValueError, match="has no dataloader.test"):
        deploy_settings(flipped)
    no_format = LazyConfig.load(
        REPO + "/configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py"
    )
    no_format.model.input_format = None
    no_format.dataloader.test.mapper.image_format = None
    with pytest.raises(ValueError, match="names no input format: set model.input_format"):
        deploy_settings(no_format)

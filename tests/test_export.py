"""Model-zoo export: a student-only checkpoint + config that vanilla Detectron2 loads without kd_det."""

import subprocess
import sys

import pytest
import torch
import yaml
from test_distill import _one_step, distill_cfg

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.modeling import build_model

from kd_det.export import StudentCheckpointer, export_student, file_sha256, student_inference_cfg

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


@pytest.mark.parametrize("kind", ["rcnn", "retina"])
def test_export_round_trip(kind, tiny_data_root, tmp_path, rcnn_teacher, retina_teacher):
    config, teacher_cfg, weights, arch = {
        "rcnn": ("synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml", "synthetic/faster_rcnn_R_50_FPN.yaml",
                 rcnn_teacher, "GeneralizedRCNN"),
        "retina": ("synthetic/distill/rm_pfi_retinanet_R50_to_R18.yaml", "synthetic/retinanet_R_50_FPN.yaml",
                   retina_teacher, "RetinaNet"),
    }[kind]
    cfg = distill_cfg(config, teacher_cfg, weights, tmp_path,
                      ["MODEL.RETINANET.SCORE_THRESH_TEST", 0.0, "MODEL.ROI_HEADS.SCORE_THRESH_TEST", 0.0])
    model = build_model(cfg)
    _one_step(model, cfg)  # trained weights, BN statistics updated
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    out = export_student(cfg, str(tmp_path / "model_final.pth"), str(tmp_path / "release"))

    saved = torch.load(out["weights"], weights_only=False)["model"]
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
    subprocess.run([sys.executable, str(script), out["config"], str(tmp_path / "image.pt"), str(tmp_path / "det.pt")],
                   check=True, cwd=str(tmp_path))
    vanilla = torch.load(tmp_path / "det.pt", weights_only=False)
    assert vanilla["arch"] == arch
    model.eval()
    with torch.no_grad():
        ours = model([{"image": image, "height": 64, "width": 64}])[0]["instances"]
    assert len(ours) > 0
    assert torch.allclose(vanilla["boxes"], ours.pred_boxes.tensor, atol=1e-4)
    assert torch.allclose(vanilla["scores"], ours.scores, atol=1e-5)
    assert torch.equal(vanilla["classes"], ours.pred_classes)

    # --eval-only's student: built without the teacher (its weights need not exist), kd_ weights skipped
    cfg.defrost()
    cfg.KD.TEACHER.WEIGHTS = str(tmp_path / "no_teacher_here.pth")
    student = build_model(student_inference_cfg(cfg)).eval()
    assert type(student).__name__ == arch and not hasattr(student, "teacher")
    incompatible = StudentCheckpointer(student)._load_model(
        {"model": torch.load(tmp_path / "model_final.pth", weights_only=False)["model"]})
    assert not incompatible.missing_keys and not incompatible.unexpected_keys
    with torch.no_grad():
        alone = student([{"image": image, "height": 64, "width": 64}])[0]["instances"]
    assert torch.equal(alone.pred_boxes.tensor, ours.pred_boxes.tensor) and torch.equal(alone.scores, ours.scores)


def test_export_errors(tmp_path):
    from kd_det import get_kd_cfg

    with pytest.raises(FileNotFoundError, match="model_final.pth"):
        export_student(get_kd_cfg(), str(tmp_path / "missing.pth"), str(tmp_path / "out"))
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        export_student(get_kd_cfg(), str(bad), str(tmp_path / "out"))
    torch.save({"weights": {}}, tmp_path / "odd.pth")
    with pytest.raises(ValueError, match="not a Detectron2 training checkpoint"):
        export_student(get_kd_cfg(), str(tmp_path / "odd.pth"), str(tmp_path / "out"))

"""
The CWD, MGD and PKD configs (issue 33) train on the tiny synthetic data, and MGD's generation
block is trained with the student and left out of the released student.
"""

import pytest
import torch
from conftest import distill_cfg
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.data import build_detection_train_loader
from detectron2.modeling import build_model
from detectron2.solver import build_optimizer
from detectron2.utils.events import EventStorage

from kd_det.checkpoint import read_checkpoint
from kd_det.modeling import MaskedGenerator
from kd_det.release.student import release_student

TEACHERS = {
    "faster_rcnn": "synthetic/faster_rcnn_R_50_FPN.yaml",
    "retinanet": "synthetic/retinanet_R_50_FPN.yaml",
}


def _train(model, cfg, iterations=2):
    """``iterations`` optimizer steps as KDTrainer takes them; the losses of each."""
    loader = iter(build_detection_train_loader(cfg))
    optimizer = build_optimizer(cfg, model)
    model.train()
    history = []
    with EventStorage(0) as storage:
        for it in range(iterations):
            storage.iter = it
            losses = model(next(loader))
            optimizer.zero_grad()
            sum(losses.values()).backward()
            optimizer.step()
            history.append({k: v.detach() for k, v in losses.items()})
    return history, optimizer


def _teacher(arch, rcnn_teacher, retina_teacher):
    return TEACHERS[arch], rcnn_teacher if arch == "faster_rcnn" else retina_teacher


# MGD on RetinaNet also sets KD.MGD's other keys and checks the release (one model for both)
MGD_OPTS = ["KD.MGD.MASK_RATIO", 0.5, "KD.MGD.HIDDEN_CHANNELS", 16]


@pytest.mark.parametrize("arch", ["faster_rcnn", "retinanet"])
@pytest.mark.parametrize("method", ["cwd", "mgd", "pkd"])
def test_config_trains_two_iterations(
    method, arch, tiny_data_root, tmp_path, rcnn_teacher, retina_teacher
):
    config = "synthetic/distill/{}_{}_R50_to_R18.yaml".format(method, arch)
    mgd_opts = method == "mgd" and arch == "retinanet"
    cfg = distill_cfg(
        config,
        *_teacher(arch, rcnn_teacher, retina_teacher),
        tmp_path,
        MGD_OPTS if mgd_opts else (),
    )
    torch.manual_seed(0)
    model = build_model(cfg)
    history, optimizer = _train(model, cfg)
    key = "loss_kd_" + method
    assert all(key in h and torch.isfinite(h[key]) and h[key] > 0 for h in history), history
    distiller = model.kd_feature
    assert len(distiller.levels) == 5
    optimized = {id(p) for g in optimizer.param_groups for p in g["params"]}
    assert {id(p) for p in distiller.parameters()} <= optimized
    assert isinstance(distiller.generator, MaskedGenerator) == (method == "mgd")
    if method != "mgd":
        return
    generator = distiller.generator
    assert set(generator.keys()) == set(distiller.levels)
    assert all(p.grad is not None for p in generator.parameters())
    if not mgd_opts:
        assert generator.mask_ratio == 0.65 and generator["p3"][0].out_channels == 128
        return
    assert generator.mask_ratio == 0.5 and generator["p3"][0].out_channels == 16
    _check_release_drops_the_generation_block(model, cfg, tmp_path)


def _check_release_drops_the_generation_block(model, cfg, tmp_path):
    DetectionCheckpointer(model, save_dir=str(tmp_path)).save("model_final")
    saved = read_checkpoint(str(tmp_path / "model_final.pth"))["model"]
    generator_keys = [k for k in saved if ".generator." in k]
    # the training checkpoint has the block (a resumed run continues it), under the kd_ prefix
    assert generator_keys and all(k.startswith("kd_feature.generator.") for k in generator_keys)
    # the release (which checks that the weights build the bare student exactly) leaves it out
    out = release_student(cfg, str(tmp_path / "model_final.pth"), str(tmp_path / "release"))
    released = read_checkpoint(out["weights"])["model"]
    assert not [k for k in released if "generator" in k or k.startswith("kd_")]
    assert set(released) == {k for k in saved if not k.startswith("kd_")}

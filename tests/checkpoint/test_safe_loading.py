"""Checkpoints are data: crafted pickles are refused at every entry point, real ones load."""

import builtins
import collections
import datetime
import os
import pickle
import re
import runpy
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import REPO, TINY_PREFIX, config_path, tiny_cfg
from torch import nn

from kd_det import get_kd_cfg
from kd_det.checkpoint import (
    AtomicDetectionCheckpointer,
    SafeDetectionCheckpointer,
    UnsafeCheckpointError,
    WeightsMismatchError,
    check_sha256,
    file_sha256,
    load_checkpoint,
    read_checkpoint,
    register_weights_scheme,
    resolve_weights,
    trust_pickle_from_args,
)
from kd_det.checkpoint.safe_pickle import TRUST_ENV
from kd_det.modeling.teacher import load_teacher_weights
from kd_det.release import release_student
from kd_det.release.deploy import load_student


class _System:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, ("touch " + self.marker,))


class _Exec:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.exec, ("open({!r}, 'w').close()".format(self.marker),))


class _Eval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (builtins.eval, ("open({!r}, 'w').close()".format(self.marker),))


class _Subprocess:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (subprocess.call, (["touch", self.marker],))


class _Tensor(torch.Tensor):
    """A tensor subclass: unpickling it calls the class, which a file could name freely."""


def _payloads(marker, pkl=False):
    """name -> (object to save, refused global named in the error); ``pkl``: NumPy weights, as
    model-zoo files hold, so that the payload is the only object that is not data"""
    weights = collections.OrderedDict(w=np.zeros((2, 3)) if pkl else torch.zeros(2, 3))
    return {
        "os.system": ({"model": weights, "x": _System(marker)}, "system"),
        "exec": ({"model": weights, "x": _Exec(marker)}, "builtins.exec"),
        "eval": ({"model": weights, "x": _Eval(marker)}, "builtins.eval"),
        # pickle protocol 2 names subprocess.call by its Python 2 module, commands.call
        "subprocess": ({"model": weights, "x": _Subprocess(marker)}, ".call"),
        # a __reduce__ nested deep in containers, where a model's weights are
        "nested": ({"model": {"w": [1, {"deep": (_System(marker),)}]}}, "system"),
        "tensor subclass": ({"model": {"w": torch.zeros(2).as_subclass(_Tensor)}}, "_Tensor"),
    }


def _write(path, obj):
    if path.endswith(".pkl"):
        with open(path, "wb") as f:
            pickle.dump(obj, f, protocol=2)
    else:
        torch.save(obj, path)
    return path


@pytest.fixture
def marker(tmp_path):
    path = str(tmp_path / "pwned")
    yield path
    assert not os.path.exists(path), "a checkpoint ran code"


PAYLOADS = list(_payloads("m"))


@pytest.mark.parametrize("suffix", [".pth", ".pkl"])
@pytest.mark.parametrize("payload", PAYLOADS)
def test_crafted_pickles_are_refused_without_side_effect(tmp_path, marker, payload, suffix):
    obj, named = _payloads(marker, pkl=suffix == ".pkl")[payload]
    if payload == "tensor subclass" and suffix == ".pkl":
        pytest.skip("a tensor subclass is a torch.save payload")
    path = _write(str(tmp_path / ("evil" + suffix)), obj)
    with pytest.raises(UnsafeCheckpointError) as info:
        read_checkpoint(path)
    message = str(info.value)
    assert path in message and named in message and TRUST_ENV in message
    assert "--trust-pickle" in message


def test_every_entry_point_refuses_a_crafted_checkpoint(tmp_path, marker, tiny_data_root):
    evil_pth = _write(str(tmp_path / "evil.pth"), _payloads(marker)["os.system"][0])
    evil_pkl = _write(str(tmp_path / "evil.pkl"), _payloads(marker, pkl=True)["exec"][0])
    for evil in (evil_pth, evil_pkl):
        # KD.TEACHER.WEIGHTS
        with pytest.raises(UnsafeCheckpointError, match="refused to read"):
            load_teacher_weights(nn.Linear(3, 2), evil, "teacher.yaml")
        # MODEL.WEIGHTS through the trainer's checkpointer
        with pytest.raises(UnsafeCheckpointError):
            AtomicDetectionCheckpointer(nn.Linear(3, 2), str(tmp_path)).resume_or_load(
                evil, resume=False
            )
        # snapshots of the tools (score_images, visualize_distillation), URL-like schemes too
        with pytest.raises(UnsafeCheckpointError):
            SafeDetectionCheckpointer(nn.Linear(3, 2)).load(evil)
        with pytest.raises(UnsafeCheckpointError):
            load_checkpoint(evil)
    # --resume: the checkpoint last_checkpoint names
    run = tmp_path / "run"
    run.mkdir()
    _write(str(run / "model_0000009.pth"), _payloads(marker)["subprocess"][0])
    (run / "last_checkpoint").write_text("model_0000009.pth")
    with pytest.raises(UnsafeCheckpointError, match="model_0000009.pth"):
        AtomicDetectionCheckpointer(nn.Linear(3, 2), str(run)).resume_or_load("", resume=True)
    # a released student, and the student that deploy exports
    with pytest.raises(UnsafeCheckpointError):
        release_student(get_kd_cfg(), evil_pth, str(tmp_path / "release"))
    assert not (tmp_path / "release").exists()
    cfg = tiny_cfg("synthetic/faster_rcnn_R_18_FPN.yaml", tmp_path)
    with pytest.raises(UnsafeCheckpointError):
        load_student(cfg, evil_pth)
    # the attack of the issue: tools/export_student.py --weights evil.pth
    export = runpy.run_path(os.path.join(REPO, "tools", "export_student.py"), run_name="export")
    with pytest.raises(UnsafeCheckpointError):
        export["main"](
            [
                "--config-file",
                config_path("synthetic/faster_rcnn_R_18_FPN.yaml"),
                "--weights",
                evil_pth,
                "--output-dir",
                str(tmp_path / "released"),
            ]
        )


def test_export_refuses_weights_of_another_model(tmp_path, tiny_data_root):
    # the second find: a file holding one tensor "w" was released as a student
    cfg = tiny_cfg("synthetic/faster_rcnn_R_18_FPN.yaml", tmp_path)
    odd = _write(str(tmp_path / "odd.pth"), {"model": {"w": torch.zeros(2)}, "iteration": 1})
    with pytest.raises(ValueError, match="does not hold this config's student") as info:
        release_student(cfg, odd, str(tmp_path / "out"))
    assert "missing keys: backbone." in str(info.value) and "unexpected keys: w" in str(info.value)
    assert not (tmp_path / "out" / "model_final.pth").exists()


def _zoo_pickle(path, weights, numpy_module, protocol):
    data = pickle.dumps({"model": weights, "__author__": "Detectron2 Model Zoo"}, protocol)
    if numpy_module == "numpy.core":  # as NumPy 1 wrote it (protocol 2 names are plain text)
        assert protocol == 2
        data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        assert b"numpy.core.multiarray\n_reconstruct" in data
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize(
    "numpy_module,protocol", [("numpy.core", 2), ("numpy._core", 2), ("numpy._core", 4)]
)
def test_model_zoo_pkl_loads(tmp_path, numpy_module, protocol):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    weights = {k: v.numpy().copy() for k, v in source.state_dict().items()}
    path = _zoo_pickle(str(tmp_path / "zoo.pkl"), weights, numpy_module, protocol)
    target = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    SafeDetectionCheckpointer(target).load(path)
    for key, value in source.state_dict().items():
        assert torch.equal(target.state_dict()[key], value), key  # copied, not computed


def test_trainer_checkpoint_with_optimizer_state_resumes(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(4, 3)).sum().backward()
    optimizer.step()
    saver = AtomicDetectionCheckpointer(model, str(tmp_path), optimizer=optimizer)
    saver.save("model_0000000", iteration=0)
    model2 = nn.Linear(3, 2)
    optimizer2 = torch.optim.SGD(model2.parameters(), lr=0.1, momentum=0.9)
    loaded = AtomicDetectionCheckpointer(model2, str(tmp_path), optimizer=optimizer2)
    assert loaded.resume_or_load("", resume=True)["iteration"] == 0
    assert torch.equal(model2.weight, model.weight)
    momentum = optimizer.state_dict()["state"][0]["momentum_buffer"]
    assert torch.equal(optimizer2.state_dict()["state"][0]["momentum_buffer"], momentum)


def test_rng_states_and_numpy_arrays_in_a_checkpoint_load(tmp_path):
    import random

    state = {"np": np.random.get_state(), "py": random.getstate(), "torch": torch.get_rng_state()}
    path = _write(str(tmp_path / "rng.pth"), {"model": {}, "rng": state})
    rng = load_checkpoint(path)["rng"]
    assert np.array_equal(rng["np"][1], state["np"][1]) and rng["py"] == state["py"]


def test_sha256_pins(tmp_path, marker, monkeypatch):
    good = _write(str(tmp_path / "good.pth"), {"model": {"w": torch.ones(2)}})
    digest = file_sha256(good)
    check_sha256(good, digest)
    check_sha256(good, digest[:8].upper())  # a prefix, as torch.hub's file names carry
    with pytest.raises(ValueError, match="first 8 or more"):
        check_sha256(good, digest[:7])
    wrong = ("0" if digest[0] != "0" else "1") + digest[1:]
    with pytest.raises(WeightsMismatchError) as info:
        load_checkpoint(good, sha256=wrong, what="MODEL.WEIGHTS")
    assert digest in str(info.value) and wrong in str(info.value)
    assert "MODEL.WEIGHTS_SHA256" in str(info.value)
    # checked before any byte is unpickled: even a trusted read of a crafted file never starts
    monkeypatch.setenv(TRUST_ENV, "1")
    evil = _write(str(tmp_path / "evil.pth"), _payloads(marker)["os.system"][0])
    with pytest.raises(WeightsMismatchError, match="KD.TEACHER.WEIGHTS_SHA256"):
        load_teacher_weights(nn.Linear(3, 2), evil, "teacher.yaml", sha256=wrong)
    ckpt = AtomicDetectionCheckpointer(nn.Linear(3, 2), str(tmp_path))
    ckpt.pin(evil, wrong)
    with pytest.raises(WeightsMismatchError, match="MODEL.WEIGHTS_SHA256"):
        ckpt.resume_or_load(evil, resume=False)


def test_trust_pickle_is_the_one_opt_out(tmp_path, monkeypatch):
    # a harmless object that is not plain data: refused by default, read when trusted
    path = _write(str(tmp_path / "own.pth"), {"model": {}, "made": datetime.date(2026, 12, 4)})
    # "0" first: monkeypatch then restores the variable's absence after the test, also where
    # trust_pickle_from_args set it
    monkeypatch.setenv(TRUST_ENV, "0")
    with pytest.raises(UnsafeCheckpointError, match="datetime.date"):
        read_checkpoint(path)
    trust_pickle_from_args(False)
    assert os.environ[TRUST_ENV] == "0"
    trust_pickle_from_args(True)  # --trust-pickle
    assert os.environ[TRUST_ENV] == "1"
    assert read_checkpoint(path)["made"] == datetime.date(2026, 12, 4)
    pkl = _write(str(tmp_path / "own.pkl"), {"made": datetime.date(2026, 12, 4)})
    assert read_checkpoint(pkl)["made"].year == 2026
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read .*bad.pth"):
        read_checkpoint(str(bad))


def test_weights_schemes(tmp_path):
    good = _write(str(tmp_path / "good.pth"), {"model": {"w": torch.ones(2)}})
    register_weights_scheme("kdtest", lambda url: str(tmp_path / url[len("kdtest://") :]))
    assert resolve_weights("kdtest://good.pth") == good
    with pytest.raises(FileNotFoundError, match="unknown scheme nope://"):
        resolve_weights("nope://x.pth", "KD.TEACHER.WEIGHTS")
    with pytest.raises(FileNotFoundError, match="KD.TEACHER.WEIGHTS='missing.pth'"):
        resolve_weights("missing.pth", "KD.TEACHER.WEIGHTS")


# Detectron2 alone, in a process that cannot import kd_det: the patched pure-Python build
BLOCK_KD_DET = r"""
import importlib.abc, sys

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "kd_det":
            raise ImportError("blocked: " + name)

sys.meta_path.insert(0, Block())
"""

PLAIN_PKL_LOAD = r"""
import torch
from detectron2.checkpoint import DetectionCheckpointer
model = torch.nn.Linear(3, 2)
try:
    DetectionCheckpointer(model).load(sys.argv[1])
except Exception as e:
    print("refused:", type(e).__name__, e)
DetectionCheckpointer(model).load(sys.argv[2])
print("loaded:", model.weight.sum().item())
"""

# ten lines, as Detectron2's docs have them: COCOEvaluator with its defaults
PLAIN_COCO_EVALUATION = r"""
from detectron2 import model_zoo
from detectron2.config import get_cfg
from detectron2.data import build_detection_test_loader
from detectron2.data.datasets import register_coco_instances
from detectron2.evaluation import COCOEvaluator, inference_on_dataset
from detectron2.modeling import build_model
register_coco_instances("plain_val", {}, sys.argv[1], sys.argv[2])
cfg = get_cfg()
cfg.merge_from_file(model_zoo.get_config_file("COCO-Detection/retinanet_R_50_FPN_1x.yaml"))
cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.RETINANET.NUM_CLASSES", "4",
                     "MODEL.RETINANET.SCORE_THRESH_TEST", "0.0", "INPUT.MIN_SIZE_TEST", "64",
                     "INPUT.MAX_SIZE_TEST", "64"])
model = build_model(cfg).eval()
print(inference_on_dataset(model, build_detection_test_loader(cfg, "plain_val"),
                           COCOEvaluator("plain_val", output_dir=sys.argv[3])))
"""


def _plain_detectron2(script, *args):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop(TRUST_ENV, None)
    return subprocess.run(
        [sys.executable, "-c", "import sys\n" + BLOCK_KD_DET + script, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


def _requires_patched_detectron2():
    from detectron2 import _C

    if not getattr(_C, "KD_DET_PLACEHOLDER", False):
        pytest.skip("a full Detectron2 installed by other means is left unchanged")


def test_patched_detectron2_reads_pkl_as_data(tmp_path, marker):
    _requires_patched_detectron2()
    evil = _write(str(tmp_path / "evil.pkl"), _payloads(marker, pkl=True)["os.system"][0])
    weights = {"weight": np.ones((2, 3), np.float32), "bias": np.zeros(2, np.float32)}
    good = _zoo_pickle(str(tmp_path / "zoo.pkl"), weights, "numpy._core", 2)
    proc = _plain_detectron2(PLAIN_PKL_LOAD, evil, good)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "refused: RefusedGlobalError posix.system" in proc.stdout or (
        "refused: RefusedGlobalError nt.system" in proc.stdout
    ), proc.stdout
    assert "loaded: 6.0" in proc.stdout


@pytest.mark.slow
def test_plain_detectron2_coco_evaluation_script(tmp_path, tiny_data_root):
    _requires_patched_detectron2()
    json_file = os.path.join(tiny_data_root, "annotations", "instances_val.json")
    images = os.path.join(tiny_data_root, "JPEGImages")
    proc = _plain_detectron2(PLAIN_COCO_EVALUATION, json_file, images, str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # scored (an untrained model's detections, every score kept), not skipped as empty
    assert "'bbox'" in proc.stdout and "'AP'" in proc.stdout, proc.stdout[-2000:]
    assert re.search(r"'bbox', \{'AP': \d", proc.stdout), proc.stdout[-2000:]
    assert "COCOeval_opt" not in proc.stderr


BARE_PICKLE_LOAD = re.compile(r"(?<![\w.'\"])pickle\.load\(")


def test_no_code_executing_load_is_left():
    # kd_det, its tools and the patched Detectron2: no weights_only=False, no bare pickle.load
    import detectron2

    roots = [os.path.join(REPO, d) for d in ("kd_det", "tools", "benchmarks")]
    roots.append(os.path.dirname(detectron2.__file__))
    offenders = []
    for root in roots:
        for folder, _, files in os.walk(root):
            for name in files:
                if not name.endswith(".py"):
                    continue
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as f:
                    for number, line in enumerate(f, 1):
                        code = line.split("#")[0]
                        if "weights_only=False" in code or BARE_PICKLE_LOAD.search(code):
                            offenders.append("{}:{}: {}".format(path, number, line.strip()))
    allowed = os.path.join("kd_det", "checkpoint")  # behind the explicit opt-out only
    allowed_d2 = "_kd_det_safe_pickle.py"
    offenders = [o for o in offenders if allowed not in o and allowed_d2 not in o]
    assert not offenders, "\n".join(offenders)


def test_released_config_drops_the_pins(tmp_path, tiny_data_root):
    from kd_det.config.student import vanilla_student_config

    cfg = tiny_cfg(
        "synthetic/distill/ssim_faster_rcnn_R50_to_R18.yaml",
        tmp_path,
        ["MODEL.WEIGHTS_SHA256", "0123abcd", "KD.TEACHER.WEIGHTS_SHA256", "89abcdef"],
    )
    out = vanilla_student_config(cfg, "w.pth")
    assert "WEIGHTS_SHA256" not in out.MODEL and "KD" not in out
    assert TINY_PREFIX in out.DATASETS.TRAIN[0]

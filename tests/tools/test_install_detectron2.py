"""The source patches of tools/install_detectron2.py, and the Detectron2 they give."""

import glob
import importlib
import os
import runpy
from types import SimpleNamespace

import pytest
from conftest import REPO

from kd_det.evaluation import has_cpp_ops

# the installer is a script (Detectron2 does not exist yet when it runs): its functions, by path
compat = SimpleNamespace(
    **runpy.run_path(os.path.join(REPO, "tools", "install_detectron2.py"), run_name="installer")
)

SETUP_PY = """setup(
    name="pb1-detectron2",
    install_requires=[
        "omegaconf>=2.1",
        "black==21.4b2",
    ],
    ext_modules=get_extensions(),
    cmdclass={"build_ext": torch.utils.cpp_extension.BuildExtension},
    package_data={"detectron2.model_zoo": get_model_zoo_configs()},
)
"""


def _fake_sdist(root):
    (root / "detectron2" / "data" / "transforms").mkdir(parents=True)
    (root / "detectron2" / "data" / "datasets").mkdir(parents=True)
    (root / "detectron2" / "export").mkdir(parents=True)
    (root / "setup.py").write_text(SETUP_PY)
    (root / "detectron2" / "data" / "transforms" / "transform.py").write_text(
        "def f(interp=Image.LINEAR):\n    return np.float32(1), np.int64(2)\n"
    )
    (root / "detectron2" / "data" / "datasets" / "voc.py").write_text(
        "ids = np.loadtxt(f, dtype=np.str)\n"
        "h = np.zeros(3, dtype=np.int)\n"
        "x = np.float(1) + np.bool_(1)\n"
    )
    # v0.6's file, verbatim in what matters: the Caffe2 API first, unguarded
    (root / "detectron2" / "export" / "__init__.py").write_text(
        "from .api import *\nfrom .flatten import TracingAdapter\n"
    )
    (root / "detectron2" / "model_zoo" / "configs" / "common").mkdir(parents=True)
    (root / "detectron2" / "model_zoo" / "configs" / "Base-RetinaNet.yaml").write_text(
        "MODEL: {}\n"
    )
    (root / "detectron2" / "model_zoo" / "configs" / "common" / "train.py").write_text(
        "train = dict()\n"
    )
    (root / "detectron2" / "model_zoo" / "model_zoo.py").write_text(MODEL_ZOO_PY)
    (root / "detectron2" / "checkpoint").mkdir(parents=True)
    (root / "detectron2" / "checkpoint" / "detection_checkpoint.py").write_text(PICKLE_READER)
    (root / "detectron2" / "data" / "build.py").write_text(PICKLE_READER)
    (root / "detectron2" / "evaluation").mkdir(parents=True)
    (root / "detectron2" / "evaluation" / "coco_evaluation.py").write_text(COCO_EVALUATION_PY)


# v0.6's readers of .pkl checkpoints and proposal files, in what matters
PICKLE_READER = """import logging
import pickle
import torch


def read(filename):
    with open(filename, "rb") as f:
        return pickle.load(f, encoding="latin1")
"""

# v0.6's detectron2/evaluation/coco_evaluation.py, in what matters
COCO_EVALUATION_PY = """class COCOEvaluator:
    def __init__(self, dataset_name, use_fast_impl=True):
        self._use_fast_impl = use_fast_impl


def _evaluate_predictions_on_coco(coco_gt, coco_dt, iou_type, use_fast_impl=True):
    return (COCOeval_opt if use_fast_impl else COCOeval)(coco_gt, coco_dt, iou_type)
"""


# v0.6's detectron2/model_zoo/model_zoo.py, in what matters
MODEL_ZOO_PY = """import os
import pkg_resources


def get_config_file(config_path):
    cfg_file = pkg_resources.resource_filename(
        "detectron2.model_zoo", os.path.join("configs", config_path)
    )
    if not os.path.exists(cfg_file):
        raise RuntimeError("{} not available in Model Zoo!".format(config_path))
    return cfg_file
"""


def test_patch_detectron2_sdist(tmp_path):
    _fake_sdist(tmp_path)
    compat.patch_detectron2_sdist(str(tmp_path))
    compat.patch_detectron2_sdist(str(tmp_path))  # idempotent
    setup_py = (tmp_path / "setup.py").read_text()
    assert "ext_modules" not in setup_py and "cmdclass" not in setup_py and "black" not in setup_py
    assert '"omegaconf>=2.1",' in setup_py
    transform = (tmp_path / "detectron2" / "data" / "transforms" / "transform.py").read_text()
    assert "Image.BILINEAR" in transform and "np.float32(1), np.int64(2)" in transform
    voc = (tmp_path / "detectron2" / "data" / "datasets" / "voc.py").read_text()
    assert voc == (
        "ids = np.loadtxt(f, dtype=str)\n"
        "h = np.zeros(3, dtype=int)\n"
        "x = float(1) + np.bool_(1)\n"
    )
    assert "KD_DET_PLACEHOLDER" in (tmp_path / "detectron2" / "_C.py").read_text()
    export_init = (tmp_path / "detectron2" / "export" / "__init__.py").read_text()
    assert export_init.count("from .api import *") == 1 and "import caffe2.proto" in export_init
    assert export_init.endswith("from .flatten import TracingAdapter\n")
    # the model zoo finds its configs without pkg_resources, and setup.py installs them from where
    # they are
    namespace = {"__file__": str(tmp_path / "detectron2" / "model_zoo" / "model_zoo.py")}
    exec((tmp_path / "detectron2" / "model_zoo" / "model_zoo.py").read_text(), namespace)
    assert "pkg_resources" not in namespace
    assert namespace["get_config_file"]("common/train.py") == str(
        tmp_path / "detectron2" / "model_zoo" / "configs" / "common" / "train.py"
    )
    start = setup_py.index("package_data=") + len("package_data=")
    package_data = setup_py[start : setup_py.index("]},", start) + 2]
    cwd = os.getcwd()
    try:
        os.chdir(tmp_path)  # pip runs setup.py in the sdist's root
        listed = eval(package_data, {"os": os, "glob": glob})
    finally:
        os.chdir(cwd)
    assert sorted(listed["detectron2.model_zoo"]) == [
        "configs/Base-RetinaNet.yaml",
        "configs/common/train.py",
    ]
    # .pkl files and proposals are read as data only, by a copy of kd_det's unpickler
    safe_copy = tmp_path / "detectron2" / "utils" / "_kd_det_safe_pickle.py"
    with open(os.path.join(REPO, "kd_det", "checkpoint", "safe_pickle.py")) as f:
        assert safe_copy.read_text() == f.read()
    for reader in ("checkpoint/detection_checkpoint.py", "data/build.py"):
        text = (tmp_path / "detectron2" / reader).read_text()
        assert "pickle.load(" not in text.replace("_kd_det_safe_pickle.load(", "")
        assert text.count('_kd_det_safe_pickle.load(f, encoding="latin1")') == 1
        assert text.count("from detectron2.utils import _kd_det_safe_pickle") == 1
    # COCOEvaluator: pycocotools where the C++ extension is the placeholder
    coco = (tmp_path / "detectron2" / "evaluation" / "coco_evaluation.py").read_text()
    assert coco.count("def _kd_det_no_extension") == 1
    for placeholder, fast in ((True, False), (False, True)):
        namespace = {"COCOeval_opt": lambda *a: "opt", "COCOeval": lambda *a: "official"}
        exec(coco, namespace)
        namespace["_kd_det_no_extension"] = lambda: placeholder
        assert namespace["COCOEvaluator"]("x")._use_fast_impl is fast
        assert namespace["_evaluate_predictions_on_coco"](0, 0, "bbox") == (
            "opt" if fast else "official"
        )
    # an installed build is brought up to date the same way, once
    assert not compat.patch_detectron2_package(str(tmp_path / "detectron2"))


def test_detectron2_export_imports_without_caffe2():
    # TracingAdapter is what tools/export_student.py --format torchscript uses
    from detectron2.export import TracingAdapter  # noqa: F401


def test_patch_refuses_an_unexpected_setup_py(tmp_path):
    _fake_sdist(tmp_path)
    (tmp_path / "setup.py").write_text("setup(ext_modules=get_extensions(), other=1)\n")
    with pytest.raises(RuntimeError, match="unexpected setup.py"):
        compat.patch_detectron2_sdist(str(tmp_path))


def test_detectron2_model_zoo_configs():
    """``detectron2.model_zoo`` imports (no pkg_resources) and has its configs, yacs and
    LazyConfig."""
    from detectron2 import model_zoo
    from detectron2.config import instantiate
    from detectron2.modeling import RetinaNet

    cfg = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.yaml", trained=True)
    assert cfg.MODEL.META_ARCHITECTURE == "RetinaNet" and cfg.MODEL.WEIGHTS.endswith(".pkl")
    assert isinstance(
        instantiate(model_zoo.get_config("common/models/retinanet.py").model), RetinaNet
    )
    lsj = model_zoo.get_config(
        "new_baselines/mask_rcnn_R_50_FPN_100ep_LSJ.py"
    )  # imports ../common/
    assert {"model", "dataloader", "optimizer", "train", "lr_multiplier"} <= set(lsj.keys())


def test_placeholder_ops_raise_a_clear_error():
    ext = importlib.import_module("detectron2._C")
    if not getattr(ext, "KD_DET_PLACEHOLDER", False):
        pytest.skip("a full Detectron2 with its C++ extension is installed")
    assert not has_cpp_ops()
    with pytest.raises(
        RuntimeError, match="deform_conv_forward is not available.*C\\+\\+ extension"
    ):
        ext.deform_conv_forward(1, 2)


def test_detectron2_environment_report_works():
    from detectron2.utils.collect_env import collect_env_info

    assert "detectron2" in collect_env_info()


def test_installer_updates_an_installed_pure_python_build(tmp_path):
    installer = vars(compat)
    for kind in ("ours", "full"):
        package = tmp_path / kind / "detectron2"
        (package / "export").mkdir(parents=True)
        (package / "export" / "__init__.py").write_text(
            "from .api import *\nfrom .flatten import TracingAdapter\n"
        )
        c_ext = (
            "KD_DET_PLACEHOLDER = True  # an older placeholder\n"
            if kind == "ours"
            else "REAL = True\n"
        )
        (package / "_C.py").write_text(c_ext)
        reinstall = installer["_refresh_pure_python_build"](str(package))
        export_init = (package / "export" / "__init__.py").read_text()
        if kind == "ours":
            assert (package / "_C.py").read_text() == compat.PLACEHOLDER_C_SOURCE
            assert "import caffe2.proto" in export_init
            assert reinstall  # built before the model zoo's configs were installed
            (package / "model_zoo" / "configs").mkdir(parents=True)
            (package / "model_zoo" / "configs" / "Base-RCNN-FPN.yaml").write_text("MODEL: {}\n")
            assert not installer["_refresh_pure_python_build"](str(package))
        else:  # a Detectron2 with its real extension, installed by other means, is left alone
            assert (
                (package / "_C.py").read_text() == c_ext
                and "caffe2" not in export_init
                and not reinstall
            )

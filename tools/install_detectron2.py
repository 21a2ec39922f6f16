#!/usr/bin/env python
"""
Install Detectron2 into the running Python environment from the package registry.

Detectron2 is not published on PyPI.  If ``import detectron2`` already works (a full
build, or an earlier run of this script) nothing is done.  Otherwise the
``pb1-detectron2==0.6`` sdist (a repackaging of Detectron2 v0.6 without its C++
sources) is downloaded with pip, patched by :func:`patch_detectron2_sdist` and installed
as pure Python.  torch and torchvision must be installed first.

The patches, applied to the unpacked sdist (and to an installed pure-Python build that
predates one of them):

* ``setup.py`` loses the ``detectron2._C`` extension (its sources are missing) and
  the obsolete ``black==21.4b2`` pin.
* ``detectron2/_C.py`` is added: a placeholder whose ops raise a clear error naming
  the feature (deformable conv, rotated boxes, fast COCO eval).  Only those
  features use the extension; plain R-CNN / RetinaNet never do.
* ``Image.LINEAR`` (removed in Pillow 10, used as a default argument, so it breaks
  the import) becomes ``Image.BILINEAR``, the same filter.
* NumPy aliases removed in NumPy 1.24 (``np.str``, ``np.int``, ``np.float``,
  ``np.object``; the VOC loader and some evaluators use them) become the builtins
  they always were.
* ``detectron2/export/__init__.py`` imports its Caffe2 API unconditionally, and Caffe2
  left PyTorch in 2.x, so ``import detectron2.export`` failed and with it
  ``TracingAdapter`` (TorchScript tracing, which needs no Caffe2).  The Caffe2 API is
  now imported only where ``caffe2`` is, as later Detectron2 releases do.
* ``detectron2.model_zoo`` imports ``pkg_resources``, which setuptools 81 removed, to
  find its configs, so ``from detectron2 import model_zoo`` failed; it now finds them
  beside its own file.  And the sdist's ``setup.py`` collects those configs from a
  ``configs/`` folder the sdist does not have (they are already under
  ``detectron2/model_zoo/configs``), so none were installed: ``package_data`` now lists
  them where they are.  ``model_zoo.get_config_file``/``get_config``/``get`` work again,
  as do LazyConfigs that import ``common/`` from the model zoo (``new_baselines``).

* Detectron2 reads ``.pkl`` checkpoints (its model zoo's format) and precomputed proposal
  files with a bare ``pickle.load``, which runs whatever code a file names.  Both read through
  ``detectron2/utils/_kd_det_safe_pickle.py`` instead, a copy of kd_det's data-only unpickler
  (``kd_det/checkpoint/safe_pickle.py``: NumPy arrays, builtin containers, strings and numbers;
  ``KD_DET_TRUST_PICKLE=1`` is the opt-out), so plain ``MODEL.WEIGHTS x.pkl`` cannot run code.
  (``.pth`` files are read by ``torch.load``, whose ``weights_only=True`` is the default.)
* ``COCOEvaluator`` defaults to ``use_fast_impl=True``, the C++ ``COCOeval_opt``, which failed
  after the whole inference had run; it now uses pycocotools' ``COCOeval`` when the extension
  is the placeholder, so evaluation scripts written from Detectron2's docs work as they are.

Patching the source (instead of patching at import time) keeps the installed
Detectron2 usable with no kd_det import, e.g. to deploy an exported student.

A full Detectron2 installed by other means is used untouched.  At run time,
``kd_det.evaluation.has_cpp_ops`` tells whether the real extension is there (kd_det then
evaluates with pycocotools), and ``kd_det.engine.launch`` runs several processes on CPUs.

Usage:  python tools/install_detectron2.py [--force]
        python tools/install_detectron2.py --wheel-dir .whl   # build the patched wheel only
"""

import argparse
import glob
import os
import re
import subprocess
import sys
import tarfile
import tempfile

SDIST = "pb1-detectron2==0.6"

# Source of the placeholder ``detectron2/_C.py``.  Any attribute is a function that
# raises: the message names the feature and the fix.
PLACEHOLDER_C_SOURCE = '''\
"""Placeholder for Detectron2's C++/CUDA extension (written by kd_det's installer).

This Detectron2 was built pure-Python from the pb1-detectron2 sdist, which lacks the
C++ sources. Deformable convolution, rotated boxes and the fast COCO evaluator need
the extension; everything else (Faster R-CNN, RetinaNet, FPN, ROIAlign via
torchvision, pycocotools evaluation) works without it.
"""

KD_DET_PLACEHOLDER = True


# Queried by detectron2.utils.collect_env when it prints the environment.
def get_compiler_version():
    return "not built (pure-Python Detectron2)"


def get_cuda_version():
    return "not built (pure-Python Detectron2)"


def has_cuda():
    return False


def _missing(name):
    def op(*args, **kwargs):
        raise RuntimeError(
            "detectron2._C.{} is not available: this Detectron2 was built without its "
            "C++ extension (pure-Python install from pb1-detectron2). Deformable conv, "
            "rotated boxes and the fast COCO evaluator need it. Use the pycocotools "
            "evaluator (use_fast_impl=False) or install a full Detectron2 build.".format(name)
        )

    op.__name__ = name
    return op


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)
    return _missing(name)
'''

_EXT_MODULES_LINE = re.compile(r"^\s*ext_modules=get_extensions\(\),\s*$", re.M)
_CMDCLASS_LINE = re.compile(r"^\s*cmdclass=\{\"build_ext\":.*\},\s*$", re.M)
_BLACK_PIN = re.compile(r"^\s*\"black==[^\"]*\",\s*$", re.M)
_REMOVED_NUMPY_ALIAS = re.compile(r"\bnp\.(str|int|float|object)\b(?!\.)")
_MODEL_ZOO_CONFIGS_DATA = 'package_data={"detectron2.model_zoo": get_model_zoo_configs()},'
# the configs where the sdist has them, relative to the package (setup.py runs in the sdist's root)
_MODEL_ZOO_CONFIGS_DATA_FIXED = (
    'package_data={"detectron2.model_zoo": [  # kd_det: the sdist has its configs in the package '
    "already\n"
    '        os.path.relpath(p, os.path.join("detectron2", "model_zoo"))\n'
    '        for p in glob.glob(os.path.join("detectron2", "model_zoo", "configs", "**", "*"),\n'
    "                           recursive=True)\n"
    "        if os.path.isfile(p)]},"
)
_PKG_RESOURCES_IMPORT = "import pkg_resources\n"
_PKG_RESOURCES_CONFIG = re.compile(
    r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\",\s*"
    r"os\.path\.join\(\"configs\", config_path\)\s*\)"
)
_CONFIG_BESIDE_MODULE = (
    'os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", config_path)'
    "  # kd_det: no pkg_resources"
)
# Detectron2's two bare pickle.load calls on files (model-zoo .pkl checkpoints, precomputed
# proposals) read through a copy of kd_det's data-only unpickler, installed beside them
SAFE_PICKLE_SOURCE = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "kd_det",
    "checkpoint",
    "safe_pickle.py",
)
SAFE_PICKLE_MODULE = os.path.join("utils", "_kd_det_safe_pickle.py")
_SAFE_PICKLE_IMPORT = (
    "from detectron2.utils import _kd_det_safe_pickle  # kd_det: data-only pickles\n"
)
_BARE_PICKLE_LOAD = re.compile(r'(?<![\w.])pickle\.load\(f, encoding="latin1"\)')
_SAFE_PICKLE_LOAD = '_kd_det_safe_pickle.load(f, encoding="latin1")'
_PICKLE_READERS = (
    os.path.join("checkpoint", "detection_checkpoint.py"),
    os.path.join("data", "build.py"),
)
# COCOEvaluator defaults to the C++ COCOeval_opt, which the pure-Python build lacks: it failed
# after the whole inference had run.  pycocotools' COCOeval is used when the placeholder is there.
_COCO_EVALUATION = os.path.join("evaluation", "coco_evaluation.py")
_FAST_IMPL_ATTR = "        self._use_fast_impl = use_fast_impl\n"
_FAST_IMPL_ATTR_FIXED = (
    "        # kd_det: pycocotools' COCOeval where the C++ extension is missing\n"
    "        self._use_fast_impl = use_fast_impl and not _kd_det_no_extension()\n"
)
_FAST_IMPL_CALL = "(COCOeval_opt if use_fast_impl else COCOeval)"
_FAST_IMPL_CALL_FIXED = (
    "(COCOeval_opt if use_fast_impl and not _kd_det_no_extension() else COCOeval)"
)
_NO_EXTENSION_FUNCTION = (
    "\n\ndef _kd_det_no_extension():\n"
    "    # kd_det: the pure-Python build's detectron2._C is a placeholder without COCOeval_opt\n"
    "    from detectron2 import _C\n\n"
    '    return getattr(_C, "KD_DET_PLACEHOLDER", False)\n'
)
_EXPORT_CAFFE2_IMPORT = "from .api import *\n"
_EXPORT_CAFFE2_IMPORT_GUARDED = (
    "try:  # kd_det: Caffe2 is not part of PyTorch 2.x; tracing and scripting do not need it\n"
    "    import caffe2.proto  # noqa: F401\n"
    "except ImportError:\n"
    "    pass\n"
    "else:\n"
    "    from .api import *\n"
)


def patch_detectron2_sdist(src_dir: str) -> None:
    """
    Patch an unpacked ``pb1-detectron2==0.6`` sdist in place so it builds and imports
    as pure Python (see the module docstring).  Idempotent.

    Raises:
        RuntimeError: if the sdist does not look like the expected release, so a
            silently different package is never built.
    """
    setup_py = os.path.join(src_dir, "setup.py")
    with open(setup_py) as f:
        text = f.read()
    if "ext_modules=get_extensions()" in text:
        if not _EXT_MODULES_LINE.search(text):
            raise RuntimeError("unexpected setup.py layout in " + setup_py)
        text = _EXT_MODULES_LINE.sub("", text)
        text = _CMDCLASS_LINE.sub("", text)
    text = _BLACK_PIN.sub("", text)
    text = text.replace(_MODEL_ZOO_CONFIGS_DATA, _MODEL_ZOO_CONFIGS_DATA_FIXED)
    with open(setup_py, "w") as f:
        f.write(text)

    with open(os.path.join(src_dir, "detectron2", "_C.py"), "w") as f:
        f.write(PLACEHOLDER_C_SOURCE)
    patch_detectron2_package(os.path.join(src_dir, "detectron2"))


def patch_detectron2_package(package_dir: str) -> bool:
    """
    The source fixes (Pillow, NumPy, the Caffe2 import of ``detectron2.export``, the
    model zoo's ``pkg_resources``, data-only pickles, the evaluator's C++ default) applied
    in place to a ``detectron2`` package folder: the unpacked sdist's, or an installed
    pure-Python build's, which the installer brings up to date.  Idempotent.

    Returns:
        True when a file changed.
    """
    changed = _install_safe_pickle(package_dir)
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                text = f.read()
            fixed = _REMOVED_NUMPY_ALIAS.sub(r"\1", text.replace("Image.LINEAR", "Image.BILINEAR"))
            relative = os.path.relpath(path, package_dir)
            if (
                relative == os.path.join("export", "__init__.py")
                and _EXPORT_CAFFE2_IMPORT_GUARDED not in fixed
            ):
                fixed = fixed.replace(_EXPORT_CAFFE2_IMPORT, _EXPORT_CAFFE2_IMPORT_GUARDED)
            if relative == os.path.join("model_zoo", "model_zoo.py"):
                fixed = _PKG_RESOURCES_CONFIG.sub(
                    _CONFIG_BESIDE_MODULE, fixed.replace(_PKG_RESOURCES_IMPORT, "")
                )
            fixed = _patch_file(relative, fixed)
            if fixed != text:
                with open(path, "w") as f:
                    f.write(fixed)
                changed = True
    return changed


def _patch_file(relative: str, text: str) -> str:
    """The safe-loading and evaluation fixes of one file (``relative`` to the package)."""
    if relative in _PICKLE_READERS and _BARE_PICKLE_LOAD.search(text):
        text = _BARE_PICKLE_LOAD.sub(_SAFE_PICKLE_LOAD, text)
        text = text.replace("import pickle\n", "import pickle\n" + _SAFE_PICKLE_IMPORT, 1)
    if relative == _COCO_EVALUATION and _FAST_IMPL_ATTR in text:
        text = text.replace(_FAST_IMPL_ATTR, _FAST_IMPL_ATTR_FIXED)
        text = text.replace(_FAST_IMPL_CALL, _FAST_IMPL_CALL_FIXED) + _NO_EXTENSION_FUNCTION
    return text


def _install_safe_pickle(package_dir: str) -> bool:
    """Write (or update) the copy of kd_det's data-only unpickler into the package."""
    with open(SAFE_PICKLE_SOURCE) as f:
        source = f.read()
    path = os.path.join(package_dir, SAFE_PICKLE_MODULE)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if os.path.isfile(path):
        with open(path) as f:
            if f.read() == source:
                return False
    with open(path, "w") as f:
        f.write(source)
    return True


def detectron2_importable() -> bool:
    probe = "import detectron2.modeling, detectron2.data.transforms, detectron2.evaluation"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def _refresh_pure_python_build(package_dir) -> bool:
    """
    Bring an installed kd_det pure-Python build up to date with the patches above:
    rewrite an outdated placeholder ``_C.py`` and apply source fixes added since it was
    built.  A Detectron2 with its real extension (installed by other means) is never touched.

    Returns:
        True when the build must be reinstalled: it lacks the model zoo's configs (builds
        made before the sdist's package_data was fixed).
    """
    path = os.path.join(package_dir, "_C.py")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        current = f.read()
    if "KD_DET_PLACEHOLDER" not in current:
        return False
    if current != PLACEHOLDER_C_SOURCE:
        with open(path, "w") as f:
            f.write(PLACEHOLDER_C_SOURCE)
        print("updated the detectron2._C placeholder at", path)
    if patch_detectron2_package(package_dir):
        print("applied kd_det's source fixes to", package_dir)
    return not os.path.isfile(
        os.path.join(package_dir, "model_zoo", "configs", "Base-RCNN-FPN.yaml")
    )


def pip(*args):
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _patched_source(tmp: str) -> str:
    """Download the sdist into ``tmp``, unpack and patch it; returns the source folder."""
    # --no-build-isolation: metadata preparation runs setup.py, which imports torch.
    pip(
        "download",
        "-q",
        "--no-deps",
        "--no-binary",
        ":all:",
        "--no-build-isolation",
        "-d",
        tmp,
        SDIST,
    )
    (archive,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    (src,) = [d for d in glob.glob(os.path.join(tmp, "*")) if os.path.isdir(d)]
    patch_detectron2_sdist(src)
    return src


def build_wheel(wheel_dir: str) -> None:
    """The patched Detectron2 as a wheel in ``wheel_dir`` (pure Python: any Python 3, any
    platform)."""
    os.makedirs(wheel_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kd_det_d2_") as tmp:
        pip(
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            wheel_dir,
            _patched_source(tmp),
        )
    print("detectron2 wheel written to", wheel_dir)


def main():
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    parser.add_argument(
        "--wheel-dir",
        default="",
        help="build a pure-Python wheel of the patched sdist into this folder "
        "instead of installing (for machines without the package registry, e.g. the GPU machine)",
    )
    args = parser.parse_args()

    if args.wheel_dir:
        build_wheel(os.path.abspath(args.wheel_dir))
        return
    reinstall = args.force
    if not args.force and detectron2_importable():
        import detectron2

        if not _refresh_pure_python_build(os.path.dirname(detectron2.__file__)):
            print(
                "detectron2 {} already installed at {}".format(
                    detectron2.__version__, os.path.dirname(detectron2.__file__)
                )
            )
            return
        print("the installed pure-Python detectron2 lacks its model zoo configs: reinstalling it")
        reinstall = True
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        sys.exit(
            "install torch and torchvision before Detectron2 ({}); see docs/setup.md".format(e)
        )

    with tempfile.TemporaryDirectory(prefix="kd_det_d2_") as tmp:
        # a reinstall replaces Detectron2 only; its dependencies stay as they are
        pip(
            "install",
            "-q",
            "--no-build-isolation",
            *(["--force-reinstall", "--no-deps"] if reinstall else []),
            _patched_source(tmp)
        )

    if not detectron2_importable():
        sys.exit(
            "detectron2 was installed but does not import; "
            "run: {} -c 'import detectron2.modeling'".format(sys.executable)
        )
    print("detectron2 installed (pure Python, without the C++ extension)")


if __name__ == "__main__":
    main()

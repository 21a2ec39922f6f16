#!/usr/bin/env python
"""
Install Detectron2 into the running Python environment from the package registry.

Detectron2 is not published on PyPI.  If ``import detectron2`` already works (a full
build, or an earlier run of this script) nothing is done.  Otherwise the
``pb1-detectron2==0.6`` sdist (a repackaging of Detectron2 v0.6 without its C++
sources) is downloaded with pip, patched by :func:`kd_det.compat.patch_detectron2_sdist`
and installed as pure Python.  torch and torchvision must be installed first.

Usage:  python tools/install_detectron2.py [--force]
        python tools/install_detectron2.py --wheel-dir .whl   # build the patched wheel, install nothing
"""

import argparse
import glob
import importlib.util
import os
import subprocess
import sys
import tarfile
import tempfile

SDIST = "pb1-detectron2==0.6"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_compat():
    # kd_det/__init__.py imports Detectron2, which is what we are about to install:
    # load the compat module on its own, from its file.
    path = os.path.join(REPO_ROOT, "kd_det", "compat.py")
    spec = importlib.util.spec_from_file_location("_kd_det_compat", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def detectron2_importable() -> bool:
    probe = "import detectron2.modeling, detectron2.data.transforms, detectron2.evaluation"
    return subprocess.run([sys.executable, "-c", probe], capture_output=True).returncode == 0


def _refresh_pure_python_build(compat, package_dir) -> bool:
    """
    Bring an installed kd_det pure-Python build up to date with ``kd_det.compat``:
    rewrite an outdated placeholder ``_C.py`` and apply source fixes added since it was
    built.  A Detectron2 with its real extension (installed by other means) is never touched.

    Returns:
        True when the build must be reinstalled: it lacks the model zoo's configs (builds
        made before kd_det.compat fixed the sdist's package_data).
    """
    path = os.path.join(package_dir, "_C.py")
    if not os.path.isfile(path):
        return False
    with open(path) as f:
        current = f.read()
    if "KD_DET_PLACEHOLDER" not in current:
        return False
    if current != compat.PLACEHOLDER_C_SOURCE:
        with open(path, "w") as f:
            f.write(compat.PLACEHOLDER_C_SOURCE)
        print("updated the detectron2._C placeholder at", path)
    if compat.patch_detectron2_package(package_dir):
        print("applied kd_det's source fixes to", package_dir)
    return not os.path.isfile(os.path.join(package_dir, "model_zoo", "configs", "Base-RCNN-FPN.yaml"))


def pip(*args):
    cmd = [sys.executable, "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _patched_source(compat, tmp: str) -> str:
    """Download the sdist into ``tmp``, unpack and patch it; returns the source folder."""
    # --no-build-isolation: metadata preparation runs setup.py, which imports torch.
    pip("download", "-q", "--no-deps", "--no-binary", ":all:", "--no-build-isolation", "-d", tmp, SDIST)
    (archive,) = glob.glob(os.path.join(tmp, "*.tar.gz"))
    with tarfile.open(archive) as tar:
        tar.extractall(tmp, filter="data")
    (src,) = [d for d in glob.glob(os.path.join(tmp, "*")) if os.path.isdir(d)]
    compat.patch_detectron2_sdist(src)
    return src


def build_wheel(compat, wheel_dir: str) -> None:
    """The patched Detectron2 as a wheel in ``wheel_dir`` (pure Python: any Python 3, any platform)."""
    os.makedirs(wheel_dir, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="kd_det_d2_") as tmp:
        pip("wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheel_dir, _patched_source(compat, tmp))
    print("detectron2 wheel written to", wheel_dir)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="reinstall even if detectron2 imports")
    parser.add_argument("--wheel-dir", default="",
                        help="build a pure-Python wheel of the patched sdist into this folder instead of installing "
                             "(for machines without the package registry, e.g. the GPU machine)")
    args = parser.parse_args()

    compat = _load_compat()
    if args.wheel_dir:
        build_wheel(compat, os.path.abspath(args.wheel_dir))
        return
    reinstall = args.force
    if not args.force and detectron2_importable():
        import detectron2

        if not _refresh_pure_python_build(compat, os.path.dirname(detectron2.__file__)):
            print("detectron2 {} already installed at {}".format(detectron2.__version__,
                                                               os.path.dirname(detectron2.__file__)))
            return
        print("the installed pure-Python detectron2 lacks its model zoo configs: reinstalling it")
        reinstall = True
    try:
        import torch  # noqa: F401
        import torchvision  # noqa: F401
    except ImportError as e:
        sys.exit("install torch and torchvision before Detectron2 ({}); see README.md".format(e))

    with tempfile.TemporaryDirectory(prefix="kd_det_d2_") as tmp:
        # a reinstall replaces Detectron2 only; its dependencies stay as they are
        pip("install", "-q", "--no-build-isolation", *(["--force-reinstall", "--no-deps"] if reinstall else []),
            _patched_source(compat, tmp))

    if not detectron2_importable():
        sys.exit("detectron2 was installed but does not import; run: {} -c 'import detectron2.modeling'".format(sys.executable))
    print("detectron2 installed (pure Python, without the C++ extension)")


if __name__ == "__main__":
    main()

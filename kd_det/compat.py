"""Every third-party compatibility fix kd_det needs, in one place.

Detectron2 is not on PyPI.  The registry package ``pb1-detectron2==0.6`` repackages
Detectron2 v0.6 without its C++ sources, so ``tools/install_detectron2.py`` builds it
pure-Python after patching the unpacked sdist with :func:`patch_detectron2_sdist`:

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

Patching the source (instead of patching at import time) keeps the installed
Detectron2 usable with no kd_det import, e.g. to deploy an exported student.

At run time, :data:`HAS_CPP_OPS` tells whether the real extension is there:
kd_det then picks pycocotools' COCOeval instead of the fast C++ one, and
:func:`launch` uses gloo instead of NCCL when there is no GPU (v0.6 hard-codes
NCCL and asserts CUDA), and in those CPU workers DDP gets ``device_ids=None``
(v0.6 passes the local rank, which DDP rejects for CPU modules).  A full Detectron2 installed by other means is used
untouched.

This module imports nothing from Detectron2 at module level so that the
installer can load it before Detectron2 exists.
"""

import importlib
import os
import re

__all__ = [
    "PLACEHOLDER_C_SOURCE",
    "patch_detectron2_sdist",
    "patch_detectron2_package",
    "has_cpp_ops",
    "launch",
]

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
_MODEL_ZOO_CONFIGS_DATA = "package_data={\"detectron2.model_zoo\": get_model_zoo_configs()},"
# the configs where the sdist has them, relative to the package (setup.py runs in the sdist's root)
_MODEL_ZOO_CONFIGS_DATA_FIXED = (
    "package_data={\"detectron2.model_zoo\": [  # kd_det: the sdist has its configs in the package already\n"
    "        os.path.relpath(p, os.path.join(\"detectron2\", \"model_zoo\"))\n"
    "        for p in glob.glob(os.path.join(\"detectron2\", \"model_zoo\", \"configs\", \"**\", \"*\"),\n"
    "                           recursive=True)\n"
    "        if os.path.isfile(p)]},"
)
_PKG_RESOURCES_IMPORT = "import pkg_resources\n"
_PKG_RESOURCES_CONFIG = re.compile(r"pkg_resources\.resource_filename\(\s*\"detectron2\.model_zoo\",\s*"
                                   r"os\.path\.join\(\"configs\", config_path\)\s*\)")
_CONFIG_BESIDE_MODULE = (
    "os.path.join(os.path.dirname(os.path.abspath(__file__)), \"configs\", config_path)  # kd_det: no pkg_resources")
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
    model zoo's ``pkg_resources``) applied
    in place to a ``detectron2`` package folder: the unpacked sdist's, or an installed
    pure-Python build's, which the installer brings up to date.  Idempotent.

    Returns:
        True when a file changed.
    """
    changed = False
    for folder, _, files in os.walk(package_dir):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            with open(path) as f:
                text = f.read()
            fixed = _REMOVED_NUMPY_ALIAS.sub(r"\1", text.replace("Image.LINEAR", "Image.BILINEAR"))
            relative = os.path.relpath(path, package_dir)
            if relative == os.path.join("export", "__init__.py") and _EXPORT_CAFFE2_IMPORT_GUARDED not in fixed:
                fixed = fixed.replace(_EXPORT_CAFFE2_IMPORT, _EXPORT_CAFFE2_IMPORT_GUARDED)
            if relative == os.path.join("model_zoo", "model_zoo.py"):
                fixed = _PKG_RESOURCES_CONFIG.sub(_CONFIG_BESIDE_MODULE, fixed.replace(_PKG_RESOURCES_IMPORT, ""))
            if fixed != text:
                with open(path, "w") as f:
                    f.write(fixed)
                changed = True
    return changed


def has_cpp_ops() -> bool:
    """True when Detectron2's compiled extension (not kd_det's placeholder) is importable."""
    try:
        ext = importlib.import_module("detectron2._C")
    except ImportError:
        return False
    return not getattr(ext, "KD_DET_PLACEHOLDER", False)


def launch(main_func, num_gpus_per_machine, num_machines=1, machine_rank=0, dist_url=None, args=()):
    """
    ``detectron2.engine.launch`` that also runs several processes without GPUs.

    v0.6's worker asserts CUDA and hard-codes NCCL.  With CUDA available this calls
    Detectron2's launcher unchanged; without it, it spawns ``num_gpus_per_machine``
    CPU processes on the gloo backend and sets up Detectron2's local process group
    the same way v0.6 does.
    """
    import torch

    from detectron2.engine import launch as d2_launch

    world_size = num_machines * num_gpus_per_machine
    if torch.cuda.is_available() or world_size <= 1:
        return d2_launch(
            main_func,
            num_gpus_per_machine,
            num_machines=num_machines,
            machine_rank=machine_rank,
            dist_url=dist_url,
            args=args,
        )

    import torch.multiprocessing as mp

    from detectron2.engine.launch import _find_free_port

    if dist_url in (None, "auto"):
        if num_machines != 1:
            raise ValueError("dist_url=auto is not supported for multi-machine jobs; give tcp://HOST:PORT")
        dist_url = "tcp://127.0.0.1:{}".format(_find_free_port())
    mp.spawn(
        _cpu_worker,
        nprocs=num_gpus_per_machine,
        args=(main_func, world_size, num_gpus_per_machine, machine_rank, dist_url, args),
        daemon=False,
    )


def _cpu_worker(local_rank, main_func, world_size, num_per_machine, machine_rank, dist_url, args):
    import torch.distributed as dist

    from detectron2.utils import comm

    global_rank = machine_rank * num_per_machine + local_rank
    dist.init_process_group(backend="gloo", init_method=dist_url, world_size=world_size, rank=global_rank)
    # Detectron2's comm.get_local_rank() reads this group (same construction as v0.6).
    num_machines = world_size // num_per_machine
    for i in range(num_machines):
        ranks = list(range(i * num_per_machine, (i + 1) * num_per_machine))
        pg = dist.new_group(ranks)
        if i == machine_rank:
            comm._LOCAL_PROCESS_GROUP = pg
    comm.synchronize()
    _ddp_without_device_ids()
    main_func(*args)


def _ddp_without_device_ids():
    """
    v0.6's ``create_ddp_model`` passes ``device_ids=[local_rank]``, which PyTorch's
    DistributedDataParallel rejects for CPU modules.  In CPU worker processes only,
    make the default ``device_ids=None`` (what DDP expects on CPU).
    """
    from detectron2.engine import defaults

    create = defaults.create_ddp_model
    if getattr(create, "_kd_det_cpu", False):
        return

    def create_ddp_model(model, *, fp16_compression=False, **kwargs):
        kwargs.setdefault("device_ids", None)
        return create(model, fp16_compression=fp16_compression, **kwargs)

    create_ddp_model._kd_det_cpu = True
    defaults.create_ddp_model = create_ddp_model

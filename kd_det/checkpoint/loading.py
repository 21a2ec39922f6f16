"""
The one place where kd_det finds and reads weights: teachers, ``MODEL.WEIGHTS``, resumed
training checkpoints, released students, snapshots for the tools.

- **Where**: :func:`resolve_weights` turns a path or URL into a local file.  Plain paths are
  files; ``detectron2://``, ``https://`` and ``http://`` are fetched once by Detectron2's
  ``PathManager`` into iopath's cache.  Other kinds of weights register a scheme
  (:func:`register_weights_scheme`) instead of resolving paths of their own, and, where the
  file must be converted for the model it is loaded into, a converter
  (:func:`register_weights_converter`, used by :class:`SafeDetectionCheckpointer`).
- **Which**: a pinned SHA-256 (``KD.TEACHER.WEIGHTS_SHA256``, ``MODEL.WEIGHTS_SHA256``; a full
  digest or a prefix of at least 8 hex digits) is checked before a byte is unpickled.
- **How**: nothing read may run code.  ``.pth`` files go through
  ``torch.load(weights_only=True)``, which admits tensors and plain containers; NumPy arrays
  and dtypes are admitted besides (Detectron2 checkpoints converted from its model zoo
  hold them).  ``.pkl`` files (Detectron2's model zoo format) go through
  :mod:`kd_det.checkpoint.safe_pickle`.  A refused file raises :class:`UnsafeCheckpointError`
  naming the file, what it refers to, and the one opt-out, ``KD_DET_TRUST_PICKLE=1``
  (``--trust-pickle`` on the tools), for files one wrote oneself.
"""

import hashlib
import logging
import os
import pickle
import re
import zipfile
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.utils.file_io import PathManager

from .safe_pickle import TRUST_ENV, RefusedGlobalError
from .safe_pickle import load as load_data_pickle
from .safe_pickle import pickle_trusted

__all__ = [
    "UnsafeCheckpointError",
    "WeightsMismatchError",
    "SafeDetectionCheckpointer",
    "register_weights_scheme",
    "register_weights_converter",
    "resolve_weights",
    "file_sha256",
    "check_sha256",
    "read_checkpoint",
    "load_checkpoint",
    "incompatible_keys_problems",
    "add_trust_pickle_argument",
    "trust_pickle_from_args",
    "TRUST_ENV",
]

logger = logging.getLogger(__name__)

TRUST_HINT = (
    "If you made this file yourself and trust it, set {}=1 in the environment (or pass "
    "--trust-pickle to kd_det's tools) to read it anyway; never do so for a file you "
    "downloaded or received".format(TRUST_ENV)
)


class UnsafeCheckpointError(ValueError):
    """A checkpoint refers to Python objects other than tensors and plain data."""


class WeightsMismatchError(ValueError):
    """A weights file is not the one its pinned SHA-256 names."""


# -- where: schemes --------------------------------------------------------------------------

WeightsResolver = Callable[[str], str]
# scheme ("detectron2", "https", ...) -> function of the full URL returning a local file.
# Filled at import by this module, and by the modules of other weight kinds (a registry, like
# Detectron2's DatasetCatalog: names to functions, no other state).
_SCHEMES: Dict[str, WeightsResolver] = {}
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def register_weights_scheme(scheme: str, resolver: WeightsResolver) -> None:
    """
    Let ``scheme://...`` weights resolve through ``resolver(url) -> local file path``.
    Re-registering a scheme replaces its resolver.
    """
    _SCHEMES[scheme.lower()] = resolver


def _path_manager_file(url: str) -> str:
    return PathManager.get_local_path(url)


for _scheme in ("detectron2", "https", "http"):
    register_weights_scheme(_scheme, _path_manager_file)


def resolve_weights(path: str, what: str = "weights") -> str:
    """
    The local file of ``path``: a path as it is, or a ``scheme://`` URL resolved by its
    registered scheme (downloads are cached).  ``what`` names the setting in errors
    (e.g. ``"KD.TEACHER.WEIGHTS"``).

    Raises:
        FileNotFoundError: no such file, an unknown scheme, or a download that failed.
    """
    match = _SCHEME.match(path)
    if match is None:
        if not os.path.isfile(path):
            raise FileNotFoundError("{}={!r}: no such file".format(what, path))
        return path
    scheme = match.group(1).lower()
    if scheme not in _SCHEMES:
        raise FileNotFoundError(
            "{}={!r}: unknown scheme {}://; kd_det reads {} URLs and local paths".format(
                what, path, scheme, ", ".join(s + "://" for s in sorted(_SCHEMES))
            )
        )
    try:
        local = _SCHEMES[scheme](path)
    except Exception as e:
        raise FileNotFoundError(
            "{}={!r} could not be fetched ({}: {}). Without network access, download the file "
            "elsewhere and set {} to its local path".format(what, path, type(e).__name__, e, what)
        ) from e
    if not os.path.isfile(local):
        raise FileNotFoundError(
            "{}={!r} resolved to {!r}, which is no file".format(what, path, local)
        )
    return local


# -- what for: converters ---------------------------------------------------------------------

WeightsConverter = Callable[[str, str, torch.nn.Module], str]
# scheme -> function (url, its resolved local file, the model it is loaded into) returning the
# file to load: the same one, or a file converted for that model (e.g. torchvision:// ImageNet
# ResNets into a Detectron2 backbone, kd_det.checkpoint.torchvision_backbone).  Applied by
# SafeDetectionCheckpointer.load only, after the pin is checked on the resolved file.
_CONVERTERS: Dict[str, WeightsConverter] = {}


def register_weights_converter(scheme: str, converter: WeightsConverter) -> None:
    """
    Let weights ``scheme://...`` that :class:`SafeDetectionCheckpointer` loads go through
    ``converter(url, local_file, model) -> file to load`` first (``model``: the module the
    checkpointer loads into, unwrapped from DDP).  Re-registering a scheme replaces it.
    """
    _CONVERTERS[scheme.lower()] = converter


def converted_weights(path: str, local: str, model: torch.nn.Module) -> str:
    """The file to load into ``model`` for the weights ``path`` resolved to ``local``: the
    registered converter's result for ``path``'s scheme, else ``local``."""
    match = _SCHEME.match(path)
    converter = _CONVERTERS.get(match.group(1).lower()) if match else None
    return converter(path, local, model) if converter is not None else local


# -- which: pins -----------------------------------------------------------------------------


def file_sha256(path: str) -> str:
    """Hex SHA-256 of the file ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(local: str, expected: str, what: str = "weights", source: str = "") -> None:
    """
    Check the file ``local`` against ``expected``, a full hex SHA-256 or a prefix of at least
    8 hex digits (torch.hub's convention); empty: not pinned.  ``what`` names the pin's key
    and ``source`` the path or URL as configured, for the messages.

    Raises:
        ValueError: ``expected`` is no hex digest prefix.
        WeightsMismatchError: the file has another digest.
    """
    expected = (expected or "").strip().lower()
    if not expected:
        return
    if not re.fullmatch(r"[0-9a-f]{8,64}", expected):
        raise ValueError(
            "{}={!r} is not a SHA-256: give the file's hex digest (sha256sum FILE), in full or "
            "its first 8 or more digits".format(what, expected)
        )
    actual = file_sha256(local)
    if not actual.startswith(expected):
        raise WeightsMismatchError(
            "{} ({}) has SHA-256 {}, but {} expects {}: the file is not the one pinned (a "
            "different download, a re-trained model, or a tampered file). Nothing was loaded. "
            "Fetch the pinned file again, or update {} if the new file is intended".format(
                source or local, local, actual, what, expected, what
            )
        )


# -- how: reading without running code ---------------------------------------------------------


def _numpy_allowlist() -> List[Tuple[Any, str]]:
    # what Detectron2 checkpoints converted from its model zoo (and RNG states) hold, under
    # NumPy 1's and NumPy 2's module names
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    reconstruct, scalar = core.multiarray._reconstruct, core.multiarray.scalar
    allowed = [(np.ndarray, "numpy.ndarray"), (np.dtype, "numpy.dtype")]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [(reconstruct, module + "._reconstruct"), (scalar, module + ".scalar")]
    # NumPy 2 pickles dtypes through their classes (numpy.dtypes.Float32DType, ...)
    for name in dir(getattr(np, "dtypes", None) or object()):
        cls = getattr(np.dtypes, name)
        if isinstance(cls, type) and issubclass(cls, np.dtype):
            allowed.append((cls, "numpy.dtypes." + name))
    return allowed


def _refused_globals(local: str) -> List[str]:
    allowed = {name for _, name in _numpy_allowlist()}
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(local)
    except Exception:  # a legacy (non-zip) file: the error message names the first one
        return []
    return [n for n in names if n not in allowed]


def _refusal(local: str, names: List[str]) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        "refused to read {}: it refers to {}, which is not tensors or plain data. A checkpoint "
        "that names Python objects can run code when it is unpickled, so kd_det does not load "
        "it. {}".format(local, ", ".join(names[:5]), TRUST_HINT)
    )


def _weights_only_failure(local: str, error: Exception) -> Exception:
    # torch raises UnpicklingError both for a refused global and for a damaged file
    names = _refused_globals(local)
    if not names:
        found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", str(error))
        names = [found.group(1)] if found else []
    if names:
        return _refusal(local, names)
    reason = str(error).split("WeightsUnpickler error:")[-1].strip().split("\n")[0]
    return ValueError(
        "cannot read {} as a torch checkpoint ({}); is it complete, and a file torch.save "
        "wrote?".format(local, reason)
    )


def _is_zip(local: str) -> bool:
    return zipfile.is_zipfile(local)


def read_checkpoint(local: str) -> Any:
    """
    The object stored in the local file ``local``, read without running code: a ``.pkl``
    file (not a torch zip archive) through :mod:`~kd_det.checkpoint.safe_pickle` with
    Detectron2's ``encoding="latin1"``, anything else through ``torch.load(weights_only=True)``
    on the CPU.  ``KD_DET_TRUST_PICKLE=1`` reads both unchecked.

    Raises:
        UnsafeCheckpointError: the file refers to other Python objects.
        ValueError: the file is no checkpoint at all (truncated, another format).
    """
    trusted = pickle_trusted()
    if local.endswith(".pkl") and not _is_zip(local):
        try:
            with open(local, "rb") as f:
                return load_data_pickle(f, encoding="latin1")
        except RefusedGlobalError as e:
            raise _refusal(local, [e.name]) from None
        except Exception as e:
            raise ValueError(
                "cannot read {} as a pickle ({}: {}); is it complete?".format(
                    local, type(e).__name__, e
                )
            ) from e
    try:
        if trusted:
            return torch.load(local, map_location="cpu", weights_only=False)
        with torch.serialization.safe_globals(_numpy_allowlist()):
            return torch.load(local, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if trusted:
            raise ValueError(
                "cannot read {} as a torch checkpoint ({}); is it complete, and a file "
                "torch.save wrote?".format(local, e)
            ) from e
        raise _weights_only_failure(local, e) from None
    except Exception as e:
        raise ValueError(
            "cannot read {} as a torch checkpoint ({}: {}); is it complete?".format(
                local, type(e).__name__, e
            )
        ) from e


def _detectron2_format(data: Any, local: str) -> Dict[str, Any]:
    # the forms DetectionCheckpointer._load_file returns, from what read_checkpoint read
    if not isinstance(data, dict):
        raise ValueError(
            "{} holds a {}, not a checkpoint (a dict of weights, or one with a 'model' "
            "dict)".format(local, type(data).__name__)
        )
    if local.endswith(".pkl"):
        if "model" in data and "__author__" in data:  # Detectron2 model zoo
            return data
        if "blobs" in data:  # Detectron 1 / Caffe2 detection models
            data = data["blobs"]
        weights = {k: v for k, v in data.items() if not k.endswith("_momentum")}
        return {"model": weights, "__author__": "Caffe2", "matching_heuristics": True}
    if local.endswith(".pyth"):  # pycls
        if "model_state" not in data:
            raise ValueError("{}: pycls checkpoints must contain 'model_state'".format(local))
        state = {
            k: v for k, v in data["model_state"].items() if not k.endswith("num_batches_tracked")
        }
        return {"model": state, "__author__": "pycls", "matching_heuristics": True}
    return data if "model" in data else {"model": data}


def load_checkpoint(path: str, sha256: str = "", what: str = "weights") -> Dict[str, Any]:
    """
    Resolve ``path``, check its pin ``sha256`` and read it, in the form Detectron2's
    checkpointer loads (a dict whose ``"model"`` holds the weights).  ``what`` names the
    setting in errors.
    """
    local = resolve_weights(path, what)
    check_sha256(local, sha256, what + "_SHA256", path)
    return _detectron2_format(read_checkpoint(local), local)


def incompatible_keys_problems(incompatible, limit: int = 10) -> List[str]:
    """Lines naming the missing, unexpected and mis-shaped keys of a checkpointer's
    ``_load_model`` result (empty: the weights fit the model exactly)."""
    problems = []
    if incompatible.missing_keys:
        problems.append("missing keys: " + ", ".join(incompatible.missing_keys[:limit]))
    if incompatible.unexpected_keys:
        problems.append("unexpected keys: " + ", ".join(incompatible.unexpected_keys[:limit]))
    if incompatible.incorrect_shapes:
        problems.append(
            "shape mismatch: "
            + ", ".join(
                "{} {}->{}".format(k, tuple(a), tuple(b))
                for k, a, b in incompatible.incorrect_shapes[:limit]
            )
        )
    return problems


class SafeDetectionCheckpointer(DetectionCheckpointer):
    """
    Detectron2's checkpointer, reading through this module: paths and URLs resolve with
    :func:`resolve_weights`, pinned files are checked (:meth:`pin`), a scheme's registered
    converter makes the file fit the model (:func:`register_weights_converter`, e.g.
    ``torchvision://resnet18`` into a Detectron2 ResNet) and nothing read runs code
    (:func:`read_checkpoint`).  Loading into the model (name matching of model-zoo
    files, DDP, checkpointables) stays Detectron2's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._pins: Dict[str, Tuple[str, str, str]] = {}

    def pin(self, path: str, sha256: str, what: str = "MODEL.WEIGHTS", key: str = "") -> None:
        """
        Check the file ``path`` against ``sha256`` (see :func:`check_sha256`) whenever it is
        loaded.  ``what`` names the setting of ``path`` and ``key`` the pin's own (default:
        ``what + "_SHA256"``).
        """
        if path and sha256:
            self._pins[path] = (sha256, what, key or what + "_SHA256")

    def load(self, path: str, *args, **kwargs):
        if path:
            sha256, what, key = self._pins.get(path, ("", "weights", ""))
            local = resolve_weights(path, what)
            check_sha256(local, sha256, key, path)
            path = converted_weights(path, local, self.model)  # a registered scheme's converter
        return super().load(path, *args, **kwargs)

    def _load_file(self, filename: str) -> Dict[str, Any]:
        checkpoint = _detectron2_format(read_checkpoint(filename), filename)
        if checkpoint.get("__author__") and filename.endswith(".pkl"):
            self.logger.info("Reading a file from '{}'".format(checkpoint["__author__"]))
        return checkpoint


def add_trust_pickle_argument(parser) -> None:
    """The ``--trust-pickle`` option of kd_det's tools (see :func:`trust_pickle_from_args`)."""
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="read checkpoints without kd_det's check that they hold only tensors and data "
        "(the same as {}=1); only for files you made yourself".format(TRUST_ENV),
    )


def trust_pickle_from_args(trust: Optional[bool]) -> None:
    """
    ``--trust-pickle`` of a tool: sets ``KD_DET_TRUST_PICKLE=1`` for this process and the
    ones it starts (data workers, other ranks, the patched Detectron2's ``.pkl`` reader).
    """
    if trust:
        logger.warning(
            "--trust-pickle: checkpoints are read unchecked and may run code they contain"
        )
        os.environ[TRUST_ENV] = "1"

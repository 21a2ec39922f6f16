"""
A pickle reader that builds data and nothing else, for Detectron2's ``.pkl`` checkpoints.

A pickle names the Python objects it calls while it is read (``os.system``, ``eval``, any
class's ``__reduce__``), so a bare ``pickle.load`` of a downloaded file runs whatever it
names.  :func:`load` admits only what Detectron2's model zoo files hold: builtin containers,
strings, bytes and numbers, and NumPy arrays, scalars and dtypes (under ``numpy.core`` as
NumPy 1 wrote them and ``numpy._core`` as NumPy 2 does).  Any other name in the file stops
the read before anything is called, with :class:`RefusedGlobalError` naming it.

This module uses the standard library only (NumPy is imported on demand): the Detectron2 that
``tools/install_detectron2.py`` builds gets a copy of it, as
``detectron2/utils/_kd_det_safe_pickle.py``, so that Detectron2's own ``.pkl`` readers are
safe without importing kd_det.  Setting ``KD_DET_TRUST_PICKLE=1`` turns the check off for
files one trusts (:func:`pickle_trusted`).
"""

import _codecs
import collections
import os
import pickle

__all__ = ["RefusedGlobalError", "load", "pickle_trusted", "TRUST_ENV"]

TRUST_ENV = "KD_DET_TRUST_PICKLE"

# (module, name) -> where to find it; "numpy" entries are looked up in numpy when met
_BUILTINS = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "bytearray"): bytearray,
    ("builtins", "complex"): complex,
    ("builtins", "slice"): slice,
    ("collections", "OrderedDict"): collections.OrderedDict,
}
_NUMPY = {
    ("numpy.core.multiarray", "_reconstruct"): ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"): ("numpy.core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"): ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"): ("numpy.core.multiarray", "scalar"),
    ("numpy", "ndarray"): ("numpy", "ndarray"),
    ("numpy", "dtype"): ("numpy", "dtype"),
}
# Python 2 pickles (Detectron 1 / Caffe2 weights) name the builtins module __builtin__
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_TEXT_CODECS = ("latin1", "latin-1", "iso-8859-1", "iso8859-1")


class RefusedGlobalError(pickle.UnpicklingError):
    """A pickle names a Python object that is not plain data; ``name`` is ``module.name``."""

    def __init__(self, name: str):
        super().__init__(name)
        self.name = name


def pickle_trusted() -> bool:
    """Whether ``KD_DET_TRUST_PICKLE=1`` asks to read pickles unchecked (off by default)."""
    return os.environ.get(TRUST_ENV, "").strip().lower() in ("1", "true", "yes")


def _latin1_encode(text, encoding="latin1"):
    # Python 3 writes bytes in protocol 2 as _codecs.encode(str, "latin1"); only that codec is
    # admitted, so a file cannot reach other codecs through it
    if not isinstance(text, str) or str(encoding).lower() not in _TEXT_CODECS:
        raise RefusedGlobalError("_codecs.encode({!r})".format(encoding))
    return _codecs.encode(text, encoding)


def _numpy_object(module: str, name: str):
    import importlib

    import numpy as np

    if module == "numpy":
        return getattr(np, name)
    # numpy.core is numpy._core's alias in NumPy 2 (with a deprecation warning); use the module
    # this NumPy has
    try:
        return getattr(importlib.import_module("numpy._core.multiarray"), name)
    except ImportError:
        return getattr(importlib.import_module(module), name)


class _DataUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        module = _PY2_MODULES.get(module, module)
        if (module, name) in _BUILTINS:
            return _BUILTINS[(module, name)]
        if (module, name) == ("_codecs", "encode"):
            return _latin1_encode
        if (module, name) in _NUMPY:
            return _numpy_object(*_NUMPY[(module, name)])
        raise RefusedGlobalError("{}.{}".format(module, name))

    def persistent_load(self, pid):
        raise RefusedGlobalError("persistent id {!r}".format(pid))


def load(file, encoding: str = "latin1"):
    """
    Read one pickle from the binary file ``file`` as :func:`pickle.load` does (``encoding``
    as there: Detectron2 reads its model zoo with ``"latin1"``), admitting plain data only.
    With ``KD_DET_TRUST_PICKLE=1`` it is :func:`pickle.load` itself.

    Raises:
        RefusedGlobalError: the file names an object that is not plain data.
    """
    if pickle_trusted():
        return pickle.load(file, encoding=encoding)
    return _DataUnpickler(file, encoding=encoding).load()

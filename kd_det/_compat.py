"""
kd_det's one place for warnings of third-party code at import time.

Imported first by ``kd_det/__init__.py`` (and so before Detectron2 by every tool that imports
kd_det first). Each entry names the library, the warning and why it is silenced; nothing is
filtered globally: the import that warns runs once, here, inside ``warnings.catch_warnings``,
and later imports find the module in ``sys.modules`` and do not warn again. The same warning
from any other caller (e.g. a user's own ``torch.jit.script``, or ``tools/export_student.py
--torchscript``) is still shown.

- fvcore (via Detectron2's ``detectron2.layers``): ``fvcore/nn/focal_loss.py`` calls
  ``torch.jit.script`` on two functions when it is imported, and PyTorch 2.14 deprecates
  ``torch.jit.script`` with a ``FutureWarning`` ("`torch.jit.script` is deprecated. Please
  switch to `torch.compile` or `torch.export`."), several per process. kd_det does not use
  the scripted functions; the warning is fvcore's to fix, not the user's.
- Detectron2 v0.6: ``detectron2/modeling/box_regression.py`` decorates ``Box2BoxTransform``
  and ``Box2BoxTransformRotated`` with ``@torch.jit.script`` at import: the same warning, twice.
"""

import importlib
import warnings

__all__ = ["import_quietly"]

# (module to import, message regex, category): the import-time warnings silenced above
_IMPORT_TIME_WARNINGS = (
    ("fvcore.nn", r"`torch\.jit\.script` is deprecated", FutureWarning),
    ("detectron2.modeling.box_regression", r"`torch\.jit\.script` is deprecated", FutureWarning),
)


def import_quietly() -> None:
    """Import the modules of ``_IMPORT_TIME_WARNINGS`` with only their listed warning silenced."""
    for module, message, category in _IMPORT_TIME_WARNINGS:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=message, category=category)
            try:
                importlib.import_module(module)
            except ImportError:  # not installed: whoever needs it reports that
                pass


import_quietly()

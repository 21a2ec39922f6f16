"""
Weights from torchvision's registry, as ``torchvision://NAME`` in any weights setting.

``NAME`` is a model name of torchvision (``resnet18``, ``fasterrcnn_resnet50_fpn_v2``: its
default weights) or a weights name (``ResNet50_Weights.IMAGENET1K_V2``).  The file is the one
torchvision itself downloads, fetched once into torch's hub cache
(``$TORCH_HOME/hub/checkpoints``), with the SHA-256 prefix torchvision puts in its file name
checked.  A file already there (copied by hand onto an offline machine) is used as it is.

The resolved file holds torchvision's own state dict.  What it is loaded into decides how its
keys are read (a Detectron2 backbone converts them; a torchvision teacher takes them as they
are); this module only says where the file is and which weights it holds.
"""

import os
import re
from typing import Any

import torch

from .loading import register_weights_scheme

__all__ = ["SCHEME", "torchvision_weights", "torchvision_weights_file", "is_torchvision_url"]

SCHEME = "torchvision://"
# torchvision names its files <name>-<first hex digits of the SHA-256>.pth (torch.hub's rule)
_HASH_IN_NAME = re.compile(r"-([a-f0-9]{6,})\.")


def is_torchvision_url(path: str) -> bool:
    return path.lower().startswith(SCHEME)


def torchvision_weights(name: str) -> Any:
    """
    The ``torchvision.models.WeightsEnum`` member that ``name`` names: a weights name
    (``ResNet18_Weights.IMAGENET1K_V1``) or a model name, whose default weights are taken.
    ``name`` may carry the ``torchvision://`` prefix.

    Raises:
        ValueError naming the fix when torchvision knows no such model or weights.
    """
    from torchvision.models import get_model_weights, get_weight, list_models

    if is_torchvision_url(name):
        name = name[len(SCHEME) :]
    if "." in name:
        try:
            return get_weight(name)
        except Exception as e:
            raise ValueError(
                "torchvision has no weights {!r} ({}); write them as <Enum>.<member>, e.g. "
                "ResNet50_Weights.IMAGENET1K_V2, or give a model name".format(name, e)
            ) from e
    try:
        weights = get_model_weights(name)
    except Exception as e:
        raise ValueError(
            "torchvision has no model {!r}; its detection models are {}, its classification "
            "models include {}".format(
                name,
                ", ".join(list_models(module=_detection_module())),
                ", ".join(m for m in list_models() if m.startswith("resnet")),
            )
        ) from e
    return weights.DEFAULT


def _detection_module():
    import torchvision.models.detection as detection

    return detection


def torchvision_weights_file(name: str) -> str:
    """
    The local file of torchvision's weights ``name`` (see :func:`torchvision_weights`):
    found in torch's hub cache, or downloaded there once with its hash prefix checked.

    Raises:
        FileNotFoundError naming where to put the file when the download fails.
    """
    weights = torchvision_weights(name)
    url = weights.url
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    local = os.path.join(folder, os.path.basename(url))
    if os.path.isfile(local):
        return local
    os.makedirs(folder, exist_ok=True)
    match = _HASH_IN_NAME.search(os.path.basename(url))
    try:
        # torch.hub writes to a temporary file and renames it: a broken download leaves nothing
        torch.hub.download_url_to_file(
            url, local, hash_prefix=match.group(1) if match else None, progress=False
        )
    except Exception as e:
        raise FileNotFoundError(
            "torchvision weights {} could not be downloaded from {} ({}: {}). Without network "
            "access, download that file elsewhere and copy it to {}".format(
                weights, url, type(e).__name__, e, local
            )
        ) from e
    return local


register_weights_scheme("torchvision", torchvision_weights_file)

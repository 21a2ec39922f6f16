"""
torchvision's ImageNet ResNets (R-18/34/50/101/152) as Detectron2 backbone checkpoints.

- :func:`convert_resnet_state_dict`: torchvision's state dict -> Detectron2 ``ResNet`` names::

      conv1.weight                        -> stem.conv1.weight
      bn1.{weight,bias,running_*}          -> stem.conv1.norm.*
      layer{i}.{j}.conv{k}.weight          -> res{i+1}.{j}.conv{k}.weight
      layer{i}.{j}.bn{k}.*                 -> res{i+1}.{j}.conv{k}.norm.*
      layer{i}.{j}.downsample.0.weight     -> res{i+1}.{j}.shortcut.weight
      layer{i}.{j}.downsample.1.*          -> res{i+1}.{j}.shortcut.norm.*
      fc.*, *.num_batches_tracked          -> dropped

  BasicBlock (R-18/34: conv1, conv2) and BottleneckBlock (R-50 and deeper: conv1..conv3) map
  alike.  The names are relative to the ResNet; the checkpoint says ``matching_heuristics``,
  so Detectron2's loader finds them under ``backbone.bottom_up.`` (FPN) or ``backbone.`` (C4)
  by suffix, as it does for its own ImageNet ``.pkl`` files.
- :func:`torchvision_resnet_input`: what such weights expect of the model: RGB, torchvision's
  ImageNet mean/std on a 0-255 scale, the stride in the 3x3 conv (``STRIDE_IN_1X1 False``).
- ``torchvision://resnet18`` (and the other ResNets) in ``MODEL.WEIGHTS``: the converter
  registered for the scheme (:func:`kd_det.checkpoint.loading.register_weights_converter`)
  checks the model against those settings, converts the downloaded file once and caches the
  result beside it, named by the download's SHA-256.  Models without a Detectron2 ResNet (a
  torchvision teacher) load the file unchanged; other torchvision weights into a Detectron2
  ResNet are refused.
"""

import os
import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from .atomic import atomic_write_bytes
from .loading import file_sha256, read_checkpoint, register_weights_converter
from .torchvision_weights import torchvision_weights

__all__ = [
    "TorchvisionInput",
    "convert_resnet_state_dict",
    "detectron2_backbone_checkpoint",
    "torchvision_resnet_input",
    "check_student_input",
    "input_problems",
    "converted_backbone_file",
]

# torchvision weights enum class -> ResNet depth
_DEPTHS = {"ResNet{}_Weights".format(d): d for d in (18, 34, 50, 101, 152)}
# blocks per stage res2..res5 (Detectron2's build_resnet_backbone; torchvision's resnet*)
_STAGE_BLOCKS = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 6, 3),
    101: (3, 4, 23, 3),
    152: (3, 8, 36, 3),
}
# bumped when the conversion changes: cached files of an older one are not reused
_FORMAT = "d2v1"


def _res(m: re.Match) -> str:
    """Detectron2's ``res{i+1}.{j}`` for torchvision's ``layer{i}.{j}``."""
    return "res{}.{}".format(int(m["layer"]) + 1, m["block"])


_BLOCK = r"layer(?P<layer>[1-4])\.(?P<block>\d+)\."
# torchvision name (full match) -> Detectron2 ResNet name; the module docstring's table
_RULES: Sequence[Tuple[re.Pattern, Callable[[re.Match], str]]] = tuple(
    (re.compile(pattern), rename)
    for pattern, rename in (
        (r"conv1\.weight", lambda m: "stem.conv1.weight"),
        (r"bn1\.(?P<p>\w+)", lambda m: "stem.conv1.norm." + m["p"]),
        (_BLOCK + r"conv(?P<k>\d)\.weight", lambda m: _res(m) + ".conv{}.weight".format(m["k"])),
        (
            _BLOCK + r"bn(?P<k>\d)\.(?P<p>\w+)",
            lambda m: _res(m) + ".conv{k}.norm.{p}".format(**m.groupdict()),
        ),
        (_BLOCK + r"downsample\.0\.weight", lambda m: _res(m) + ".shortcut.weight"),
        (_BLOCK + r"downsample\.1\.(?P<p>\w+)", lambda m: _res(m) + ".shortcut.norm." + m["p"]),
    )
)


def _detectron2_name(key: str) -> Optional[str]:
    """The Detectron2 ResNet name of torchvision's ``key``; None: dropped (fc, BN counters)."""
    if key.startswith("fc.") or key.endswith("num_batches_tracked"):
        return None
    for pattern, rename in _RULES:
        m = pattern.fullmatch(key)
        if m:
            return rename(m)
    raise ValueError(
        "{!r} is no key of a torchvision ResNet (conv1, bn1, layer1..4, fc): only torchvision's "
        "resnet18/34/50/101/152 state dicts convert".format(key)
    )


def convert_resnet_state_dict(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """
    Detectron2 ``ResNet`` weights (names relative to the ResNet, see the module docstring)
    from a torchvision ResNet ``state`` dict; the tensors are the same objects.

    Raises:
        ValueError naming the key when ``state`` is not a torchvision ResNet's.
    """
    out = {}
    for key, value in state.items():
        name = _detectron2_name(key)
        if name is not None:
            out[name] = value
    if "stem.conv1.weight" not in out:
        raise ValueError("no conv1.weight: not a torchvision ResNet state dict")
    return out


def detectron2_backbone_checkpoint(state: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """
    The checkpoint Detectron2's ``DetectionCheckpointer`` loads into any model with a ResNet
    backbone: ``{"model": converted weights, "__author__": "torchvision",
    "matching_heuristics": True}`` (plain tensors: ``torch.load(weights_only=True)`` reads it).
    """
    return {
        "model": convert_resnet_state_dict(state),
        "__author__": "torchvision",
        "matching_heuristics": True,
    }


@dataclass(frozen=True)
class TorchvisionInput:
    """What a model must do for torchvision's ImageNet ResNet weights to fit it."""

    depth: int
    input_format: str  # "RGB"
    pixel_mean: Tuple[float, ...]  # (3,), 0-255 scale, RGB order
    pixel_std: Tuple[float, ...]  # (3,)
    stride_in_1x1: bool  # False: torchvision strides in the 3x3 conv (ResNet "v1.5")


def torchvision_resnet_input(name: str) -> Optional[TorchvisionInput]:
    """
    The settings torchvision's weights ``name`` (a model or weights name, with or without
    ``torchvision://``) imply for a Detectron2 ResNet; None when they are not an ImageNet ResNet.
    """
    weights = torchvision_weights(name)
    depth = _DEPTHS.get(type(weights).__name__)
    if depth is None:
        return None
    transform = weights.transforms()  # torchvision's ImageClassification: [0, 1] mean/std
    return TorchvisionInput(
        depth=depth,
        input_format="RGB",
        pixel_mean=tuple(round(255.0 * v, 4) for v in transform.mean),
        pixel_std=tuple(round(255.0 * v, 4) for v in transform.std),
        stride_in_1x1=False,
    )


def _resnets(model: torch.nn.Module) -> List[torch.nn.Module]:
    from detectron2.modeling.backbone import ResNet

    return [m for m in model.modules() if isinstance(m, ResNet)]


def _model_depth(resnet: torch.nn.Module, expected: int) -> Optional[int]:
    """The depth of Detectron2 ``resnet`` (stages may be cut after its last output), judged
    against ``expected``: ``expected`` if it fits, else the first depth that does, else None."""
    from detectron2.modeling.backbone.resnet import BottleneckBlock

    blocks = tuple(len(s) for s in resnet.stages)
    bottleneck = isinstance(resnet.stages[0][0], BottleneckBlock)
    for depth in [expected] + sorted(_STAGE_BLOCKS):
        if (depth >= 50) == bottleneck and _STAGE_BLOCKS[depth][: len(blocks)] == blocks:
            return depth
    return None


def _stride_in_1x1(resnet: torch.nn.Module) -> Optional[bool]:
    from detectron2.modeling.backbone.resnet import BottleneckBlock

    for stage in resnet.stages[1:]:
        block = stage[0]
        if isinstance(block, BottleneckBlock):
            return tuple(block.conv1.stride) != (1, 1)
    return None


def input_problems(
    expected: TorchvisionInput,
    depth: Optional[int],
    input_format: Optional[str],
    pixel_mean: Optional[Sequence[float]],
    pixel_std: Optional[Sequence[float]],
    stride_in_1x1: Optional[bool],
) -> List[str]:
    """
    "KEY: value to set (now: value)" for each setting of a model that differs from
    ``expected`` (an argument None: not known, not checked).  Means and stds compare to 1e-3.
    """

    def differs(a, b):
        return len(a) != len(b) or any(abs(float(x) - y) > 1e-3 for x, y in zip(a, b))

    problems = []
    if depth is not None and depth != expected.depth:
        problems.append("MODEL.RESNETS.DEPTH: {} (now {})".format(expected.depth, depth))
    if input_format is not None and input_format != expected.input_format:
        problems.append("INPUT.FORMAT: {!r} (now {!r})".format(expected.input_format, input_format))
    for key, want, have in (
        ("MODEL.PIXEL_MEAN", expected.pixel_mean, pixel_mean),
        ("MODEL.PIXEL_STD", expected.pixel_std, pixel_std),
    ):
        if have is not None and differs(have, want):
            problems.append(
                "{}: {} (now {})".format(key, list(want), [round(float(v), 4) for v in have])
            )
    if stride_in_1x1 is not None and stride_in_1x1 != expected.stride_in_1x1:
        problems.append(
            "MODEL.RESNETS.STRIDE_IN_1X1: {} (now {})".format(expected.stride_in_1x1, stride_in_1x1)
        )
    return problems


def check_student_input(model: torch.nn.Module, expected: TorchvisionInput, source: str) -> None:
    """
    Refuse to load the weights ``source`` (as configured, for the message) into ``model``
    when its ResNet depth, input channel order, pixel normalisation or stride placement
    (read from the built model: ``input_format``, ``pixel_mean``/``pixel_std``, its one
    Detectron2 ResNet) differ from ``expected``.

    Raises:
        ValueError naming every key to change and its value (yacs keys; a LazyConfig sets
        the same on ``model.input_format``, ``model.pixel_mean``/``pixel_std``,
        ``model.backbone.bottom_up.stages.depth`` / ``stride_in_1x1``).
    """
    resnets = _resnets(model)
    if len(resnets) != 1:
        raise ValueError(
            "{} holds a torchvision ResNet, but the model has {} Detectron2 ResNet backbones: "
            "give the weights to a model with one".format(source, len(resnets))
        )
    mean, std = getattr(model, "pixel_mean", None), getattr(model, "pixel_std", None)
    problems = input_problems(
        expected,
        depth=_model_depth(resnets[0], expected.depth),
        input_format=getattr(model, "input_format", None),
        pixel_mean=mean.flatten().tolist() if mean is not None else None,
        pixel_std=std.flatten().tolist() if std is not None else None,
        stride_in_1x1=_stride_in_1x1(resnets[0]),
    )
    if problems:
        raise ValueError(
            "MODEL.WEIGHTS={!r} is torchvision's ImageNet ResNet-{}, trained on RGB images "
            "normalised with torchvision's mean/std and strided in the 3x3 conv; the model "
            "differs. Set {} (LazyConfig: model.input_format, model.pixel_mean/pixel_std, "
            "model.backbone.bottom_up.stages.depth/stride_in_1x1)".format(
                source, expected.depth, "; ".join(problems)
            )
        )


def converted_backbone_file(local: str) -> str:
    """
    The Detectron2 backbone checkpoint of the torchvision ResNet file ``local``, written once
    beside it as ``<name>.<format>-<first 16 hex digits of its SHA-256>.pth`` (atomically: a
    concurrent worker or a killed process leaves no partial file) and reused after.
    """
    stem = os.path.splitext(local)[0]
    target = "{}.{}-{}.pth".format(stem, _FORMAT, file_sha256(local)[:16])
    if not os.path.isfile(target):
        checkpoint = detectron2_backbone_checkpoint(read_checkpoint(local))
        atomic_write_bytes(target, lambda f: torch.save(checkpoint, f))
    return target


def _torchvision_converter(url: str, local: str, model: torch.nn.Module) -> str:
    """The ``torchvision://`` converter: into a model with a Detectron2 ResNet, ImageNet ResNets
    are checked and converted (other weights refused); into other models the file loads as it is."""
    if not _resnets(model):  # e.g. a torchvision teacher: its own state dict, as it is
        return local
    expected = torchvision_resnet_input(url)
    if expected is None:
        raise ValueError(
            "{} is not torchvision's ImageNet ResNet, so it does not convert to the model's "
            "Detectron2 ResNet backbone; use torchvision://resnet18 (or resnet34, resnet50, "
            "resnet101, resnet152)".format(url)
        )
    check_student_input(model, expected, url)
    return converted_backbone_file(local)


register_weights_converter("torchvision", _torchvision_converter)

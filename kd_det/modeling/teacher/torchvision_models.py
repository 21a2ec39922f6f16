"""
Small torchvision detectors that kd_det names itself (torchvision's registry has no ResNet-18
detectors): torchvision's own classes (FasterRCNN, RetinaNet, FCOS) on a ResNet-18 FPN, with
anchors and input sizes for small images.  ``torchvision://NAME`` looks ``NAME`` up here
first, then in torchvision's registry (:func:`build_torchvision_detector`).
"""

from typing import Sequence

import torch
from detectron2.utils.registry import Registry
from torch import nn

__all__ = ["TORCHVISION_DETECTOR_REGISTRY", "build_torchvision_detector"]

TORCHVISION_DETECTOR_REGISTRY = Registry("TORCHVISION_DETECTOR")
TORCHVISION_DETECTOR_REGISTRY.__doc__ = """
kd_det's torchvision detectors by name: f(num_classes=..., **kwargs) -> a torchvision detector.
"""

#: anchor sizes per level for small images (objects of 6-52 px in 128 px images), P2/P3 up
SMALL_SIZES = (8, 16, 32, 64, 128)
#: FPN width of kd_det's small detectors (the synthetic Detectron2 teachers' too)
FPN_CHANNELS = 128


def _resnet18_fpn(p6p7: bool, out_channels: int = FPN_CHANNELS) -> nn.Module:
    """
    torchvision's ResNet-18 under torchvision's FPN (``BackboneWithFPN``), BatchNorm trained
    (no pretrained weights), ``out_channels`` wide: P2-P6 ('0'-'3', 'pool'), or P3-P7 ('0'-'2',
    'p6', 'p7') with ``p6p7``.
    """
    from torchvision.models import resnet18
    from torchvision.models.detection.backbone_utils import BackboneWithFPN
    from torchvision.ops.feature_pyramid_network import LastLevelMaxPool, LastLevelP6P7

    stages = [2, 3, 4] if p6p7 else [1, 2, 3, 4]
    return BackboneWithFPN(
        resnet18(weights=None, norm_layer=nn.BatchNorm2d),
        return_layers={"layer{}".format(k): str(i) for i, k in enumerate(stages)},
        in_channels_list=[64 * 2 ** (k - 1) for k in stages],
        out_channels=out_channels,
        extra_blocks=LastLevelP6P7(out_channels, out_channels) if p6p7 else LastLevelMaxPool(),
    )


@TORCHVISION_DETECTOR_REGISTRY.register()
def fasterrcnn_resnet18_fpn(
    *,
    num_classes: int,
    min_size: int = 128,
    max_size: int = 256,
    anchor_sizes: Sequence[float] = SMALL_SIZES,
    fpn_channels: int = FPN_CHANNELS,
    **kwargs
) -> nn.Module:
    """
    torchvision's FasterRCNN on a ResNet-18 FPN; one anchor size per level P2-P6, and CPU-sized
    RoI settings for images of a few objects (as kd_det's synthetic Faster R-CNN configs): 600/300
    proposals, 64 sampled RoIs per image, a 256-wide box head.
    """
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead

    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    settings = dict(
        rpn_pre_nms_top_n_train=600,
        rpn_post_nms_top_n_train=300,
        rpn_pre_nms_top_n_test=300,
        rpn_post_nms_top_n_test=150,
        box_batch_size_per_image=64,
        box_detections_per_img=50,
    )
    settings.update(kwargs)
    return FasterRCNN(
        _resnet18_fpn(False, fpn_channels),
        num_classes=None,
        min_size=min_size,
        max_size=max_size,
        rpn_anchor_generator=anchors,
        box_head=TwoMLPHead(fpn_channels * 7 * 7, 256),
        box_predictor=FastRCNNPredictor(256, num_classes),
        **settings
    )


def _three_scales(sizes: Sequence[float]):
    # x, x * 2^(1/3), x * 2^(2/3): Detectron2's RetinaNet sizes (torchvision's builders
    # truncate the last two to integers)
    return tuple((x, x * 2 ** (1.0 / 3), x * 2 ** (2.0 / 3)) for x in sizes)


@TORCHVISION_DETECTOR_REGISTRY.register()
def retinanet_resnet18_fpn(
    *,
    num_classes: int,
    min_size: int = 128,
    max_size: int = 256,
    anchor_sizes: Sequence[float] = SMALL_SIZES,
    **kwargs
) -> nn.Module:
    """torchvision's RetinaNet on a ResNet-18 FPN (P3-P7), 9 anchors per position."""
    fpn_channels = kwargs.pop("fpn_channels", FPN_CHANNELS)
    from torchvision.models.detection import RetinaNet
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    anchors = AnchorGenerator(_three_scales(anchor_sizes), ((0.5, 1.0, 2.0),) * 5)
    return RetinaNet(
        _resnet18_fpn(True, fpn_channels),
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        anchor_generator=anchors,
        **kwargs
    )


@TORCHVISION_DETECTOR_REGISTRY.register()
def fcos_resnet18_fpn(
    *,
    num_classes: int,
    min_size: int = 128,
    max_size: int = 256,
    anchor_sizes: Sequence[float] = SMALL_SIZES,
    **kwargs
) -> nn.Module:
    """torchvision's FCOS (anchor-free) on a ResNet-18 FPN (P3-P7)."""
    fpn_channels = kwargs.pop("fpn_channels", FPN_CHANNELS)
    from torchvision.models.detection import FCOS
    from torchvision.models.detection.anchor_utils import AnchorGenerator

    anchors = AnchorGenerator(tuple((s,) for s in anchor_sizes), ((1.0,),) * 5)
    return FCOS(
        _resnet18_fpn(True, fpn_channels),
        num_classes=num_classes,
        min_size=min_size,
        max_size=max_size,
        anchor_generator=anchors,
        **kwargs
    )


def build_torchvision_detector(name: str, num_classes: int, **kwargs) -> torch.nn.Module:
    """
    The torchvision detector ``name`` with random weights: one of kd_det's
    (:data:`TORCHVISION_DETECTOR_REGISTRY`) or of torchvision's registry, built with
    ``weights=None, weights_backbone=None`` (weights are loaded afterwards).

    Raises:
        ValueError naming the known detectors, or the builder's complaint about ``kwargs``.
    """
    from torchvision.models import detection, get_model, list_models

    if name in TORCHVISION_DETECTOR_REGISTRY:
        build = TORCHVISION_DETECTOR_REGISTRY.get(name)
        args = dict(kwargs, num_classes=num_classes)
    elif name in list_models(module=detection):
        build = get_model
        args = dict(kwargs, name=name, weights=None, weights_backbone=None, num_classes=num_classes)
    else:
        raise ValueError(
            "KD.TEACHER.CONFIG torchvision://{}: no such torchvision detector; torchvision's are "
            "{}; kd_det's {}".format(
                name,
                ", ".join(list_models(module=detection)),
                ", ".join(k for k, _ in TORCHVISION_DETECTOR_REGISTRY),
            )
        )
    try:
        return build(**args)
    except TypeError as e:
        raise ValueError(
            "torchvision detector {} does not take the arguments KD.TEACHER.OPTS gives ({}): "
            "{}".format(name, sorted(kwargs), e)
        ) from e

#!/usr/bin/env python
"""
Convert torchvision's ImageNet ResNet (18/34/50/101/152) weights to a Detectron2 backbone
checkpoint (a ``.pth`` of plain tensors with ``matching_heuristics``, which Detectron2's own
``DetectionCheckpointer`` and kd_det load into any ResNet backbone, FPN or C4).

    tools/convert_torchvision_backbone.py torchvision://resnet18 R-18.pth
    tools/convert_torchvision_backbone.py ~/Downloads/resnet50-11ad3fa6.pth R-50-tv.pth

``MODEL.WEIGHTS torchvision://resnet18`` does the same on first use, so this tool is only
needed for a file to carry elsewhere (e.g. to vanilla Detectron2). Models loading the result
need the input settings the tool prints (RGB, torchvision's normalisation, STRIDE_IN_1X1 False).
"""

import argparse

import torch

from kd_det.checkpoint import read_checkpoint, resolve_weights
from kd_det.checkpoint.torchvision_backbone import (
    TorchvisionInput,
    detectron2_backbone_checkpoint,
    torchvision_resnet_input,
)

# (blocks in res2..res5, bottleneck blocks) -> depth
_DEPTH_OF = {(8, False): 18, (16, False): 34, (16, True): 50, (33, True): 101, (50, True): 152}


def _settings(source: str, depth: int) -> TorchvisionInput:
    if source.startswith("torchvision://"):
        return torchvision_resnet_input(source)
    return torchvision_resnet_input("ResNet{}_Weights.IMAGENET1K_V1".format(depth))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="torchvision://resnet50, or a torchvision ResNet .pth")
    parser.add_argument("output", help="the Detectron2 checkpoint to write (.pth)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pth"):
        parser.error("the output must be a .pth file (Detectron2 reads .pkl files as Caffe2's)")
    state = read_checkpoint(resolve_weights(args.source, "source"))  # runs no code
    checkpoint = detectron2_backbone_checkpoint(state)
    weights = checkpoint["model"]
    blocks = {k.split(".")[0] + "." + k.split(".")[1] for k in weights if k.startswith("res")}
    depth = _DEPTH_OF.get((len(blocks), "res2.0.conv3.weight" in weights))
    if depth is None:
        parser.error("{} is no torchvision ResNet-18/34/50/101/152".format(args.source))
    torch.save(checkpoint, args.output)
    s = _settings(args.source, depth)
    print("wrote {}: ResNet-{}, {} tensors".format(args.output, depth, len(weights)))
    print(
        "load it with MODEL.RESNETS.DEPTH {} INPUT.FORMAT {} MODEL.PIXEL_MEAN {} "
        "MODEL.PIXEL_STD {}{}".format(
            depth,
            s.input_format,
            list(s.pixel_mean),
            list(s.pixel_std),
            (
                " MODEL.RESNETS.STRIDE_IN_1X1 False"
                if depth >= 50
                else " MODEL.RESNETS.RES2_OUT_CHANNELS 64"
            ),
        )
    )


if __name__ == "__main__":
    main()

# ssim_faster_rcnn_R50_to_R18.yaml as a Detectron2 LazyConfig: SSIM feature distillation
# on the synthetic data, R-50-FPN teacher -> R-18-FPN-64 student, trained with
#   tools/lazyconfig_train_net.py --config-file configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py
# The student is the yaml's model (same weights layout), its data and schedule those of the
# teacher's LazyConfig; the teacher is the yaml one (train it first:
#   tools/train_net.py --config-file configs/synthetic/faster_rcnn_R_50_FPN.yaml).
# The distillation settings are `kd`, keyed as the yacs KD node; override one with e.g.
# model.kd.FEATURE.WEIGHT=1.0
import copy

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling import ResNet

from kd_det.modeling.lazy_student import lazy_distilled_model

from ..faster_rcnn_R_50_FPN_lazy import dataloader, lr_multiplier, optimizer, train
from ..faster_rcnn_R_50_FPN_lazy import model as _teacher

STUDENT_FPN_CHANNELS = 64

# the teacher's architecture with an R-18 and a 64-channel FPN (the yaml's RESNETS.DEPTH 18,
# RES2_OUT_CHANNELS 64, FPN.OUT_CHANNELS 64)
_student = copy.deepcopy(_teacher)
_student.backbone.bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="BN")
_student.backbone.out_channels = STUDENT_FPN_CHANNELS
_student.proposal_generator.head.in_channels = STUDENT_FPN_CHANNELS
_student.roi_heads.box_head.input_shape = ShapeSpec(channels=STUDENT_FPN_CHANNELS, height=7, width=7)

model = lazy_distilled_model(
    _student,
    kd={
        "TEACHER": {
            "CONFIG": "configs/synthetic/faster_rcnn_R_50_FPN.yaml",
            "WEIGHTS": "./output/synthetic/faster_rcnn_R_50_FPN/model_final.pth",
        },
        # SSIM-KD's lambda = 2 on the sum of the per-level losses over the FPN levels (as the yaml)
        "FEATURE": {"LOSS": "SSIMFeatureLoss", "LEVEL_REDUCTION": "sum", "WEIGHT": 2.0},
    },
    train_datasets="${dataloader.train.dataset.names}",  # for KD.TEACHER.CHECK_CLASSES
)

train.output_dir = "./output/synthetic/ssim_faster_rcnn_R50_to_R18_lazy"

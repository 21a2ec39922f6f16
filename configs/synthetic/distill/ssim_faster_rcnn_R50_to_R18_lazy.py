# ssim_faster_rcnn_R50_to_R18.yaml as a Detectron2 LazyConfig: SSIM feature distillation
# on the synthetic data, R-50-FPN teacher -> R-18-FPN-64 student, trained with
#   tools/lazyconfig_train_net.py \
#       --config-file configs/synthetic/distill/ssim_faster_rcnn_R50_to_R18_lazy.py
# The student is the yaml's model (same weights layout), its data and schedule those of the
# teacher's LazyConfig; the teacher is the yaml one (train it first:
#   tools/train_net.py --config-file configs/synthetic/faster_rcnn_R_50_FPN.yaml).
# The distillation is composed directly, as Detectron2's projects do: the student's LazyCall
# retargeted to DistillGeneralizedRCNN, with the teacher and the feature distiller as its
# arguments. Override them by name, e.g. model.feature_distiller.weight=1.0 or
# model.teacher.weights=/path/to/teacher.pth; train.teacher_eval.enabled=True scores the
# teacher before the first step (yacs KD.TEACHER.EVAL_BEFORE_TRAIN, min_ap: MIN_AP).
import copy

from detectron2.config import LazyCall as L
from detectron2.layers import ShapeSpec
from detectron2.modeling import ResNet

from kd_det.data.classes import thing_classes
from kd_det.losses import SSIMFeatureLoss
from kd_det.modeling import DistillGeneralizedRCNN, FeatureDistiller, build_teacher

from ..faster_rcnn_R_50_FPN_lazy import dataloader, lr_multiplier
from ..faster_rcnn_R_50_FPN_lazy import model as _teacher
from ..faster_rcnn_R_50_FPN_lazy import optimizer, train

STUDENT_FPN_CHANNELS = 64

# the teacher's architecture with an R-18 and a 64-channel FPN (the yaml's RESNETS.DEPTH 18,
# RES2_OUT_CHANNELS 64, FPN.OUT_CHANNELS 64)
model = copy.deepcopy(_teacher)
model.backbone.bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="BN")
model.backbone.out_channels = STUDENT_FPN_CHANNELS
model.proposal_generator.head.in_channels = STUDENT_FPN_CHANNELS
model.roi_heads.box_head.input_shape = ShapeSpec(channels=STUDENT_FPN_CHANNELS, height=7, width=7)

# Distillation: arguments after the student's own, as the yacs twin builds them (student,
# teacher, adapters: the same random initialisation).
model._target_ = DistillGeneralizedRCNN
model.teacher = L(build_teacher)(
    config="configs/synthetic/faster_rcnn_R_50_FPN.yaml",
    weights="./output/synthetic/faster_rcnn_R_50_FPN/model_final.pth",
    # the teacher must have been trained on the student's classes (yacs KD.TEACHER.CHECK_CLASSES)
    expected_classes=L(thing_classes)(names="${dataloader.train.dataset.names}"),
)
model.feature_distiller = L(FeatureDistiller)(
    levels=["p2", "p3", "p4", "p5", "p6"],
    student_channels="${..backbone.out_channels}",
    teacher_channels=128,  # the R-50-FPN-128 teacher's: 1x1 adapters 64 -> 128
    loss=L(SSIMFeatureLoss)(),
    # SSIM-KD's lambda = 2 on the sum of the per-level losses over the FPN levels (as the yaml)
    weight=2.0,
    level_reduction="sum",
)

train.teacher_eval = dict(enabled=False, min_ap=0.0)
train.output_dir = "./output/synthetic/ssim_faster_rcnn_R50_to_R18_lazy"

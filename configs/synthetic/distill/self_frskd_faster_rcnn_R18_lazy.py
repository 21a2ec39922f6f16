# self_frskd_faster_rcnn_R18.yaml as a Detectron2 LazyConfig: teacher-free self-distillation
# (FRSKD) of the R-18-FPN Faster R-CNN student on the synthetic data, trained with
#   tools/lazyconfig_train_net.py \
#       --config-file configs/synthetic/distill/self_frskd_faster_rcnn_R18_lazy.py
# A BiFPN self-teacher refines the student's P2-P6; its RPN and ROI heads are copies of the
# student's (initialised on their own); the student imitates the refined maps (attention transfer).
import copy

from detectron2.config import LazyCall as L

from kd_det.config.student import student_model_call
from kd_det.losses import AttentionTransferLoss
from kd_det.modeling import BiFPNSelfTeacher, FeatureDistiller, SelfDistillGeneralizedRCNN

from ..faster_rcnn_R_50_FPN_lazy import dataloader, lr_multiplier, optimizer, train
from .ssim_faster_rcnn_R50_to_R18_lazy import model as _ssim_student

LEVELS = ["p2", "p3", "p4", "p5", "p6"]  # the levels its RPN and ROI heads read

# the R-18-FPN-64 student of the SSIM config, without its teacher
model = student_model_call(_ssim_student)
# in the yacs twin's order: the student, the self-teacher, its feature target, its heads
model._target_ = SelfDistillGeneralizedRCNN
model.self_teacher = L(BiFPNSelfTeacher)(
    in_features=LEVELS,
    input_shapes="${..backbone.out_channels}",  # the student's FPN channels, every level
    width="${..backbone.out_channels}",  # KD.SELF.WIDTH_MULTIPLIER 1.0: the copied heads fit
    norm="GN",
)
model.feature_distiller = L(FeatureDistiller)(
    levels=LEVELS,
    student_channels="${..backbone.out_channels}",
    teacher_channels="${..self_teacher.width}",
    loss=L(AttentionTransferLoss)(),
    weight=1.0,
)
model.self_proposal_generator = copy.deepcopy(model.proposal_generator)
model.self_roi_heads = copy.deepcopy(model.roi_heads)

train.output_dir = "./output/synthetic/self_frskd_faster_rcnn_R18_lazy"

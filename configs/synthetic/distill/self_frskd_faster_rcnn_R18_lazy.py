# self_frskd_faster_rcnn_R18.yaml as a Detectron2 LazyConfig: teacher-free self-distillation
# (FRSKD) of the R-18-FPN Faster R-CNN student on the synthetic data, trained with
#   tools/lazyconfig_train_net.py --config-file configs/synthetic/distill/self_frskd_faster_rcnn_R18_lazy.py
# A BiFPN self-teacher refines the student's P2-P6; its RPN and ROI heads are copies of the
# student's (initialised on their own); the student imitates the refined maps (attention transfer).
from kd_det.modeling.lazy_student import lazy_self_distilled_model, lazy_student_model

from ..faster_rcnn_R_50_FPN_lazy import dataloader, lr_multiplier, optimizer, train
from .ssim_faster_rcnn_R50_to_R18_lazy import model as _ssim_student

model = lazy_self_distilled_model(
    lazy_student_model(_ssim_student),  # the R-18-FPN-64 student of the SSIM config, without its teacher
    kd={"FEATURE": {"LOSS": "AttentionTransferLoss", "WEIGHT": 1.0}},
)

train.output_dir = "./output/synthetic/self_frskd_faster_rcnn_R18_lazy"

# rm_pfi_retinanet_R101_to_R18_1x.yaml as a Detectron2 LazyConfig, built on Detectron2's own
# model-zoo LazyConfig COCO-Detection/retinanet_R_50_FPN_1x.py (its COCO data, SGD at 0.01, 1x
# schedule): Rank Mimicking + Prediction-guided Feature Imitation from the published R-101-FPN 3x
# RetinaNet (40.4 box AP) to an R-18-FPN student.
#   tools/lazyconfig_train_net.py \
#       --config-file configs/COCO-Distillation/rm_pfi_retinanet_R101_to_R18_1x_lazy.py \
#       --num-gpus 8
# train.init_checkpoint: torchvision's ImageNet R-18 (torchvision://resnet18, fetched into torch's
# hub cache and converted on first use; hence RGB input and torchvision's normalisation below).
# The teacher's weights are fetched once into iopath's cache ($FVCORE_CACHE); offline, download
# the file and set model.teacher.weights to it. The distillation is composed directly: the
# student's LazyCall retargeted to DistillRetinaNet, its teacher and distillers as arguments
# (override them by name, e.g. model.prediction_distiller.rm_weight=2.0).
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling import ResNet

from kd_det.data.classes import thing_classes
from kd_det.evaluation import has_cpp_ops
from kd_det.losses import L2FeatureLoss, RankMimickingLoss
from kd_det.modeling import (
    DensePredictionDistiller,
    DistillRetinaNet,
    FeatureDistiller,
    build_teacher,
)

_zoo = model_zoo.get_config("COCO-Detection/retinanet_R_50_FPN_1x.py")
dataloader = _zoo.dataloader
optimizer = _zoo.optimizer
lr_multiplier = _zoo.lr_multiplier
train = _zoo.train

# the model zoo's R-50 RetinaNet with an R-18 (BasicBlocks: res5 has 512 channels, which P6 reads)
model = _zoo.model
model.backbone.bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="FrozenBN")
model.backbone.top_block.in_channels = 512
model.pixel_mean = [123.675, 116.280, 103.530]
model.pixel_std = [58.395, 57.120, 57.375]
model.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"  # the test mapper follows it

# Distillation, after the student's own arguments (the yacs twin's construction order)
model._target_ = DistillRetinaNet
model.teacher = L(build_teacher)(
    config=model_zoo.get_config_file("COCO-Detection/retinanet_R_101_FPN_3x.yaml"),
    weights="detectron2://COCO-Detection/retinanet_R_101_FPN_3x/190397697/model_final_971ab9.pkl",
    expected_classes=L(thing_classes)(names="${dataloader.train.dataset.names}"),
)
# PFI: L2 imitation weighted per position by the teacher-student class-logit difference
model.feature_distiller = L(FeatureDistiller)(
    levels=["p3", "p4", "p5", "p6", "p7"],
    student_channels="${..backbone.out_channels}",
    teacher_channels=256,  # the R-101-FPN teacher's
    loss=L(L2FeatureLoss)(),
    weight=1.0,
    level_reduction="mean",
    adapter="conv1x1",
)
model.prediction_distiller = L(DensePredictionDistiller)(
    num_classes="${..num_classes}",
    rm_loss=L(RankMimickingLoss)(temperature=1.0),
    rm_weight=4.0,
)
model.pfi = True

# the teacher's own AP on the test set first (teacher/bbox/AP); below 35 it was not loaded right
train.teacher_eval = dict(enabled=True, min_ap=35.0)
# the fast C++ COCOeval only where Detectron2's extension is built (not in a pure-Python install)
dataloader.evaluator.use_fast_impl = has_cpp_ops()
train.init_checkpoint = "torchvision://resnet18"
train.output_dir = "./output/coco/rm_pfi_retinanet_R101_to_R18_1x_lazy"

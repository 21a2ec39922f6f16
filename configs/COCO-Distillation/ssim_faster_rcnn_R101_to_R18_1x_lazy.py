# ssim_faster_rcnn_R101_to_R18_1x.yaml as a Detectron2 LazyConfig, built on Detectron2's own
# model-zoo LazyConfigs (common/models/mask_rcnn_fpn.py without its mask head, common/data/coco.py,
# common/optim.py's SGD at 0.02, the 1x schedule): SSIM feature distillation from the published
# R-101-FPN 3x Faster R-CNN (42.0 box AP) to an R-18-FPN student.
#   tools/lazyconfig_train_net.py \
#       --config-file configs/COCO-Distillation/ssim_faster_rcnn_R101_to_R18_1x_lazy.py \
#       --num-gpus 8
# train.init_checkpoint: torchvision's ImageNet R-18 (torchvision://resnet18, fetched into torch's
# hub cache and converted on first use; hence RGB input and torchvision's normalisation below).
# The teacher's weights are fetched once into iopath's cache ($FVCORE_CACHE); offline, download
# the file and set model.teacher.weights to it. The distillation is composed directly: the
# student's LazyCall retargeted to DistillGeneralizedRCNN, its teacher and feature distiller as
# arguments (override them by name, e.g. model.feature_distiller.weight=4.0).
from detectron2 import model_zoo
from detectron2.config import LazyCall as L
from detectron2.modeling import ResNet

from kd_det.data.classes import thing_classes
from kd_det.evaluation import has_cpp_ops
from kd_det.losses import SSIMFeatureLoss
from kd_det.modeling import DistillGeneralizedRCNN, FeatureDistiller, build_teacher

dataloader = model_zoo.get_config("common/data/coco.py").dataloader
optimizer = model_zoo.get_config("common/optim.py").SGD
lr_multiplier = model_zoo.get_config("common/coco_schedule.py").lr_multiplier_1x
train = model_zoo.get_config("common/train.py").train

# Faster R-CNN: the model zoo's Mask R-CNN FPN without its mask branch, with an R-18
model = model_zoo.get_config("common/models/mask_rcnn_fpn.py").model
model.roi_heads.mask_in_features = None
del model.roi_heads.mask_pooler
del model.roi_heads.mask_head
model.backbone.bottom_up.stages = L(ResNet.make_default_stages)(depth=18, norm="FrozenBN")
model.backbone.bottom_up.freeze_at = 2  # stem and res2 frozen, as the model zoo's *_1x.py set it
model.pixel_mean = [123.675, 116.280, 103.530]
model.pixel_std = [58.395, 57.120, 57.375]
model.input_format = "RGB"
dataloader.train.mapper.image_format = "RGB"  # the test mapper follows it
dataloader.train.mapper.use_instance_mask = False

# Distillation, after the student's own arguments (the yacs twin's construction order)
model._target_ = DistillGeneralizedRCNN
model.teacher = L(build_teacher)(
    config=model_zoo.get_config_file("COCO-Detection/faster_rcnn_R_101_FPN_3x.yaml"),
    weights="detectron2://COCO-Detection/faster_rcnn_R_101_FPN_3x/137851257/model_final_f6e8b1.pkl",
    expected_classes=L(thing_classes)(names="${dataloader.train.dataset.names}"),
)
model.feature_distiller = L(FeatureDistiller)(
    levels=["p2", "p3", "p4", "p5", "p6"],
    student_channels="${..backbone.out_channels}",
    teacher_channels=256,  # the R-101-FPN teacher's
    loss=L(SSIMFeatureLoss)(),
    # SSIM-KD's convention: lambda (2 to 4 in the paper) times the sum over FPN levels
    weight=2.0,
    level_reduction="sum",
    adapter="conv1x1",
)

# the teacher's own AP on the test set first (teacher/bbox/AP); below 35 it was not loaded right
train.teacher_eval = dict(enabled=True, min_ap=35.0)
# the fast C++ COCOeval only where Detectron2's extension is built (not in a pure-Python install)
dataloader.evaluator.use_fast_impl = has_cpp_ops()
train.init_checkpoint = "torchvision://resnet18"
train.output_dir = "./output/coco/ssim_faster_rcnn_R101_to_R18_1x_lazy"

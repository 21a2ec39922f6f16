# The synthetic-data teacher of faster_rcnn_R_50_FPN.yaml written as a Detectron2 LazyConfig,
# the form of Detectron2's newer configs (configs/new_baselines, ViTDet). KD.TEACHER.CONFIG
# takes either form; weights trained from the .yaml load into this model unchanged.
#
# kd_det reads from a LazyConfig teacher: `model` (instantiated, then loaded from
# KD.TEACHER.WEIGHTS), and from `dataloader`, when present: the test resize
# (ResizeShortestEdge in dataloader.test.mapper.augmentations; used to evaluate the teacher)
# and the training sets' names (dataloader.train.dataset.names; KD.TEACHER.CHECK_CLASSES).
# With its training keys (optimizer, lr_multiplier, train: the yaml's SOLVER) it also trains:
#   tools/lazyconfig_train_net.py --config-file configs/synthetic/faster_rcnn_R_50_FPN_lazy.py
import detectron2.data.transforms as T
from detectron2.config import LazyCall as L
from detectron2.data import (
    DatasetMapper,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.evaluation import COCOEvaluator
from detectron2.layers import ShapeSpec
from detectron2.modeling import FPN, GeneralizedRCNN, ResNet, StandardROIHeads
from detectron2.modeling.anchor_generator import DefaultAnchorGenerator
from detectron2.modeling.backbone.fpn import LastLevelMaxPool
from detectron2.modeling.backbone.resnet import BasicStem
from detectron2.modeling.box_regression import Box2BoxTransform
from detectron2.modeling.matcher import Matcher
from detectron2.modeling.poolers import ROIPooler
from detectron2.modeling.proposal_generator import RPN, StandardRPNHead
from detectron2.modeling.roi_heads import FastRCNNConvFCHead, FastRCNNOutputLayers
from detectron2.solver import WarmupParamScheduler
from detectron2.solver.build import get_default_optimizer_params
from fvcore.common.param_scheduler import MultiStepParamScheduler

from kd_det.engine.lazy import clipped_optimizer
from kd_det.evaluation import has_cpp_ops

FPN_CHANNELS = 128
NUM_CLASSES = 5

model = L(GeneralizedRCNN)(
    backbone=L(FPN)(
        bottom_up=L(ResNet)(
            stem=L(BasicStem)(in_channels=3, out_channels=64, norm="BN"),
            # Detectron2's yacs default (RESNETS.STRIDE_IN_1X1: True, MSRA-style blocks)
            stages=L(ResNet.make_default_stages)(depth=50, stride_in_1x1=True, norm="BN"),
            out_features=["res2", "res3", "res4", "res5"],
            freeze_at=0,
        ),
        in_features=["res2", "res3", "res4", "res5"],
        out_channels=FPN_CHANNELS,
        top_block=L(LastLevelMaxPool)(),
    ),
    proposal_generator=L(RPN)(
        in_features=["p2", "p3", "p4", "p5", "p6"],
        head=L(StandardRPNHead)(in_channels=FPN_CHANNELS, num_anchors=3),
        anchor_generator=L(DefaultAnchorGenerator)(
            sizes=[[8], [16], [32], [64], [128]],
            aspect_ratios=[0.5, 1.0, 2.0],
            strides=[4, 8, 16, 32, 64],
            offset=0.0,
        ),
        anchor_matcher=L(Matcher)(
            thresholds=[0.3, 0.7], labels=[0, -1, 1], allow_low_quality_matches=True
        ),
        box2box_transform=L(Box2BoxTransform)(weights=[1.0, 1.0, 1.0, 1.0]),
        batch_size_per_image=256,
        positive_fraction=0.5,
        pre_nms_topk=(600, 300),
        post_nms_topk=(300, 150),
        nms_thresh=0.7,
    ),
    roi_heads=L(StandardROIHeads)(
        num_classes=NUM_CLASSES,
        batch_size_per_image=64,
        positive_fraction=0.25,
        proposal_matcher=L(Matcher)(
            thresholds=[0.5], labels=[0, 1], allow_low_quality_matches=False
        ),
        box_in_features=["p2", "p3", "p4", "p5"],
        box_pooler=L(ROIPooler)(
            output_size=7,
            scales=[1.0 / 4, 1.0 / 8, 1.0 / 16, 1.0 / 32],
            sampling_ratio=0,
            pooler_type="ROIAlignV2",
        ),
        box_head=L(FastRCNNConvFCHead)(
            input_shape=ShapeSpec(channels=FPN_CHANNELS, height=7, width=7),
            conv_dims=[],
            fc_dims=[256, 256],
        ),
        box_predictor=L(FastRCNNOutputLayers)(
            input_shape=ShapeSpec(channels=256),
            box2box_transform=L(Box2BoxTransform)(weights=[10.0, 10.0, 5.0, 5.0]),
            num_classes=NUM_CLASSES,
            test_score_thresh=0.05,
            test_nms_thresh=0.5,
            test_topk_per_image=50,
        ),
    ),
    pixel_mean=[103.530, 116.280, 123.675],
    pixel_std=[1.0, 1.0, 1.0],
    input_format="BGR",
)

dataloader = dict(
    train=L(build_detection_train_loader)(
        dataset=L(get_detection_dataset_dicts)(names="kd_synthetic_train"),
        mapper=L(DatasetMapper)(
            is_train=True,
            augmentations=[
                L(T.ResizeShortestEdge)(
                    short_edge_length=(128,), max_size=256, sample_style="choice"
                ),
                L(T.RandomFlip)(horizontal=True),
            ],
            image_format="BGR",
            use_instance_mask=False,
        ),
        total_batch_size=8,
        num_workers=0,
    ),
    test=L(build_detection_test_loader)(
        dataset=L(get_detection_dataset_dicts)(names="kd_synthetic_val", filter_empty=False),
        mapper=L(DatasetMapper)(
            is_train=False,
            augmentations=[L(T.ResizeShortestEdge)(short_edge_length=128, max_size=256)],
            image_format="BGR",
        ),
        num_workers=0,
    ),
)
dataloader["evaluator"] = L(COCOEvaluator)(
    dataset_name="${..test.dataset.names}", use_fast_impl=has_cpp_ops(), output_dir=None
)

# The yaml's SOLVER (Base-synthetic-RCNN.yaml): from scratch, AdamW 1e-3 with weight decay 0.05
# (none on norm layers), each parameter's gradient clipped to norm 5, warmup 20 iterations,
# LR x0.1 at 120 and 140 of 150 (as in Detectron2's LazyConfig schedules, fractions of
# train.max_iter: overriding it scales the warmup and the steps).
MAX_ITER = 150
optimizer = L(clipped_optimizer)(
    optimizer_class="torch.optim.AdamW",
    params=L(get_default_optimizer_params)(weight_decay_norm=0.0),
    lr=1e-3,
    weight_decay=0.05,
    clip_type="norm",
    clip_value=5.0,
)
lr_multiplier = L(WarmupParamScheduler)(
    scheduler=L(MultiStepParamScheduler)(
        values=[1.0, 0.1, 0.01], milestones=[120, 140], num_updates=MAX_ITER
    ),
    warmup_length=20 / MAX_ITER,
    warmup_factor=0.001,
)
train = dict(
    output_dir="./output/synthetic/faster_rcnn_R_50_FPN_lazy",
    init_checkpoint="",
    max_iter=MAX_ITER,
    amp=dict(enabled=False),
    ddp=dict(broadcast_buffers=False, find_unused_parameters=False, fp16_compression=False),
    checkpointer=dict(period=100, max_to_keep=100),
    eval_period=0,  # evaluated once, at the end
    log_period=20,
    device="cpu",
    seed=1,
)

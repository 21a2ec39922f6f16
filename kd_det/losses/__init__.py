"""Distillation losses: each a class in DISTILL_LOSS_REGISTRY (see .registry), beside its maths."""

from .attention import NonDirectionalAttentionLoss, non_directional_attention
from .box import (
    BOX_LOSS_TYPES,
    CROSSKD_CLASS_MODES,
    BoxDistillLoss,
    BoxLoss,
    CrossKDClassLoss,
    box_distill_loss,
    crosskd_class_loss,
    giou_distance,
)
from .feature import (
    FEATURE_LOSS_REGISTRY,
    AttentionTransferLoss,
    CWDFeatureLoss,
    FeatureLoss,
    L1FeatureLoss,
    L2FeatureLoss,
    MGDFeatureLoss,
    PKDFeatureLoss,
    SSIMFeatureLoss,
    build_feature_loss,
    l1_feature_loss,
    l2_feature_loss,
    ssim_feature_loss,
    standardize_batch_channels,
    standardize_channels,
)
from .prediction import (
    PredictionLoss,
    RankMimickingLoss,
    SoftLabelKDLoss,
    SoftmaxKDLoss,
    prediction_difference_weights,
    rank_mimicking_loss,
    soft_label_kd_loss,
    softmax_kd_loss,
)
from .registry import (
    DISTILL_LOSS_REGISTRY,
    DistillLoss,
    build_distill_loss,
    distill_loss_class,
    loss_names,
)
from .ssim import gaussian_window_1d, minmax_normalize, ssim_map
from .statistics import (
    AdaINHeadLoss,
    ChannelStatisticsLoss,
    adain,
    channel_statistics,
    channel_statistics_loss,
    head_output_loss,
)

__all__ = [k for k in globals().keys() if not k.startswith("_")]

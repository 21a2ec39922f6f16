"""Distillation losses."""

from .feature import (
    AttentionTransferLoss,
    FEATURE_LOSS_REGISTRY,
    FeatureLoss,
    L1FeatureLoss,
    L2FeatureLoss,
    SSIMFeatureLoss,
    build_feature_loss,
    l1_feature_loss,
    l2_feature_loss,
    ssim_feature_loss,
    standardize_channels,
)
from .statistics import adain, channel_statistics, channel_statistics_loss, head_output_loss
from .ssim import gaussian_window_1d, minmax_normalize, ssim_map

__all__ = [k for k in globals().keys() if not k.startswith("_")]

"""Feature imitation losses between student and teacher feature pyramids.

Every loss compares lists of per-level (N, C, H, W) tensors and reduces them the
same way: a mean over images, channels and positions of each level, then a
weighted mean over levels.  They are the :class:`FeatureLoss` entries of
:data:`~kd_det.losses.DISTILL_LOSS_REGISTRY`, chosen by ``cfg.KD.FEATURE.LOSS`` (the class
name).
"""

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from detectron2.config import configurable

from .precision import at_least_fp32, full_precision
from .registry import DISTILL_LOSS_REGISTRY, DistillLoss, distill_loss_class, loss_names
from .ssim import FULL_SSIM, check_exponents, minmax_normalize, ssim_map

__all__ = [
    "FEATURE_LOSS_REGISTRY",
    "FeatureLoss",
    "SSIMFeatureLoss",
    "L2FeatureLoss",
    "L1FeatureLoss",
    "AttentionTransferLoss",
    "CWDFeatureLoss",
    "MGDFeatureLoss",
    "PKDFeatureLoss",
    "build_feature_loss",
    "ssim_feature_loss",
    "l2_feature_loss",
    "l1_feature_loss",
    "standardize_channels",
    "standardize_batch_channels",
]


class _FeatureLossRegistry:
    """
    The feature losses of :data:`DISTILL_LOSS_REGISTRY`, under the name code written for
    kd_det's earlier feature-loss registry uses (``@DISTILL_LOSS_REGISTRY.register()``):
    registering here registers there; a loss that is not a :class:`FeatureLoss` is refused.
    """

    def register(self, obj=None):
        def check(cls):
            if not (isinstance(cls, type) and issubclass(cls, FeatureLoss)):
                raise TypeError(
                    "FEATURE_LOSS_REGISTRY holds feature losses (FeatureLoss "
                    "subclasses), not {!r}; register other distillation losses with "
                    "DISTILL_LOSS_REGISTRY".format(cls)
                )
            return DISTILL_LOSS_REGISTRY.register(cls)

        return check if obj is None else check(obj)

    def get(self, name: str):
        return distill_loss_class(name, FeatureLoss, "KD.FEATURE.LOSS")

    def __contains__(self, name: str) -> bool:
        return name in loss_names(FeatureLoss)

    def __iter__(self):
        return ((k, cls) for k, cls in DISTILL_LOSS_REGISTRY if issubclass(cls, FeatureLoss))


#: the feature losses of DISTILL_LOSS_REGISTRY (an alias kept for code that registers with it)
FEATURE_LOSS_REGISTRY = _FeatureLossRegistry()


def _center_crop(weight: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Crop (N, H, W) to (N, height, width) around the centre (valid-window losses shrink maps)."""
    top = (weight.shape[-2] - height) // 2
    left = (weight.shape[-1] - width) // 2
    return weight[..., top : top + height, left : left + width]


class FeatureLoss(DistillLoss):
    """
    Base class of the feature losses: subclasses define :meth:`loss_map`; this class
    reduces it.  Called as ``loss(student, teacher, level_weights=..., position_weights=...)``
    on per-level lists (see :meth:`__call__`).

    A loss object holds no parameters and no state; it is a plain callable.
    """

    #: suffix of the loss-dict key, ``loss_kd_<short_name>``
    short_name = "feat"
    kind = "feature"
    #: whether student and teacher must have the same channels (else an adapter is needed)
    needs_equal_channels = True
    #: whether the student's features reach the loss through a generator (MGD's masked
    #: generation block, :class:`~kd_det.modeling.distillers.connectors.MaskedGenerator`); the
    #: distiller owns that module, the loss stays parameter-free
    needs_generator = False

    def loss_map(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student, teacher: (N, C, H, W) features of one level.
        Returns:
            (N, C, H', W') per-element loss (H' <= H, W' <= W).
        """
        raise NotImplementedError

    def level_loss(
        self,
        student: torch.Tensor,
        teacher: torch.Tensor,
        position_weight: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Scalar loss of one level: the mean of :meth:`loss_map`, or, with
        ``position_weight`` (N, H, W), the mean over channels of
        sum(weight * loss) / sum(weight) over positions of the whole batch.
        At least float32, autocast or not (:mod:`.precision`).
        """
        with full_precision(student):
            lmap = self.loss_map(at_least_fp32(student), at_least_fp32(teacher))
            if position_weight is None:
                return lmap.mean()
            w = _center_crop(
                at_least_fp32(position_weight), lmap.shape[-2], lmap.shape[-1]
            ).unsqueeze(1)
            return (lmap * w).sum() / (w.sum() * lmap.shape[1]).clamp_min(1e-12)

    def __call__(
        self,
        student: Sequence[torch.Tensor],
        teacher: Sequence[torch.Tensor],
        level_weights: Optional[Sequence[float]] = None,
        position_weights: Optional[Sequence[torch.Tensor]] = None,
    ) -> torch.Tensor:
        """
        Args:
            student, teacher: per-level (N, C, H, W) tensors; the teacher's are
                treated as constants.
            level_weights: one weight per level; None means a plain mean.
            position_weights: optional per-level (N, H, W) spatial weights.
        Returns:
            scalar tensor.
        """
        if len(student) != len(teacher) or len(student) == 0:
            raise ValueError(
                "feature loss needs the same non-zero number of student and teacher "
                "levels, got {} and {}".format(len(student), len(teacher))
            )
        if level_weights is None or len(level_weights) == 0:
            level_weights = [1.0 / len(student)] * len(student)
        if len(level_weights) != len(student):
            raise ValueError(
                "KD.FEATURE.LEVEL_WEIGHTS has {} entries for {} levels".format(
                    len(level_weights), len(student)
                )
            )
        total = at_least_fp32(student[0].new_zeros(()))
        for i, (s, t) in enumerate(zip(student, teacher)):
            compared = slice(None) if self.needs_equal_channels else slice(-2, None)
            if s.shape[compared] != t.shape[compared] or s.shape[0] != t.shape[0]:
                raise ValueError(
                    "student and teacher features differ in shape at level {}: {} vs {}; "
                    "use an adapter (KD.FEATURE.ADAPTER) for channels and the same input size "
                    "and strides for H, W".format(i, tuple(s.shape), tuple(t.shape))
                )
            pw = None if position_weights is None else position_weights[i]
            total = total + level_weights[i] * self.level_loss(s, t.detach(), pw)
        return total


@DISTILL_LOSS_REGISTRY.register()
class SSIMFeatureLoss(FeatureLoss):
    """
    (1 - SSIM) / 2 per position (bounded in [0, 1], as in the published SSIM-KD code).

    Stability constants: SSIM's C1 = (K1 L)^2, C2 = (K2 L)^2 assume values in a
    known range L.  FPN features are unbounded, so by default
    (``normalize="minmax"``) each (image, channel) map of student and teacher is
    rescaled to [0, 1] first and L = 1, as the paper does.  With
    ``normalize="none"`` raw features are compared and L is the value range of the
    teacher's map (a constant per map), which keeps C1, C2 at the same relative
    size whatever the feature scale.

    ``exponents`` (alpha, beta, gamma) weigh the luminance, contrast and structure
    terms, SSIM = l^alpha c^beta s^gamma, for the paper's ablations of its
    components: (0, 0, 1) imitates structure alone.  The fused kernel computes the
    full SSIM only; other exponents run in PyTorch.
    """

    short_name = "ssim"

    @configurable
    def __init__(
        self,
        *,
        window_size=11,
        sigma=1.5,
        k1=0.01,
        k2=0.03,
        normalize="minmax",
        impl="auto",
        exponents=FULL_SSIM
    ):
        if normalize not in ("minmax", "none"):
            raise ValueError(
                "KD.SSIM.NORMALIZE must be 'minmax' or 'none', got {!r}".format(normalize)
            )
        if impl not in ("auto", "torch", "triton"):
            raise ValueError(
                "KD.SSIM.IMPL must be 'auto', 'torch' or 'triton', got {!r}".format(impl)
            )
        self.exponents = check_exponents(exponents)
        if impl == "triton" and self.exponents != FULL_SSIM:
            raise ValueError(
                "KD.SSIM.IMPL 'triton' (the fused kernel) computes the full SSIM only, but "
                "KD.SSIM.EXPONENTS is {}; set KD.SSIM.IMPL to 'auto' or 'torch'".format(
                    list(self.exponents)
                )
            )
        self.window_size = window_size
        self.sigma = sigma
        self.k1 = k1
        self.k2 = k2
        self.normalize = normalize
        self.impl = impl

    @classmethod
    def from_config(cls, cfg):
        return {
            "window_size": cfg.KD.SSIM.WINDOW_SIZE,
            "sigma": cfg.KD.SSIM.SIGMA,
            "k1": cfg.KD.SSIM.K1,
            "k2": cfg.KD.SSIM.K2,
            "normalize": cfg.KD.SSIM.NORMALIZE,
            "impl": cfg.KD.SSIM.IMPL,
            "exponents": cfg.KD.SSIM.EXPONENTS,
        }

    def _constants(self, teacher: torch.Tensor):
        if self.normalize == "minmax":
            return self.k1**2, self.k2**2
        flat = teacher.detach().flatten(2)
        value_range = (flat.amax(dim=2) - flat.amin(dim=2)).clamp_min(1e-6)[..., None, None]
        return (self.k1 * value_range) ** 2, (self.k2 * value_range) ** 2

    def loss_map(self, student, teacher):
        if self.normalize == "minmax":
            student, teacher = minmax_normalize(student), minmax_normalize(teacher)
        c1, c2 = self._constants(teacher)
        return (
            1.0 - ssim_map(student, teacher, self.window_size, self.sigma, c1, c2, self.exponents)
        ) / 2.0

    def level_loss(self, student, teacher, position_weight=None):
        if (
            position_weight is None
            and self.exponents == FULL_SSIM
            and _use_fused_ssim(self.impl, student)
        ):
            from .ssim_triton import fused_ssim_feature_loss

            return fused_ssim_feature_loss(
                student, teacher, self.window_size, self.sigma, self.k1, self.k2, self.normalize
            )
        return super().level_loss(student, teacher, position_weight)


def _use_fused_ssim(impl: str, x: torch.Tensor) -> bool:
    if impl == "torch":
        return False
    from . import ssim_triton

    available = x.is_cuda and ssim_triton.is_available()
    if impl == "triton" and not available:
        raise RuntimeError(
            "KD.SSIM.IMPL='triton' needs CUDA tensors and an importable Triton; "
            "set KD.SSIM.IMPL to 'auto' or 'torch'"
        )
    return available


def standardize_channels(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """
    Zero mean, unit variance for every (n, c) map of an (N, C, H, W) tensor. Differentiable.
    The standard deviation is clamped at ``eps`` (not offset by it), so the result does not
    depend on the feature scale except for near-constant maps.  The clamp comes before the
    square root: a constant map (every 1x1 level) then has a zero, not a NaN, gradient.
    """
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.var(dim=(2, 3), keepdim=True, unbiased=False).clamp_min(eps * eps).sqrt()
    return (x - mean) / std


def standardize_batch_channels(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """
    Zero mean, unit variance for every channel of an (N, C, H, W) tensor over the whole batch
    (its N * H * W values), as PKD (Cao et al., 2022) normalises.  Unlike
    :func:`standardize_channels` (each image's map alone), differences of scale and offset
    between the images of a batch survive.  The same biased variance and ``eps`` clamp as
    there, so the two agree for a batch of one image.
    """
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    std = x.var(dim=(0, 2, 3), keepdim=True, unbiased=False).clamp_min(eps * eps).sqrt()
    return (x - mean) / std


# How the lp losses may rescale each (image, channel) map before comparing (KD.FEATURE.NORMALIZE).
# Raw FPN features of different networks differ in scale by orders of magnitude, so a raw
# L2 loss's size (and the weight it needs) depends on the teacher; both options make it scale-free.
#   "minmax": to [0, 1], the normalisation of SSIM-KD (lp vs SSIM then differ only in the loss
#     form);
#   "channel": zero mean and unit variance (as in PKD, Cao et al. 2022: MSE then equals
#     2 (1 - Pearson r)).
LP_NORMALIZATIONS = {
    "none": lambda x: x,
    "minmax": minmax_normalize,
    "channel": standardize_channels,
}


class _LpFeatureLoss(FeatureLoss):
    """An elementwise lp loss, optionally on normalised maps (``KD.FEATURE.NORMALIZE``)."""

    @configurable
    def __init__(self, *, normalize: str = "none"):
        if normalize not in LP_NORMALIZATIONS:
            raise ValueError(
                "KD.FEATURE.NORMALIZE must be one of {}, got {!r}".format(
                    sorted(LP_NORMALIZATIONS), normalize
                )
            )
        self.normalize = normalize

    @classmethod
    def from_config(cls, cfg):
        return {"normalize": cfg.KD.FEATURE.NORMALIZE}

    def loss_map(self, student, teacher):
        norm = LP_NORMALIZATIONS[self.normalize]
        return self.elementwise(norm(student), norm(teacher))

    def elementwise(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


@DISTILL_LOSS_REGISTRY.register()
class L2FeatureLoss(_LpFeatureLoss):
    """Mean squared difference (the lp-norm imitation baseline)."""

    short_name = "l2"

    def elementwise(self, student, teacher):
        return F.mse_loss(student, teacher, reduction="none")


@DISTILL_LOSS_REGISTRY.register()
class L1FeatureLoss(_LpFeatureLoss):
    """Mean absolute difference."""

    short_name = "l1"

    def elementwise(self, student, teacher):
        return F.l1_loss(student, teacher, reduction="none")


@DISTILL_LOSS_REGISTRY.register()
class AttentionTransferLoss(FeatureLoss):
    """
    Attention transfer (Zagoruyko & Komodakis, 2017; the imitation loss of FRSKD):
    the spatial attention map A = mean over channels of F^2, L2-normalised per image
    to Q = A / ||A||, compared as ||Q_s - Q_t||^2 (summed over positions, so the
    value lies in [0, 4] whatever the map size).  Channel counts may differ, so no
    adapter is needed.
    """

    short_name = "at"
    needs_equal_channels = False

    @configurable
    def __init__(self):
        """No settings: ``AttentionTransferLoss()``, or ``AttentionTransferLoss(cfg)``."""

    @classmethod
    def from_config(cls, cfg):
        return {}

    @staticmethod
    def attention(x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, 1, H, W) attention map with unit L2 norm per image."""
        a = x.pow(2).mean(dim=1, keepdim=True)
        return a / a.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None, None]

    def loss_map(self, student, teacher):
        h, w = student.shape[-2:]
        # times H*W: the mean over positions (the base class's reduction) is then the sum
        return (self.attention(student) - self.attention(teacher)).pow(2) * (h * w)


@DISTILL_LOSS_REGISTRY.register()
class CWDFeatureLoss(FeatureLoss):
    """
    Channel-wise distillation (CWD; Shu et al., ICCV 2021): each (image, channel) map becomes
    a distribution over its H * W positions, softmax(x / T), and the student's is pulled to
    the teacher's by KL(teacher || student), summed over positions, averaged over images
    and channels and multiplied by T^2 (which keeps the gradient's size roughly independent of
    T, as in Hinton et al.'s KD):

        T^2 / (N C) * sum_{n, c, i} p_t(i) (log p_t(i) - log p_s(i)),   p = softmax(x / T)

    per level, as mmrazor's ``ChannelWiseDivergence``.  Its value does not depend on the
    features' offset (softmax is shift-invariant), but it does on their scale through T.
    """

    short_name = "cwd"

    @configurable
    def __init__(self, *, temperature: float = 1.0):
        if not temperature > 0:
            raise ValueError("KD.CWD.TEMPERATURE must be > 0, got {}".format(temperature))
        self.temperature = float(temperature)

    @classmethod
    def from_config(cls, cfg):
        return {"temperature": cfg.KD.CWD.TEMPERATURE}

    def loss_map(self, student, teacher):
        n, c, h, w = student.shape
        t = self.temperature
        log_s = F.log_softmax(student.reshape(n, c, h * w) / t, dim=2)
        log_t = F.log_softmax(teacher.reshape(n, c, h * w) / t, dim=2)
        # p_t (log p_t - log p_s) per position; times H * W so that the base class's mean
        # over positions is the sum over them (the KL of each map)
        kl = F.kl_div(log_s, log_t, reduction="none", log_target=True)
        return (kl * (t * t * h * w)).reshape(n, c, h, w)


@DISTILL_LOSS_REGISTRY.register()
class MGDFeatureLoss(FeatureLoss):
    """
    Masked generative distillation (MGD; Yang et al., ECCV 2022): the squared error between
    the teacher's feature and the one the student's masked feature *generates*, summed over
    channels and positions and averaged over images (mmrazor's ``MGDLoss``; its alpha is
    ``KD.FEATURE.WEIGHT``):

        1 / N * sum_{n, c, h, w} (G(M * f_s) - f_t)^2

    The random spatial mask M and the generation block G (conv3x3-ReLU-conv3x3) have
    parameters and randomness, so they are not part of this loss: the distiller owns them
    (:class:`~kd_det.modeling.distillers.connectors.MaskedGenerator`, under its ``kd_``
    prefix, dropped at export) and hands this loss the generated features as "student".
    """

    short_name = "mgd"
    needs_generator = True

    @configurable
    def __init__(self):
        """No settings (the mask and the block are the distiller's: ``KD.MGD``)."""

    @classmethod
    def from_config(cls, cfg):
        return {}

    def loss_map(self, student, teacher):
        c, h, w = student.shape[1:]
        # times C * H * W: the base class's mean over (N, C, H, W) is then the sum over N
        return F.mse_loss(student, teacher, reduction="none") * (c * h * w)


@DISTILL_LOSS_REGISTRY.register()
class PKDFeatureLoss(FeatureLoss):
    """
    PKD (Cao et al., NeurIPS 2022): each channel of student and teacher standardised over the
    whole batch (:func:`standardize_batch_channels`: zero mean, unit variance over N, H, W),
    then half the mean squared difference, which is 1 - r for the Pearson correlation r of
    the two channels' values over the batch, averaged over channels:

        0.5 * mean (z(f_s) - z(f_t))^2,   z(x) = (x - mean_{N,H,W} x) / std_{N,H,W} x

    as mmrazor's ``PKDLoss`` per level (which divides by the unbiased std + 1e-6 instead;
    the two differ by a factor sqrt(NHW / (NHW - 1)) in the normalised values).  Not
    ``L2FeatureLoss`` with ``KD.FEATURE.NORMALIZE "channel"``, which standardises each
    image's map alone (and does not halve): the two agree (up to the factor 2) only for
    a batch of one image.  Levels are matched by stride, so student and teacher maps have
    one size (mmrazor resizes them where they do not).
    """

    short_name = "pkd"

    @configurable
    def __init__(self):
        """No settings."""

    @classmethod
    def from_config(cls, cfg):
        return {}

    def loss_map(self, student, teacher):
        diff = standardize_batch_channels(student) - standardize_batch_channels(teacher)
        return 0.5 * diff * diff


def build_feature_loss(cfg) -> FeatureLoss:
    """The feature loss named by ``cfg.KD.FEATURE.LOSS``, with a clear error for unknown names."""
    name = cfg.KD.FEATURE.LOSS
    cls = distill_loss_class(name, FeatureLoss, "KD.FEATURE.LOSS")
    if cfg.KD.FEATURE.NORMALIZE != "none" and not issubclass(cls, _LpFeatureLoss):
        raise ValueError(
            "KD.FEATURE.NORMALIZE={!r} applies to the lp losses (L2FeatureLoss, L1FeatureLoss), "
            "not to {}; {}set it to 'none'".format(
                cfg.KD.FEATURE.NORMALIZE,
                name,
                "SSIM normalises with KD.SSIM.NORMALIZE; " if name == "SSIMFeatureLoss" else "",
            )
        )
    return cls(cfg)


def ssim_feature_loss(student, teacher, level_weights=None, **ssim_kwargs) -> torch.Tensor:
    """Functional form of :class:`SSIMFeatureLoss`; ``ssim_kwargs`` are its constructor
    arguments."""
    return SSIMFeatureLoss(**ssim_kwargs)(student, teacher, level_weights)


def l2_feature_loss(student, teacher, level_weights=None, normalize="none") -> torch.Tensor:
    return L2FeatureLoss(normalize=normalize)(student, teacher, level_weights)


def l1_feature_loss(student, teacher, level_weights=None, normalize="none") -> torch.Tensor:
    return L1FeatureLoss(normalize=normalize)(student, teacher, level_weights)

"""
How strongly each distillation term pulls on the student, relative to the detection loss.

The one measuring function shared by the dry run (:mod:`kd_det.engine.dry_run`), the health
monitor (:mod:`kd_det.engine.health`) and the automatic weights
(:mod:`kd_det.engine.auto_weight`): for a loss dict of one training forward, the L2 norm of
each distillation term's gradient on the student's own parameters, divided by the norm of the
detection loss's gradient there.  It uses ``torch.autograd.grad`` with ``retain_graph=True``,
so the forward's graph stays for the trainer's own backward, and neither ``.grad`` nor any
optimizer state is touched.  Its cost is one extra backward pass per distillation term plus
one for the detection loss (no extra forward).
"""

import math
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

__all__ = [
    "GradRatios",
    "is_distill_term",
    "student_parameters",
    "split_loss_dict",
    "gradient_norm",
    "measure_grad_ratios",
    "all_reduce_mean",
]

#: loss-dict keys of the distillation terms (kd_det's convention, see kd_det.losses.registry)
DISTILL_PREFIX = "loss_kd_"
#: loss-dict keys that are neither: the FRSKD self-teacher's own head losses
OTHER_PREFIXES = ("loss_self_",)


def is_distill_term(name: str) -> bool:
    """Whether the loss-dict key ``name`` is a distillation term (``loss_kd_*``)."""
    return name.startswith(DISTILL_PREFIX)


def split_loss_dict(
    loss_dict: Mapping[str, torch.Tensor],
    is_distill: Callable[[str], bool] = is_distill_term,
    other_prefixes: Sequence[str] = OTHER_PREFIXES,
) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
    """
    (detection terms, distillation terms) of a training loss dict; keys starting with one
    of ``other_prefixes`` (a self-teacher's own losses) are in neither.
    """
    det, kd = {}, {}
    for name, value in loss_dict.items():
        if is_distill(name):
            kd[name] = value
        elif not name.startswith(tuple(other_prefixes)):
            det[name] = value
    return det, kd


def student_parameters(model: torch.nn.Module, kd_prefix: str = "kd_") -> List[torch.nn.Parameter]:
    """
    The trainable parameters of the student detector itself: those of ``model`` (a DDP
    wrapper is looked through) whose name does not start with ``kd_prefix`` (adapters,
    generators, gates, self-teachers: the detection loss has no gradient there, so a ratio
    over them would mean nothing).
    """
    module = getattr(model, "module", model)
    prefix = getattr(module, "kd_key_prefix", kd_prefix)
    return [p for n, p in module.named_parameters() if p.requires_grad and not n.startswith(prefix)]


def gradient_norm(
    loss: torch.Tensor, params: Sequence[torch.Tensor], scale: float = 1.0
) -> torch.Tensor:
    """
    The L2 norm over all ``params`` of d ``loss`` / d params, as a float64 scalar tensor on
    the loss's device (0 for a loss without graph or without a path to ``params``).

    Args:
        loss: scalar.
        scale: multiplies ``loss`` before the backward and divides the norm after: under
            mixed precision, the grad scaler's scale, so that half-precision gradients do
            not underflow (the ratios do not depend on it).  Where the scaled gradients
            overflow, the scale is halved until they do not (down to 1), as the grad scaler
            backs off after an overflow: the scaler's first scale (2**16) overflows fp16 on
            many detectors' first steps, which training skips and the measure must not
            report as an infinite gradient.
    """
    if not loss.requires_grad:
        return torch.zeros((), dtype=torch.float64, device=loss.device)
    while True:
        grads = torch.autograd.grad(
            loss * scale, list(params), retain_graph=True, allow_unused=True
        )
        # each parameter's squared norm in float64: millions of float32 squares would lose digits
        squares = [g.detach().double().pow(2).sum() for g in grads if g is not None]
        if not squares:
            return torch.zeros((), dtype=torch.float64, device=loss.device)
        norm = torch.stack(squares).sum().sqrt()
        if scale <= 1.0 or bool(torch.isfinite(norm)):  # one host sync, only with a scale
            return norm / scale
        scale = max(scale / 2.0, 1.0)


@dataclass
class GradRatios:
    """
    One measurement: ``det_norm`` the detection loss's gradient norm, ``norms[name]`` each
    distillation term's, ``ratios[name]`` = ``norms[name] / det_norm`` (inf where the
    detection gradient is 0, nan where both are), ``values[name]`` each term's value and
    ``active[name]`` whether the term had a graph (False: a term switched off, e.g. a LAKD
    stage before its start, given as a constant 0).
    """

    det_norm: float
    norms: Dict[str, float] = field(default_factory=dict)
    values: Dict[str, float] = field(default_factory=dict)
    active: Dict[str, bool] = field(default_factory=dict)

    @property
    def ratios(self) -> Dict[str, float]:
        return {k: _ratio(v, self.det_norm) for k, v in self.norms.items()}


def _ratio(num: float, den: float) -> float:
    if den == 0 or not math.isfinite(den):
        return math.nan if num == 0 or not math.isfinite(den) else math.inf
    return num / den


def measure_grad_ratios(
    loss_dict: Mapping[str, torch.Tensor],
    params: Iterable[torch.Tensor],
    terms: Optional[Sequence[str]] = None,
    scale: float = 1.0,
    is_distill: Callable[[str], bool] = is_distill_term,
) -> GradRatios:
    """
    Measure each distillation term's gradient norm on ``params`` relative to the detection
    loss's (the sum of the other terms, see :func:`split_loss_dict`).

    Args:
        loss_dict: a training forward's loss dict, name -> scalar tensor, its graph alive.
        params: the student's parameters (:func:`student_parameters`).
        terms: the distillation terms to measure (default: all in ``loss_dict``).
        scale: see :func:`gradient_norm`.
    Returns:
        a :class:`GradRatios`; its graph is kept (``retain_graph``) for the caller's backward.
    """
    params = [p for p in params if p.requires_grad]
    det, kd = split_loss_dict(loss_dict, is_distill)
    if not det:
        raise ValueError(
            "the loss dict has no detection term to compare with (keys {})".format(
                sorted(loss_dict)
            )
        )
    names = list(kd) if terms is None else [t for t in terms if t in kd]
    det_norm = gradient_norm(sum(det.values()), params, scale)
    norms = [gradient_norm(kd[n], params, scale) for n in names]
    values = [kd[n].detach().to(det_norm) for n in names]
    # one transfer to the host for all of them (a CUDA sync each otherwise)
    host = torch.stack([det_norm] + norms + values).cpu().tolist()
    return GradRatios(
        det_norm=host[0],
        norms=dict(zip(names, host[1 : 1 + len(names)])),
        values=dict(zip(names, host[1 + len(names) :])),
        active={n: bool(kd[n].requires_grad) for n in names},
    )


def all_reduce_mean(values: Sequence[float], device: Optional[torch.device] = None) -> List[float]:
    """
    The mean over all processes of each of ``values`` (the same length and order on every
    process); ``values`` itself without a process group.  Every process must call it.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return list(values)
    # NCCL reduces CUDA tensors only; gloo CPU ones
    if device is None:
        device = torch.device("cuda") if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return (t / dist.get_world_size()).cpu().tolist()

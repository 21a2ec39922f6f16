"""
The distillation health monitor: is each distillation term pulling on the student, and how
hard, compared with the detection loss?  And did the student's AP just collapse?
"""

import logging
import math
import re
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Set, Tuple

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .grad_ratio import GradRatios, all_reduce_mean, measure_grad_ratios, student_parameters
from .loss_tap import LossDictTap

__all__ = [
    "HealthProblem",
    "health_problems",
    "term_started",
    "grad_scale_of",
    "DistillHealthMonitor",
    "build_health_monitor",
    "scheduled_terms",
    "model_scheduled_terms",
]

logger = logging.getLogger(__name__)

_FIXES = {
    "zero": "it gives the student no gradient: check that the teacher loaded its trained "
    "weights (tools/train_net.py --dry-run), that the term's inputs are not detached, and "
    "under DDP that its modules are part of the wrapped model",
    "non-finite": "lower its weight or SOLVER.BASE_LR, or enable SOLVER.CLIP_GRADIENTS; under "
    "AMP check that the teacher's features are finite (KD.TEACHER.AUTOCAST '')",
    "dominating": "the student then mostly imitates and barely detects: lower the term's weight "
    "(KD.*.WEIGHT) or let KD.AUTO_WEIGHT set it",
    "vanishing": "it has practically no effect: raise the term's weight (KD.*.WEIGHT) or let "
    "KD.AUTO_WEIGHT set it",
    "detection": "the detection loss gives the student no finite gradient: check the data and "
    "SOLVER.BASE_LR",
}


@dataclass
class HealthProblem:
    """A problem of one term (``term``; "detection" for the detection loss) at one measurement."""

    term: str
    kind: str  # "zero", "non-finite", "dominating", "vanishing" or "detection"
    ratio: float

    @property
    def is_error(self) -> bool:
        """Zero, non-finite and a detection loss without gradient are errors; the rest warnings."""
        return self.kind in ("zero", "non-finite", "detection")

    def __str__(self) -> str:
        if self.kind == "detection":
            return "detection loss: gradient norm {:.3g}; {}".format(self.ratio, _FIXES[self.kind])
        return "{}: {} (gradient-norm ratio to the detection loss {:.3g}); {}".format(
            self.term, self.kind, self.ratio, _FIXES[self.kind]
        )


def health_problems(
    measured: GradRatios, dominating: float = 10.0, vanishing: float = 1e-3
) -> List[HealthProblem]:
    """
    The problems of one measurement: a term whose gradient is exactly 0 (while it is switched
    on), non-finite (its value or its gradient), above ``dominating`` times the detection
    loss's, or below ``vanishing`` times it (0 disables either).  A term switched off (no
    graph, e.g. a LAKD stage before its start) is not judged.
    """
    if not (measured.det_norm > 0 and math.isfinite(measured.det_norm)):
        return [HealthProblem("detection", "detection", measured.det_norm)]
    problems = []
    for term, norm in measured.norms.items():
        ratio = norm / measured.det_norm
        value = measured.values.get(term, 0.0)
        if not (math.isfinite(norm) and math.isfinite(value)):
            problems.append(HealthProblem(term, "non-finite", ratio))
        elif norm == 0:
            if measured.active.get(term, True):
                problems.append(HealthProblem(term, "zero", 0.0))
        elif dominating > 0 and ratio > dominating:
            problems.append(HealthProblem(term, "dominating", ratio))
        elif vanishing > 0 and ratio < vanishing:
            problems.append(HealthProblem(term, "vanishing", ratio))
    return problems


def term_started(term: str, iteration: int, start_iters: Mapping[str, Sequence[int]]) -> bool:
    """Whether ``term`` is switched on at ``iteration`` (terms not in ``start_iters``: always)."""
    starts = start_iters.get(term)
    return not starts or iteration >= min(starts)


def grad_scale_of(trainer) -> float:
    """The AMP grad scaler's current scale of a Detectron2 trainer (1 without AMP)."""
    inner = getattr(trainer, "_trainer", trainer)
    scaler = getattr(inner, "grad_scaler", None)
    if scaler is None or not scaler.is_enabled():
        return 1.0
    return float(scaler.get_scale())


def _ap_keys(latest: Mapping[str, Tuple[float, int]]) -> List[str]:
    # the student's box AP: "bbox/AP" or "<test set>/bbox/AP"; not the teacher's ("teacher/...")
    return [k for k in latest if re.fullmatch(r"(.+/)?bbox/AP", k) and not k.startswith("teacher")]


class DistillHealthMonitor(HookBase):
    """
    Every ``period`` iterations (from iteration 0), on the step's own loss dict (no extra
    forward; one extra backward per distillation term and one for the detection loss, through
    ``torch.autograd.grad`` before the trainer's backward), measure each distillation term's
    gradient-norm ratio to the detection loss on the student's parameters
    (:func:`~kd_det.engine.grad_ratio.measure_grad_ratios`), averaged over processes.  Logged
    as ``kd_grad_ratio/<term>`` in metrics.json; a term that is 0, non-finite, dominating or
    vanishing (:func:`health_problems`) is warned about, with the fix, when it becomes so.
    Under gradient accumulation, the first micro-batch of the iteration is measured.

    After each evaluation, a student box AP below ``ap_drop`` times its previous value is
    warned about (``ap_drops`` keeps them).
    """

    def __init__(
        self,
        period: int = 20,
        dominating: float = 10.0,
        vanishing: float = 1e-3,
        ap_drop: float = 0.5,
        start_iters: Optional[Mapping[str, Sequence[int]]] = None,
    ):
        """
        Args:
            period: measure at iterations 0, period, 2 * period, ... (>= 1).
            dominating, vanishing: ratio thresholds (see :func:`health_problems`).
            ap_drop: flag an AP below this fraction of the previous one; 0: never.
            start_iters: term -> iterations at which it (or a part of it) switches on, e.g.
                {"loss_kd_lakd": KD.LAKD.START_ITERS}: before the first it is not judged.
        """
        if period < 1:
            raise ValueError("KD.MONITOR.PERIOD must be >= 1, got {}".format(period))
        self.period = int(period)
        self.dominating = float(dominating)
        self.vanishing = float(vanishing)
        self.ap_drop = float(ap_drop)
        self.start_iters = dict(start_iters or {})
        self.last: Optional[GradRatios] = None
        self.ap_drops: List[Tuple[str, int, float, float]] = []
        self._last_ap: Dict[str, Tuple[float, int]] = {}
        self._warned: Set[Tuple[str, str]] = set()
        self._measured_iter = -1
        self._tap = LossDictTap(self._on_losses)

    def before_train(self):
        self._tap.attach(self.trainer.model)

    def after_train(self):
        self._tap.detach()
        self._check_ap()

    def after_step(self):
        self._check_ap()

    def _on_losses(self, loss_dict):
        storage = get_event_storage()
        it = storage.iter
        if (
            it % self.period
            or it == self._measured_iter
            or not any(k.startswith("loss_kd_") for k in loss_dict)
        ):
            return None
        self._measured_iter = it  # the first micro-batch only
        measured = measure_grad_ratios(
            loss_dict, student_parameters(self.trainer.model), scale=grad_scale_of(self.trainer)
        )
        names = sorted(measured.norms)
        mean = all_reduce_mean([measured.det_norm] + [measured.norms[n] for n in names])
        measured.det_norm = mean[0]
        measured.norms = dict(zip(names, mean[1:]))
        for n in names:  # a scheduled term before its start is off, whatever its value
            measured.active[n] = measured.active[n] and term_started(n, it, self.start_iters)
        self.last = measured
        ratios = measured.ratios
        storage.put_scalars(
            **{"kd_grad_ratio/" + n: r for n, r in ratios.items() if measured.active[n]},
            smoothing_hint=False,
        )
        self._report(it, measured, storage)
        return None

    def _report(self, it: int, measured: GradRatios, storage) -> None:
        problems = health_problems(measured, self.dominating, self.vanishing)
        if problems:  # metrics.json too: "kd_health/<term>/<kind>" = the ratio found
            storage.put_scalars(
                **{"kd_health/{}/{}".format(p.term, p.kind): p.ratio for p in problems},
                smoothing_hint=False,
            )
        if comm.is_main_process():
            logger.info(
                "iter {}: gradient norm of each distillation term / detection loss's ({:.3g}): "
                "{}".format(
                    it,
                    measured.det_norm,
                    ", ".join("{} {:.3g}".format(n, r) for n, r in sorted(measured.ratios.items())),
                )
            )
        now = {(p.term, p.kind) for p in problems}
        for p in problems:
            if (p.term, p.kind) not in self._warned and comm.is_main_process():
                logger.warning("Distillation health, iteration {}: {}".format(it, p))
        self._warned = now  # warned again when a problem goes away and comes back

    def _check_ap(self) -> None:
        try:
            latest = self.trainer.storage.latest()
        except AttributeError:  # no storage (training never started)
            return
        for key in _ap_keys(latest):
            value, it = latest[key]
            seen = self._last_ap.get(key)
            if seen is not None and it <= seen[1]:
                continue
            if seen is not None and self.ap_drop > 0 and value < self.ap_drop * seen[0]:
                self.ap_drops.append((key, it, seen[0], value))
                # metrics.json too, as the fraction kept (a name that is no AP key itself)
                self.trainer.storage.put_scalar(
                    "kd_health/ap_drop." + key.replace("/", "."),
                    value / seen[0],
                    smoothing_hint=False,
                )
                logger.warning(
                    "Distillation health: the student's {} fell from {:.2f} (iteration {}) to "
                    "{:.2f} (iteration {}), below {} of its last value. Check the "
                    "kd_grad_ratio/* curves (a dominating or non-finite term), lower the KD "
                    "weights or SOLVER.BASE_LR, and restart from the checkpoint before the "
                    "drop".format(key, seen[0], seen[1], value, it, self.ap_drop)
                )
            self._last_ap[key] = (float(value), int(it))

    def state_dict(self):
        return {"last_ap": {k: list(v) for k, v in self._last_ap.items()}}

    def load_state_dict(self, state_dict):
        self._last_ap = {k: (float(v[0]), int(v[1])) for k, v in state_dict["last_ap"].items()}


def build_health_monitor(cfg) -> Optional[DistillHealthMonitor]:
    """The monitor ``KD.MONITOR`` asks for (None when disabled)."""
    mon = cfg.KD.MONITOR
    if not mon.ENABLED:
        return None
    return DistillHealthMonitor(
        period=mon.PERIOD,
        dominating=mon.DOMINATING,
        vanishing=mon.VANISHING,
        ap_drop=mon.AP_DROP,
        start_iters=scheduled_terms(cfg),
    )


def model_scheduled_terms(model) -> Dict[str, List[int]]:
    """:func:`scheduled_terms` read from a built model (its LAKD distiller), e.g. a LazyConfig's."""
    lakd = getattr(getattr(model, "module", model), "kd_lakd", None)
    if lakd is None or not any(lakd.start_iters):
        return {}
    return {"loss_kd_" + lakd.loss.short_name: [int(i) for i in lakd.start_iters]}


def scheduled_terms(cfg) -> Dict[str, List[int]]:
    """Distillation terms that switch on during training: LAKD's stages (KD.LAKD.START_ITERS)."""
    lakd = cfg.KD.LAKD
    if lakd.ENABLED and lakd.START_ITERS:
        return {"loss_kd_lakd": [int(i) for i in lakd.START_ITERS]}
    return {}

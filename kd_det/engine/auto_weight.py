"""
Automatic distillation weights: each distillation term scaled so that its gradient on the
student is a chosen fraction of the detection loss's.
"""

import logging
from typing import Dict, List, Mapping, Optional, Sequence

from detectron2.engine import HookBase
from detectron2.utils import comm
from detectron2.utils.events import get_event_storage

from .grad_ratio import all_reduce_mean, is_distill_term, measure_grad_ratios, student_parameters
from .health import grad_scale_of, scheduled_terms, term_started
from .loss_tap import LossDictTap

__all__ = ["AutoWeightHook", "build_auto_weight_hook"]

logger = logging.getLogger(__name__)


class _Calibration:
    """
    One term's calibration for its switch-on at iteration ``period``, measured from iteration
    ``first`` (later than ``period`` when a run resumes without this hook's state): sums of the
    gradient norms measured so far, and their count.
    """

    def __init__(
        self, period: int, first: int, det_sum: float = 0.0, term_sum: float = 0.0, count: int = 0
    ):
        self.period, self.first = period, first
        self.det_sum, self.term_sum, self.count = det_sum, term_sum, count

    def as_list(self) -> List[float]:
        return [self.period, self.first, self.det_sum, self.term_sum, self.count]


class AutoWeightHook(HookBase):
    """
    Multiplies each distillation term of the loss dict (``loss_kd_*``, already times its
    configured weight, which stays as it is) by a factor chosen so that the term's gradient
    norm on the student's parameters is ``fraction`` times the detection loss's.

    Each term is calibrated over ``iters`` iterations from its start (iteration 0, or for a
    term in ``start_iters`` each of its start iterations, e.g. every LAKD stage's): at each
    of them, on the step's own loss dict before the backward, both gradient norms are measured
    (:func:`~kd_det.engine.grad_ratio.measure_grad_ratios`, averaged over processes, so that
    every process uses the same factor); the factor is ``fraction * sum(det norms) /
    sum(term norms)`` over the measurements so far, applied from that same step on, and fixed
    after the last.  The factors and the calibration's progress are the hook's state, saved in
    the checkpoint (``trainer.hooks.AutoWeightHook``), so ``--resume`` keeps them.  Under
    gradient accumulation the first micro-batch of an iteration is measured; all are scaled.
    """

    def __init__(
        self,
        fraction: float = 0.5,
        iters: int = 20,
        start_iters: Optional[Mapping[str, Sequence[int]]] = None,
    ):
        """
        Args:
            fraction: target ratio of each term's gradient norm to the detection loss's (> 0).
            iters: calibration iterations per term (and per start of a scheduled term), >= 1.
            start_iters: term -> iterations at which it (or a part of it) switches on; it is
                (re)calibrated from each.  Other terms are calibrated from iteration 0.
        """
        if fraction <= 0:
            raise ValueError("KD.AUTO_WEIGHT.FRACTION must be > 0, got {}".format(fraction))
        if iters < 1:
            raise ValueError("KD.AUTO_WEIGHT.ITERS must be >= 1, got {}".format(iters))
        self.fraction = float(fraction)
        self.iters = int(iters)
        self.start_iters = {k: sorted(int(i) for i in v) for k, v in (start_iters or {}).items()}
        #: term -> factor its loss is multiplied by (absent: 1, not calibrated yet)
        self.scales: Dict[str, float] = {}
        self._calibrating: Dict[str, _Calibration] = {}
        self._done: Dict[str, int] = {}  # term -> the start its calibration belonged to
        self._measured_iter = -1
        self._tap = LossDictTap(self._on_losses)

    # the trainer's hook interface
    def before_train(self):
        self._tap.attach(self.trainer.model)

    def after_train(self):
        self._tap.detach()

    def state_dict(self):
        return {
            "scales": dict(self.scales),
            "calibrating": {k: c.as_list() for k, c in self._calibrating.items()},
            "done": dict(self._done),
        }

    def load_state_dict(self, state_dict):
        self.scales = {k: float(v) for k, v in state_dict["scales"].items()}
        self._calibrating = {
            k: _Calibration(int(v[0]), int(v[1]), float(v[2]), float(v[3]), int(v[4]))
            for k, v in state_dict["calibrating"].items()
        }
        self._done = {k: int(v) for k, v in state_dict["done"].items()}

    # the work
    def _current_start(self, term: str, it: int) -> Optional[int]:
        """The start of ``term``'s current calibration period at ``it`` (None: not on yet)."""
        starts = self.start_iters.get(term)
        if not starts:
            return 0
        past = [s for s in starts if s <= it]
        return past[-1] if past else None

    def terms_to_measure(self, terms: Sequence[str], it: int) -> List[str]:
        """The terms being calibrated at iteration ``it`` (the same on every process)."""
        out = []
        for term in terms:
            start = self._current_start(term, it)
            if start is None or not term_started(term, it, self.start_iters):
                continue
            cal = self._calibrating.get(term)
            if cal is not None and cal.period != start:
                cal = None  # a new stage switched on: calibrate again
            if cal is None and self._done.get(term) == start:
                continue
            if cal is None:
                # from its start; or from now, in a run resumed without this hook's state
                cal = self._calibrating[term] = _Calibration(start, max(start, it))
            if it < cal.first + self.iters:
                out.append(term)
            else:
                self._finish(term, cal)
        return sorted(out)

    def _on_losses(self, loss_dict):
        it = get_event_storage().iter
        terms = sorted(k for k in loss_dict if is_distill_term(k))
        if it != self._measured_iter:
            self._measured_iter = it
            todo = self.terms_to_measure(terms, it)
            if todo:
                self._calibrate(loss_dict, todo, it)
        return {k: (v * self.scales[k] if k in self.scales else v) for k, v in loss_dict.items()}

    def _calibrate(self, loss_dict, todo: List[str], it: int) -> None:
        measured = measure_grad_ratios(
            loss_dict,
            student_parameters(self.trainer.model),
            terms=todo,
            scale=grad_scale_of(self.trainer),
        )
        # every process the same numbers, so the same factors
        mean = all_reduce_mean([measured.det_norm] + [measured.norms.get(t, 0.0) for t in todo])
        det = mean[0]
        storage = get_event_storage()
        for term, norm in zip(todo, mean[1:]):
            cal = self._calibrating[term]
            if det > 0 and norm > 0 and det < float("inf") and norm < float("inf"):
                cal.det_sum += det
                cal.term_sum += norm
                cal.count += 1
                self.scales[term] = self.fraction * cal.det_sum / cal.term_sum
            if it >= cal.first + self.iters - 1:
                self._finish(term, cal)
        storage.put_scalars(
            **{"kd_auto_weight/" + t: self.scales[t] for t in todo if t in self.scales},
            smoothing_hint=False,
        )

    def _finish(self, term: str, cal: _Calibration) -> None:
        del self._calibrating[term]
        self._done[term] = cal.period
        if not comm.is_main_process():
            return
        if cal.count == 0:
            logger.warning(
                "KD.AUTO_WEIGHT: {} had no usable gradient (zero or non-finite) in its {} "
                "calibration iterations from {}: its weight stays {}".format(
                    term, self.iters, cal.first, self.scales.get(term, 1.0)
                )
            )
            return
        logger.info(
            "KD.AUTO_WEIGHT: {} multiplied by {:.4g} (its configured weight stays; over {} "
            "measurements from iteration {}, its gradient norm is {} of the detection "
            "loss's)".format(term, self.scales[term], cal.count, cal.first, self.fraction)
        )


def build_auto_weight_hook(cfg) -> Optional[AutoWeightHook]:
    """The hook ``KD.AUTO_WEIGHT`` asks for (None when disabled)."""
    auto = cfg.KD.AUTO_WEIGHT
    if not auto.ENABLED:
        return None
    return AutoWeightHook(auto.FRACTION, auto.ITERS, start_iters=scheduled_terms(cfg))

"""
Tolerances for the numerical tests, derived from the arithmetic rather than tuned.

Why a comparison can differ from machine to machine: PyTorch picks its CPU kernels at
run time (``ATEN_CPU_CAPABILITY``: scalar, AVX2 or AVX512 vector widths), convolutions
go through oneDNN (``ONEDNN_MAX_CPU_ISA``), reductions are split over threads, and MKL
and ONNX Runtime choose kernels of their own.  Each choice sums in another order, so a
float32 result moves by a few units in its last place, and more where terms cancel.

The rules every numerical test here follows:

- A float32 result is compared with a **float64 reference** computed from the same
  float32 inputs (exactly representable in float64), never only with another float32
  path, whose own error would be part of the difference.
- The bound is a **worst-case first-order rounding bound** (Higham, *Accuracy and
  Stability of Numerical Algorithms*, 2nd ed., 2002): a sum of ``n`` terms computed in
  any order is off by at most ``gamma(n - 1) * sum(|t_i|)`` (eq. 4.4), a dot product by
  ``gamma(n) * sum(|x_i y_i|)`` (eq. 3.5), and ``k`` successive elementwise roundings by
  ``gamma(k)`` relative.  These depend on the order of the operations only through
  ``n``, so they hold for every kernel, vector width and thread count.
- The magnitude that multiplies ``gamma`` is the size of the **terms**, not of the
  result: where terms cancel (a variance as E[x^2] - E[x]^2, a gradient on a 2x2 map),
  the bound is as large as the cancellation makes the error, and the test says so.
- Longer formulas carry their bound along: :class:`Bounded` is a running error analysis
  (each operation propagates its operands' errors and adds its own rounding).
- Where a result is exact (a copy, an integer, a sum of equal-rounded values in one fixed
  order on one machine), the test uses ``torch.equal`` and says why it is exact.

The bounds are first order: they drop terms of order ``u**2`` (``u = 2**-24``), which
no comparison here is close to.
"""

import math
from typing import Optional, Union

import torch
import torch.nn.functional as F

Number = Union[float, torch.Tensor]


def unit_roundoff(dtype: torch.dtype = torch.float32) -> float:
    """u: the largest relative error of one rounding to ``dtype`` (half its machine epsilon)."""
    return torch.finfo(dtype).eps / 2


U32 = unit_roundoff(torch.float32)  # 2**-24 = 5.96e-8
U16 = unit_roundoff(torch.float16)  # 2**-11 = 4.88e-4


def gamma(n: float, u: float = U32) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error of n successive roundings."""
    n = max(float(n), 0.0)
    if n * u >= 1:
        raise ValueError("gamma({}) undefined for u={}: n u >= 1".format(n, u))
    return n * u / (1 - n * u)


def sum_bound(terms: torch.Tensor, dim=None, u: float = U32) -> torch.Tensor:
    """
    Largest rounding error of ``terms.sum(dim)`` computed in floating point in any order
    (pairwise, vectorised lanes, per-thread partial sums): gamma(n - 1) * sum |t|, plus
    the rounding of the stored result.  ``terms`` is the float64 reference of the summands.
    """
    terms = terms.double()
    magnitude = terms.abs().sum() if dim is None else terms.abs().sum(dim)
    return (gamma(_count(terms, dim) - 1, u) + u) * magnitude


def mean_bound(terms: torch.Tensor, dim=None, u: float = U32) -> torch.Tensor:
    """As :func:`sum_bound` for ``terms.mean(dim)``: the sum's bound over n, and the division's."""
    terms = terms.double()
    magnitude = terms.abs().mean() if dim is None else terms.abs().mean(dim)
    return (gamma(_count(terms, dim) - 1, u) + 2 * u) * magnitude


def _count(terms: torch.Tensor, dim) -> int:
    """How many terms a reduction of ``terms`` over ``dim`` (None: all) adds up."""
    if dim is None:
        return terms.numel()
    return math.prod(terms.shape[d] for d in (dim if isinstance(dim, (tuple, list)) else (dim,)))


def assert_within(got: torch.Tensor, ref: torch.Tensor, bound: Number, what: str = "") -> None:
    """
    Assert ``|got - ref| <= bound`` elementwise (``bound`` broadcasts), in float64.

    ``ref`` is the float64 reference; non-finite values must be the same on both sides.
    The message names the worst element relative to its bound, both values and the bound,
    so a failure says how far off it was.
    """
    # dtype given: a Python float would otherwise become float32 first
    got, ref = (
        torch.as_tensor(t.detach() if torch.is_tensor(t) else t, dtype=torch.float64)
        for t in (got, ref)
    )
    what = what or "values"
    assert got.shape == ref.shape, "{}: shape {} != reference {}".format(
        what, tuple(got.shape), tuple(ref.shape)
    )
    bound = torch.as_tensor(bound, dtype=torch.float64).expand_as(ref)
    finite = torch.isfinite(ref)
    same = torch.isfinite(got) == finite
    assert same.all() and torch.equal(
        got[~finite].nan_to_num(), ref[~finite].nan_to_num()
    ), "{}: non-finite values differ".format(what)
    err = torch.where(finite, got - ref, torch.zeros_like(ref)).abs()
    ratio = err / bound.clamp_min(torch.finfo(torch.float64).tiny)
    if not ratio.numel() or ratio.max() <= 1:
        return
    worst = int(ratio.flatten().argmax())
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(worst), ref.shape))
    raise AssertionError(
        "{}: |got - ref| exceeds its bound at {}: got {:.9g}, ref {:.9g}, error {:.3g} > "
        "bound {:.3g} ({:.2f}x); {} of {} elements over".format(
            what,
            index,
            got.flatten()[worst].item(),
            ref.flatten()[worst].item(),
            err.flatten()[worst].item(),
            bound.flatten()[worst].item(),
            ratio.flatten()[worst].item(),
            int((ratio > 1).sum()),
            ratio.numel(),
        )
    )


def assert_relative(
    got: torch.Tensor, ref: torch.Tensor, rel: float, what: str = "", scale: Optional[Number] = None
) -> None:
    """
    Assert ``max |got - ref| <= rel * scale``, with ``scale = max |ref|`` unless given:
    a norm-wise bound for arrays (gradients) whose small elements carry errors of the
    size of the large ones (their terms are as large).
    """
    ref64 = torch.as_tensor(ref, dtype=torch.float64)
    scale = ref64.abs().max() if scale is None else torch.as_tensor(scale, dtype=torch.float64)
    assert_within(got, ref64, rel * scale, what)


U64 = unit_roundoff(torch.float64)
#: roundings charged to an elementary function (exp, log, pow, sigmoid): at most 2 ulp = 4 u
#: (Sleef's u10 functions are within 1 ulp, ATen's vectorised exp_u20 within 2)
ELEMENTARY = 4


class Bounded:
    """
    Running error analysis (Higham, 2002, sec. 3.3) of a computation in ``dtype``.

    ``value`` is the exact result, evaluated in float64 from the inputs (float32 inputs are
    exact in float64); ``err`` bounds, to first order, how far the same formula evaluated in
    ``dtype`` can be from it on any kernel: every operation carries its operands' errors
    through its derivative and adds the rounding of its result (``ELEMENTARY`` roundings for
    exp, log, pow, sigmoid); sums and means add tolerances.sum_bound / mean_bound, which hold
    in any order.  Shared by the numerical tests of the losses (the loss tests import it).
    """

    def __init__(self, value, err=0.0, dtype=torch.float32):
        self.value = torch.as_tensor(value, dtype=torch.float64)  # a Python float exactly
        self.err = torch.as_tensor(err, dtype=torch.float64).broadcast_to(self.value.shape).clone()
        self.dtype = dtype
        self.u = unit_roundoff(dtype)

    @classmethod
    def exact(cls, x, dtype=None):
        """Inputs: values held exactly in the working precision (``dtype``, default x's)."""
        return cls(x.detach(), 0.0, dtype or x.dtype)

    def _lift(self, other):
        if isinstance(other, Bounded):
            return other
        value = torch.as_tensor(other, dtype=torch.float64)
        # a Python constant is rounded to the working precision unless it is representable there
        held = value.to(self.dtype).double()
        return Bounded(value, (held - value).abs(), self.dtype)

    def _result(self, value, err, roundings=1):
        return Bounded(value, err + roundings * self.u * value.abs(), self.dtype)

    def map(self, fn):
        """An exact operation on the elements' positions (view, index, crop, expand)."""
        return Bounded(fn(self.value), fn(self.err), self.dtype)

    @staticmethod
    def stack(items, dim=0):
        values, errs = (torch.stack([getattr(b, a) for b in items], dim) for a in ("value", "err"))
        return Bounded(values, errs, items[0].dtype)

    def __getitem__(self, index):
        return self.map(lambda a: a[index])

    @property
    def shape(self):
        return self.value.shape

    # arithmetic: (a + da) op (b + db), first order, plus one rounding of the result
    def __add__(self, other):
        o = self._lift(other)
        return self._result(self.value + o.value, self.err + o.err)

    __radd__ = __add__

    def __sub__(self, other):
        o = self._lift(other)
        return self._result(self.value - o.value, self.err + o.err)

    def __rsub__(self, other):
        return self._lift(other) - self

    def __neg__(self):
        return Bounded(-self.value, self.err, self.dtype)

    def __mul__(self, other):
        o = self._lift(other)
        err = self.err * o.value.abs() + o.err * self.value.abs()
        return self._result(self.value * o.value, err)

    __rmul__ = __mul__

    def __truediv__(self, other):
        o = self._lift(other)
        value = self.value / o.value
        return self._result(value, (self.err + value.abs() * o.err) / o.value.abs())

    def __rtruediv__(self, other):
        return self._lift(other) / self

    def __pow__(self, p):
        """x ** p: x * x for p = 2 (one rounding), else sign(x) |x| ** p (ELEMENTARY)."""
        if p == 1:
            return self
        if p == 2:
            return self * self
        value = self.value.sign() * self.value.abs() ** p
        slope = abs(p) * self.value.abs() ** (p - 1)
        return self._result(value, slope * self.err, ELEMENTARY)

    def abs(self):
        return Bounded(self.value.abs(), self.err, self.dtype)

    def clamp_min(self, floor):
        return Bounded(self.value.clamp_min(floor), self.err, self.dtype)

    def sign(self):
        return Bounded(self.value.sign(), 0.0, self.dtype)  # exact away from 0

    def sqrt(self):  # correctly rounded: one rounding
        value = self.value.sqrt()
        return self._result(value, self.err / (2 * value))

    def exp(self):
        value = self.value.exp()
        return self._result(value, value * self.err, ELEMENTARY)

    def log(self):
        return self._result(self.value.log(), self.err / self.value.abs(), ELEMENTARY)

    def sigmoid(self):  # 1 / (1 + exp(-x)): the exp, an addition and a division
        value = self.value.sigmoid()
        return self._result(value, value * (1 - value) * self.err, ELEMENTARY + 2)

    def logsigmoid(self):  # min(x, 0) - log1p(exp(-|x|)): two terms of one sign, no cancellation
        value = F.logsigmoid(self.value)
        return self._result(value, (1 - self.value.sigmoid()) * self.err, 2 * ELEMENTARY + 1)

    # reductions: the order-free bounds of tolerances.py on the exact terms
    def _reduce(self, dim, keepdim, reduce, bound):
        value = reduce(self.value, dim, keepdim)
        extra = bound(self.value, dim, self.u).reshape(value.shape)
        return Bounded(value, reduce(self.err, dim, keepdim) + extra, self.dtype)

    def sum(self, dim=None, keepdim=False):
        return self._reduce(dim, keepdim, _sum, sum_bound)

    def mean(self, dim=None, keepdim=False):
        return self._reduce(dim, keepdim, _mean, mean_bound)

    def amax(self, dim, keepdim=False):  # exact; moves by at most the largest error
        return Bounded(self.value.amax(dim, keepdim), self.err.amax(dim, keepdim), self.dtype)

    def amin(self, dim, keepdim=False):
        return Bounded(self.value.amin(dim, keepdim), self.err.amax(dim, keepdim), self.dtype)

    def var(self, dim, keepdim=False):
        """
        Biased variance.  The inputs' errors move it by at most 2 mean(|x - mu| (dx + mean dx));
        its own rounding, for the textbook (E[x^2] - mu^2), two-pass and updating (Welford)
        algorithms alike, by at most about n u (mean(x^2) + mu^2) (Chan, Golub & LeVeque,
        1983): charged as gamma(2 n + 4) (mean(x^2) + mu^2).
        """
        v, e = self.value, self.err
        n = _count(v, dim)
        mu = v.mean(dim, keepdim=True)
        centred = (v - mu).abs()
        moved = 2 * (centred * (e + e.mean(dim, keepdim=True))).mean(dim, keepdim=keepdim)
        rounding = gamma(2 * n + 4, self.u) * (
            (v * v).mean(dim, keepdim=keepdim) + mu.pow(2).reshape(moved.shape)
        )
        return Bounded(v.var(dim, unbiased=False, keepdim=keepdim), moved + rounding, self.dtype)


def _sum(t, dim, keepdim):
    return t.sum() if dim is None else t.sum(dim, keepdim=keepdim)


def _mean(t, dim, keepdim):
    return t.mean() if dim is None else t.mean(dim, keepdim=keepdim)


def assert_bounded(got, expected: Bounded, what="", reference=None, slack=0.0):
    """
    ``got``, computed in ``expected.dtype``, against ``reference`` (default ``expected.value``),
    a float64 evaluation of the same formula: within ``expected.err`` plus the float64
    evaluation's own error, the same bound at u64 (and ``slack``, a stated extra).
    """
    ref = expected.value if reference is None else reference
    bound = expected.err * (1 + U64 / expected.u) + slack
    assert_within(got, ref, bound, what)


def feature_loss_bounded(level_maps, level_weights=None) -> Bounded:
    """FeatureLoss.__call__: sum over levels of weight * mean of the level's loss map."""
    weights = level_weights or [1.0 / len(level_maps)] * len(level_maps)
    total = 0.0
    for w, lmap in zip(weights, level_maps):
        total = w * lmap.mean() + total
    return total

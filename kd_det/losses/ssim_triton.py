"""Fused SSIM feature loss on the GPU (Triton).

The PyTorch path blurs five maps (x, y, x*x, y*y, x*y) with two depthwise
convolutions and keeps them for backward: about ten feature-sized tensors of
memory traffic and storage per level.  Here one program walks down a strip of
columns of one (image, channel) plane, row by row:

* horizontal pass: the 1-D Gaussian over the row, from shifted loads (L1 hits),
  with the window's weights compiled in as constants;
* vertical pass: the last KH filtered rows of each quantity are kept in registers;
  output row ``r - KH + 1`` is their weighted sum.  The row loop is unrolled
  (``ROW_UNROLL`` rows per trip), so moving down a row renames registers: KH
  multiply-adds per row and quantity, and a move of the history per trip.

  On the H100 this "unrolled" pass is the fastest of three
  (``benchmarks/sweep_ssim_triton.py``, benchmarks/RESULTS.md): forward + backward of
  issue 9's pyramid in 13.8 ms against 15.4 for a "band" pass (16-row tiles times band
  matrices of the window, ``tl.dot``) and 21.4 for a "ring" pass (a ring of 16 partial
  output rows) in one sweep.  Those two live beside the sweep, in
  ``benchmarks/ssim_vertical_variants.py``, which launches them through this module's
  autograd function (:class:`_KernelConfig` is the seam);
  ``benchmarks/ssim_kernel_resources.py --sass`` counts the passes' instructions without
  a GPU.

Forward reads nothing but the input planes and writes one partial sum per program.
Backward recomputes the statistics the same way and writes the three SSIM
derivatives (w.r.t. the local mean of x, E[x^2] and E[xy]) of each output position,
into maps with KW - 1 zero columns either side and a zero row after them; a second
sliding kernel applies the transposed window to them (no per-tap masks, thanks to the
zero columns; it reads rows outside the map from the zero row, so none of its loads is
masked) and combines them with x and y into the gradient.  Backward
runs over chunks of planes, so the derivative maps never take more than
``BACKWARD_CHUNK_BYTES``.  Only the student gets a gradient: the teacher is a
constant in distillation.

The per-map min-max normalisation of :class:`SSIMFeatureLoss` is fused too: the
kernels read the raw features, subtract the plane's minimum on load and scale the
window sums by 1 / range (and its square), so no normalised copies exist.  Its
gradient through the min and max goes, as ``torch.amin``/``amax`` send it, in equal
shares to the positions holding the extreme value (a small fix-up kernel).

Values match :func:`kd_det.losses.ssim.ssim_map` (same valid window, same
formula, fp32 accumulation); ``tests/losses/test_ssim_triton.py`` checks values and
gradients, on the GPU and, on CPU-only machines, in Triton's interpreter
(``TRITON_INTERPRET=1``).
"""

import contextlib
import functools
import os
from typing import NamedTuple

import torch

from .ssim import effective_window_sizes, gaussian_window_1d

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = [
    "is_available",
    "is_interpreted",
    "fused_ssim_mean",
    "fused_ssim_feature_loss",
    "MAX_WINDOW",
]

# Windows up to 15 taps: the limit of the ring pass the kernels began with (16 slots), kept
# for every pass (benchmarks/ssim_vertical_variants.py still has the ring)
MAX_WINDOW = 15
# Columns and rows per program, warps per program.  One warp on 32 columns keeps each
# column's window in one thread's registers: the fastest ring setting measured on the H100
# (2026-11-21), and the unrolled pass's fewest instructions (ssim_kernel_resources.py
# --sass).
BLOCK_W = 32
ROWS_PER_PROGRAM = 128
NUM_WARPS = 1
FIXUP_BLOCK = 1024  # elements per program of the min/max gradient fix-up
# Backward materialises three fp32 derivative maps; it runs over as many planes at a
# time as fit in this many bytes (P2 of an 800x1344 input: 344 of 2048 planes).
BACKWARD_CHUNK_BYTES = 256 * 2**20
MINMAX_EPS = 1e-6  # as kd_det.losses.ssim.minmax_normalize
NORM_STRIDE = 8  # per-plane (lo_x, 1/range_x, lo_y, 1/range_y, hi_x, unused x3)
# Rows per trip of the "unrolled" pass's row loop (0: the window height).  Within a trip,
# moving the window down a row renames registers; between trips the row history moves.
# Compiled for sm_90, 4 rows cost as many instructions as 11 and fewer registers (110-118
# against 126-139), and compile in 20 s instead of 100 s for the three 11x11 kernels
# (Triton's coalescing pass grows with the square of the loads in the loop).
ROW_UNROLL = 4
# Size arguments the kernels are not specialised on.  By default Triton compiles a kernel
# per pattern of which integer arguments equal 1 or are multiples of 16; with the image
# sizes of detection training varying from batch to batch, every FPN level would bring
# new patterns, each a compilation of seconds.  The kernels read one column per thread,
# so knowing those divisibilities would not change their code.
SIZE_ARGS = (
    "H",
    "W",
    "HO",
    "WO",
    "DS",
    "ZERO_ROW",
    "n_col_blocks",
    "n_row_blocks",
    "HW",
    "n_blocks",
)
# Likewise for the alignment of the per-plane inputs, which the backward passes as slices
# of planes (chunks) starting anywhere.
SLICED_ARGS = ("x_ptr", "y_ptr", "grad_ptr", "c1_ptr", "c2_ptr", "norm_ptr")


def is_interpreted() -> bool:
    """Triton's interpreter (``TRITON_INTERPRET=1``) runs the kernels on CPU tensors (slowly; for
    tests)."""
    return triton is not None and os.environ.get("TRITON_INTERPRET", "0") == "1"


def is_available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _load(ptr, mask):
        """``tl.load``, 0 where ``mask`` is false; ``mask`` None: every address is in bounds.  A
        masked load costs a second instruction (its register is zeroed first), so the unrolled
        kernels clamp their addresses into the maps instead and mask only what they store."""
        if mask is None:
            return tl.load(ptr)
        else:
            return tl.load(ptr, mask=mask, other=0.0)

    @triton.jit
    def _load_plane_row(ptr, offs, mask, lo, inv, NORMALIZE: tl.constexpr):
        """Values at ``ptr + offs`` (offs: an int tensor, or a constant added to a pointer tensor),
        as fp32."""
        v = _load(ptr + offs, mask).to(tl.float32)
        if NORMALIZE:
            v = (v - lo) * inv
        return v

    @triton.jit
    def _load_shifted(ptr, offs, mask, lo, NORMALIZE: tl.constexpr):
        """Values at ``ptr + offs`` as fp32, less ``lo`` with ``NORMALIZE`` (the min-max rescaling's
        shift)."""
        v = _load(ptr + offs, mask).to(tl.float32)
        if NORMALIZE:
            v = v - lo
        return v

    @triton.jit
    def _program_tile(pid, n_col_blocks, n_row_blocks, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        """(plane, first row, columns) of a program: planes outermost, then row chunks, then column
        strips."""
        plane = pid // (n_col_blocks * n_row_blocks)
        rest = pid % (n_col_blocks * n_row_blocks)
        row0 = (rest // n_col_blocks) * ROWS
        cols = (rest % n_col_blocks) * BLOCK_W + tl.arange(0, BLOCK_W)
        return plane, row0, cols

    @triton.jit
    def _plane_norm(norm_ptr, plane, NORM_STRIDE: tl.constexpr):
        """The plane's min-max normalisation: (lo_x, inv_x, lo_y, inv_y, hi_x)."""
        base = norm_ptr + plane * NORM_STRIDE
        return (
            tl.load(base),
            tl.load(base + 1),
            tl.load(base + 2),
            tl.load(base + 3),
            tl.load(base + 4),
        )

    @triton.jit
    def _horizontal_stats(
        x_plane,
        y_plane,
        at,
        m,
        lo_x,
        inv_x,
        lo_y,
        inv_y,
        zero,
        WH: tl.constexpr,
        NORMALIZE: tl.constexpr,
    ):
        """
        The 1-D window ``WH`` along rows of x, y, x^2, y^2, xy at offsets ``at`` (a row, or a
        tile of rows), of the normalised maps with ``NORMALIZE``.
        """
        # pointers first, then the constant tap: it folds into the loads' address immediates
        x_at = x_plane + at
        y_at = y_plane + at
        h_x = zero
        h_y = zero
        h_xx = zero
        h_yy = zero
        h_xy = zero
        for j in tl.static_range(len(WH)):
            w = WH[j]
            # normalising is linear: shift each value here (exact near the minimum), scale
            # the five sums once below, instead of a subtract and a multiply per tap
            xv = _load_shifted(x_at, j, m, lo_x, NORMALIZE)
            yv = _load_shifted(y_at, j, m, lo_y, NORMALIZE)
            h_x += w * xv
            h_y += w * yv
            h_xx += w * xv * xv
            h_yy += w * yv * yv
            h_xy += w * xv * yv
        if NORMALIZE:
            h_x *= inv_x
            h_y *= inv_y
            h_xx *= inv_x * inv_x
            h_yy *= inv_y * inv_y
            h_xy *= inv_x * inv_y
        return h_x, h_y, h_xx, h_yy, h_xy

    @triton.jit
    def _ssim_and_derivatives(mu_x, mu_y, e_xx, e_yy, e_xy, c1, c2):
        """SSIM from the local statistics, and dS/d mu_x, dS/d E[x^2], dS/d E[xy] (y is the constant
        teacher)."""
        n1 = 2.0 * mu_x * mu_y + c1
        n2 = 2.0 * (e_xy - mu_x * mu_y) + c2
        d1 = mu_x * mu_x + mu_y * mu_y + c1
        d2 = (e_xx - mu_x * mu_x) + (e_yy - mu_y * mu_y) + c2
        inv_den = 1.0 / (d1 * d2)  # one division; 1 / d2 = d1 / (d1 d2)
        s = n1 * n2 * inv_den
        g_mu = (2.0 * mu_y * (n2 - n1) - 2.0 * mu_x * s * (d2 - d1)) * inv_den
        g_xx = -s * d1 * inv_den
        g_xy = 2.0 * n1 * inv_den
        return s, g_mu, g_xx, g_xy

    @triton.jit
    def _stats_plane(
        plane,
        x_ptr,
        y_ptr,
        d_mu_ptr,
        d_exx_ptr,
        d_exy_ptr,
        c1_ptr,
        c2_ptr,
        H,
        W,
        HO,
        DS,
        PAD: tl.constexpr,
    ):
        """
        A plane's (c1, c2) and pointers to its x, y and derivative maps (row stride DS, PAD zero
        columns): per-row offsets from them fit in 32 bits.
        """
        c1 = tl.load(c1_ptr + plane)
        c2 = tl.load(c2_ptr + plane)
        x_plane = x_ptr + plane.to(tl.int64) * H * W
        y_plane = y_ptr + plane.to(tl.int64) * H * W
        d_plane = plane.to(tl.int64) * HO * DS + PAD
        return (
            c1,
            c2,
            x_plane,
            y_plane,
            d_mu_ptr + d_plane,
            d_exx_ptr + d_plane,
            d_exy_ptr + d_plane,
        )

    @triton.jit
    def _ssim_output(
        d_mu_ptr, d_exx_ptr, d_exy_ptr, offs, ok, s, g_mu, g_xx, g_xy, total, BACKWARD: tl.constexpr
    ):
        """Backward: the three SSIM derivatives stored at ``offs``; forward: SSIM added to
        ``total``."""
        if BACKWARD:
            tl.store(d_mu_ptr + offs, g_mu, mask=ok)
            tl.store(d_exx_ptr + offs, g_xx, mask=ok)
            tl.store(d_exy_ptr + offs, g_xy, mask=ok)
        else:
            total += tl.where(ok, s, 0.0)
        return total

    @triton.jit
    def _horizontal_transposed(d_mu_ptr, d_exx_ptr, d_exy_ptr, offs, m, zero, WH: tl.constexpr):
        """
        The transposed 1-D window ``WH`` along rows of the three derivative maps: at input
        column c, sum_j WH[j] * d[c - j].  ``offs`` points at column c of maps stored with
        KW - 1 zero columns on either side, so no tap needs a mask of its own.
        """
        mu_at = d_mu_ptr + offs
        xx_at = d_exx_ptr + offs
        xy_at = d_exy_ptr + offs
        h_mu = zero
        h_xx = zero
        h_xy = zero
        for j in tl.static_range(len(WH)):
            w = WH[j]
            h_mu += w * _load(mu_at - j, m)
            h_xx += w * _load(xx_at - j, m)
            h_xy += w * _load(xy_at - j, m)
        return h_mu, h_xx, h_xy

    @triton.jit
    def _store_grad(
        x_ptr,
        y_ptr,
        grad_ptr,
        offs,
        ok,
        ld_offs,
        ld_mask,
        g_mu,
        g_xx,
        g_xy,
        scale,
        lo_x,
        inv_x,
        lo_y,
        inv_y,
        hi_x,
        sum_gx,
        sum_g,
        n_lo,
        n_hi,
        NORMALIZE: tl.constexpr,
    ):
        """
        g' = scale * (W^T d_mu + 2 x' W^T d_exx + y' W^T d_exy) at ``offs`` where ``ok``, x',
        y' the (normalised) inputs, loaded from ``ld_offs`` (``offs``, or where lanes outside
        ``ok`` are clamped into the plane) under ``ld_mask``.  Without normalisation grad_x =
        g'.  With it, grad_x = g' / range_x, and the running sums of g' x' and g' and counts
        of x == min and x == max (for the min/max part of the gradient) are returned updated.
        """
        x_raw = _load(x_ptr + ld_offs, ld_mask).to(tl.float32)
        yv = _load_plane_row(y_ptr, ld_offs, ld_mask, lo_y, inv_y, NORMALIZE)
        xv = x_raw
        if NORMALIZE:
            xv = (x_raw - lo_x) * inv_x
        g = scale * (g_mu + 2.0 * xv * g_xx + yv * g_xy)
        if NORMALIZE:
            sum_gx += tl.where(ok, g * xv, 0.0)
            sum_g += tl.where(ok, g, 0.0)
            n_lo += tl.where(ok & (x_raw == lo_x), 1.0, 0.0)
            n_hi += tl.where(ok & (x_raw == hi_x), 1.0, 0.0)
            g = g * inv_x
        tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=ok)
        return sum_gx, sum_g, n_lo, n_hi

    @triton.jit
    def _store_sums(partial_ptr, pid, sum_gx, sum_g, n_lo, n_hi):
        """The program's four (BLOCK_W,) sums of the min/max gradient, reduced, to ``partial``."""
        tl.store(partial_ptr + pid * 4, tl.sum(sum_gx, axis=0))
        tl.store(partial_ptr + pid * 4 + 1, tl.sum(sum_g, axis=0))
        tl.store(partial_ptr + pid * 4 + 2, tl.sum(n_lo, axis=0))
        tl.store(partial_ptr + pid * 4 + 3, tl.sum(n_hi, axis=0))

    @triton.jit
    def _window_sum(rows, WV: tl.constexpr, REVERSED: tl.constexpr):
        """sum_i WV[i] * rows[i] (``REVERSED``: WV[KH - 1 - i]) over a tuple of KH (BLOCK_W,)
        rows."""
        acc = WV[len(WV) - 1 if REVERSED else 0] * rows[0]
        for i in tl.static_range(1, len(WV)):
            acc += WV[len(WV) - 1 - i if REVERSED else i] * rows[i]
        return acc

    @triton.jit(do_not_specialize=SIZE_ARGS, do_not_specialize_on_alignment=SLICED_ARGS)
    def _ssim_stats_unrolled_kernel(
        x_ptr,
        y_ptr,
        norm_ptr,
        c1_ptr,
        c2_ptr,
        partial_ptr,
        d_mu_ptr,
        d_exx_ptr,
        d_exy_ptr,
        H,
        W,
        HO,
        WO,
        DS,
        n_col_blocks,
        n_row_blocks,
        WV: tl.constexpr,
        WH: tl.constexpr,
        UNROLL: tl.constexpr,
        BLOCK_W: tl.constexpr,
        ROWS: tl.constexpr,
        BACKWARD: tl.constexpr,
        NORMALIZE: tl.constexpr,
        NORM_STRIDE: tl.constexpr,
    ):
        """
        Per output position of a (plane, column strip, row chunk): SSIM (sum) or its
        derivatives.  The last KH = len(WV) horizontally filtered rows of each quantity are
        kept in a tuple, oldest first: output row r - KH + 1 is their sum weighted by ``WV``.
        The row loop runs UNROLL rows per trip, unrolled, so shifting the tuple by a row is
        register renaming; the window weights are immediates.  Per row and quantity that is
        KH multiply-adds (a ring of partial rows took 16 plus slot extraction and clearing).
        """
        pid = tl.program_id(0)
        plane, row0, cols = _program_tile(pid, n_col_blocks, n_row_blocks, ROWS, BLOCK_W)
        col_ok = cols < WO
        c1, c2, x_plane, y_plane, d_mu_plane, d_exx_plane, d_exy_plane = _stats_plane(
            plane,
            x_ptr,
            y_ptr,
            d_mu_ptr,
            d_exx_ptr,
            d_exy_ptr,
            c1_ptr,
            c2_ptr,
            H,
            W,
            HO,
            DS,
            len(WH) - 1,
        )
        lo_x, inv_x, lo_y, inv_y, hi_x = _plane_norm(norm_ptr, plane, NORM_STRIDE)
        # loads are unmasked: lanes past the last output column read the plane's last window
        # and rows past H its last row; what they produce is masked where it is stored
        cols_ld = tl.minimum(cols, WO - 1)

        zero = tl.zeros((BLOCK_W,), tl.float32)
        q_x = (zero,) * len(WV)
        q_y = (zero,) * len(WV)
        q_xx = (zero,) * len(WV)
        q_yy = (zero,) * len(WV)
        q_xy = (zero,) * len(WV)
        total = zero
        row_end = tl.minimum(row0 + ROWS, HO)
        # input rows row0 .. row_end + KH - 2, UNROLL at a time; rows past H only reach
        # outputs past row_end, which are masked
        for t in range(row0, row_end + len(WV) - 1, UNROLL):
            for k in tl.static_range(UNROLL):
                r = t + k
                h_x, h_y, h_xx, h_yy, h_xy = _horizontal_stats(
                    x_plane,
                    y_plane,
                    tl.minimum(r, H - 1) * W + cols_ld,
                    None,
                    lo_x,
                    inv_x,
                    lo_y,
                    inv_y,
                    zero,
                    WH,
                    NORMALIZE,
                )
                q_x = q_x[1:] + (h_x,)
                q_y = q_y[1:] + (h_y,)
                q_xx = q_xx[1:] + (h_xx,)
                q_yy = q_yy[1:] + (h_yy,)
                q_xy = q_xy[1:] + (h_xy,)
                s, g_mu, g_xx, g_xy = _ssim_and_derivatives(
                    _window_sum(q_x, WV, False),
                    _window_sum(q_y, WV, False),
                    _window_sum(q_xx, WV, False),
                    _window_sum(q_yy, WV, False),
                    _window_sum(q_xy, WV, False),
                    c1,
                    c2,
                )
                o = r - len(WV) + 1
                ok = col_ok & (o >= row0) & (o < row_end)
                total = _ssim_output(
                    d_mu_plane,
                    d_exx_plane,
                    d_exy_plane,
                    o * DS + cols,
                    ok,
                    s,
                    g_mu,
                    g_xx,
                    g_xy,
                    total,
                    BACKWARD,
                )
                if not BACKWARD:
                    # without stores in the loop the compiler hoists the loads of all KH rows
                    # to its top: 255 registers and spills on sm_90; a barrier per row keeps
                    # one row in flight (126 registers; benchmarks/ssim_kernel_resources.py)
                    tl.debug_barrier()
        if not BACKWARD:
            tl.store(partial_ptr + pid, tl.sum(total, axis=0))

    @triton.jit(do_not_specialize=SIZE_ARGS, do_not_specialize_on_alignment=SLICED_ARGS)
    def _ssim_grad_unrolled_kernel(
        x_ptr,
        y_ptr,
        norm_ptr,
        d_mu_ptr,
        d_exx_ptr,
        d_exy_ptr,
        scale_ptr,
        grad_ptr,
        partial_ptr,
        H,
        W,
        HO,
        WO,
        DS,
        ZERO_ROW,
        n_col_blocks,
        n_row_blocks,
        WV: tl.constexpr,
        WH: tl.constexpr,
        UNROLL: tl.constexpr,
        BLOCK_W: tl.constexpr,
        ROWS: tl.constexpr,
        NORMALIZE: tl.constexpr,
        NORM_STRIDE: tl.constexpr,
    ):
        """
        The gradient of the input rows of a (plane, column strip, row chunk), see
        :func:`_store_grad`, with the history of :func:`_ssim_stats_unrolled_kernel`: input
        row p gets sum_i WV[i] * (derivative row p - i, transposed-filtered along the row),
        so the last KH derivative rows, newest last, are weighted by the reversed ``WV``.
        Derivative rows outside the map are read from the zero row at ``ZERO_ROW`` (of DS
        zeros, after the maps' planes), so that no load needs a mask.
        """
        pid = tl.program_id(0)
        plane, row0, cols = _program_tile(pid, n_col_blocks, n_row_blocks, ROWS, BLOCK_W)
        col_ok = cols < W
        scale = tl.load(scale_ptr)
        lo_x, inv_x, lo_y, inv_y, hi_x = _plane_norm(norm_ptr, plane, NORM_STRIDE)
        # the plane's pointers, so that per-row offsets stay 32-bit
        in_plane = plane.to(tl.int64) * H * W
        x_plane = x_ptr + in_plane
        y_plane = y_ptr + in_plane
        grad_plane = grad_ptr + in_plane
        d_start = plane.to(tl.int64) * HO * DS
        d_mu_plane = d_mu_ptr + d_start + len(WH) - 1
        d_exx_plane = d_exx_ptr + d_start + len(WH) - 1
        d_exy_plane = d_exy_ptr + d_start + len(WH) - 1
        zero_row = (ZERO_ROW - d_start).to(
            tl.int32
        )  # as a row offset from the plane; maps are chunked: < 2**31
        # lanes past the last column read (and compute from) the plane's last column, and rows
        # before the first or past the last (the first window, the last trip's extra rows) the
        # plane's first or last row: their gradient is not stored and the sums skip them
        cols_ld = tl.minimum(cols, W - 1)

        zero = tl.zeros((BLOCK_W,), tl.float32)
        q_mu = (zero,) * len(WV)
        q_xx = (zero,) * len(WV)
        q_xy = (zero,) * len(WV)
        sum_gx = zero
        sum_g = zero
        n_lo = zero
        n_hi = zero
        row_end = tl.minimum(row0 + ROWS, H)
        # derivative rows o = row0 - KH + 1 .. row_end - 1; input row p = o is complete after row o
        for t in range(row0 - len(WV) + 1, row_end, UNROLL):
            for k in tl.static_range(UNROLL):
                o = t + k
                d_row = tl.where((o >= 0) & (o < HO), o * DS, zero_row)
                h_mu, h_xx, h_xy = _horizontal_transposed(
                    d_mu_plane, d_exx_plane, d_exy_plane, d_row + cols_ld, None, zero, WH
                )
                q_mu = q_mu[1:] + (h_mu,)
                q_xx = q_xx[1:] + (h_xx,)
                q_xy = q_xy[1:] + (h_xy,)
                p = o
                sum_gx, sum_g, n_lo, n_hi = _store_grad(
                    x_plane,
                    y_plane,
                    grad_plane,
                    p * W + cols,
                    col_ok & (p >= row0) & (p < row_end),
                    tl.minimum(tl.maximum(p, 0), H - 1) * W + cols_ld,
                    None,
                    _window_sum(q_mu, WV, True),
                    _window_sum(q_xx, WV, True),
                    _window_sum(q_xy, WV, True),
                    scale,
                    lo_x,
                    inv_x,
                    lo_y,
                    inv_y,
                    hi_x,
                    sum_gx,
                    sum_g,
                    n_lo,
                    n_hi,
                    NORMALIZE,
                )
        if NORMALIZE:
            _store_sums(partial_ptr, pid, sum_gx, sum_g, n_lo, n_hi)

    @triton.jit(do_not_specialize=SIZE_ARGS, do_not_specialize_on_alignment=SLICED_ARGS)
    def _minmax_grad_fixup_kernel(x_ptr, grad_ptr, fix_ptr, HW, n_blocks, BLOCK: tl.constexpr):
        """grad += c_lo where x == min, c_hi where x == max, per plane:
        fix = (lo, hi, c_lo, c_hi)."""
        pid = tl.program_id(0)
        plane = pid // n_blocks
        offs = (pid % n_blocks) * BLOCK + tl.arange(0, BLOCK)
        m = offs < HW
        base = plane.to(tl.int64) * HW
        x = tl.load(x_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        lo = tl.load(fix_ptr + plane * 4)
        hi = tl.load(fix_ptr + plane * 4 + 1)
        c_lo = tl.load(fix_ptr + plane * 4 + 2)
        c_hi = tl.load(fix_ptr + plane * 4 + 3)
        add = tl.where(x == lo, c_lo, 0.0) + tl.where(x == hi, c_hi, 0.0)
        g = tl.load(grad_ptr + base + offs, mask=m, other=0.0).to(tl.float32)
        tl.store(grad_ptr + base + offs, (g + add).to(grad_ptr.dtype.element_ty), mask=m)


def _cdiv(a: int, b: int) -> int:
    # not triton.cdiv: a jitted function, called from the host it costs microseconds a call,
    # and the launches of one loss call it dozens of times
    return -(-a // b)


def _plane_values(value, planes: int, device) -> torch.Tensor:
    """A scalar or N*C values as one fp32 value per (image, channel) plane."""
    if not torch.is_tensor(value):
        # a fill on the device: torch.as_tensor of a Python number would copy it from host
        # memory, and PyTorch waits for such a copy, stalling the launch queue once per level
        return torch.full((planes,), float(value), dtype=torch.float32, device=device)
    t = value.to(device=device, dtype=torch.float32)
    return t.expand(planes).contiguous() if t.dim() == 0 else t.reshape(planes).contiguous()


def _minmax(planes: torch.Tensor):
    """(P, H, W) -> per-plane fp32 (lo, hi, 1 / clamp_min(hi - lo, eps), hi - lo >= eps)."""
    lo, hi = torch.aminmax(planes.detach().flatten(1), dim=1)
    lo, hi = lo.float(), hi.float()
    span = hi - lo
    # clamp_min passes its gradient where span >= eps: then the range depends on lo and hi
    return lo, hi, 1.0 / span.clamp_min(MINMAX_EPS), span >= MINMAX_EPS


def _derivative_maps(planes: int, ho: int, wo: int, pad: int, device) -> torch.Tensor:
    """
    (3, L) fp32, L >= planes * ho * ds + ds, ds = wo + 2 pad: three maps of ``planes``
    (ho, ds) planes whose ``pad`` columns either side are zero, then a row of ds zeros.
    Only the padding is written here; the derivative pass fills the rest.
    """
    ds = wo + 2 * pad
    # L a multiple of 32 values: each map starts 128-byte aligned, as Triton's
    # specialisation on pointer alignment would otherwise compile a kernel per case
    length = -(-(planes * ho * ds + ds) // 32) * 32
    rows = planes * ho
    d_maps = torch.empty((3, length), dtype=torch.float32, device=device)
    d_maps[:, rows * ds :].zero_()
    if pad:
        d_maps[:, :pad].zero_()
        # a row's right padding and the next row's left padding are adjacent: one fill of
        # rows runs of 2 pad values (the last run ends in the zero row), not two of pad
        d_maps.as_strided(
            (3, rows, 2 * pad), (length, ds, 1), d_maps.storage_offset() + pad + wo
        ).zero_()
    return d_maps


class _KernelConfig(NamedTuple):
    """
    The tuning constants above, read once per forward so that its backward uses the same.
    ``benchmarks/ssim_vertical_variants.py`` puts a class with the same methods in its place
    to launch its other vertical passes.
    """

    block_w: int
    rows: int
    num_warps: int
    row_unroll: int

    @classmethod
    def current(cls) -> "_KernelConfig":
        return cls(BLOCK_W, ROWS_PER_PROGRAM, NUM_WARPS, ROW_UNROLL)

    def unroll(self, kh):
        """Rows per trip of the unrolled pass's loop: ROW_UNROLL, at most (and by default) kh."""
        return min(kh, self.row_unroll) if self.row_unroll > 0 else kh

    def grid(self, planes, rows, cols):
        col_blocks, row_blocks = _cdiv(cols, self.block_w), _cdiv(rows, self.rows)
        return planes * col_blocks * row_blocks, col_blocks, row_blocks

    def launch_stats(
        self,
        planes,
        x,
        y,
        norm,
        window,
        c1,
        c2,
        partial,
        d_mu,
        d_exx,
        d_exy,
        h,
        w,
        ho,
        wo,
        ds,
        backward,
        normalize,
    ):
        """
        The statistics kernel over output rows: SSIM partial sums (one per program), or its
        derivatives into (planes, ho, ds) maps, ``ds`` = wo + 2 (kw - 1), at column kw - 1 on.
        """
        grid, col_blocks, row_blocks = self.grid(planes, ho, wo)
        sizes = (h, w, ho, wo, ds, col_blocks, row_blocks)
        common = dict(
            WH=window.wh,
            BLOCK_W=self.block_w,
            ROWS=self.rows,
            BACKWARD=backward,
            NORMALIZE=normalize,
            NORM_STRIDE=NORM_STRIDE,
            num_warps=self.num_warps,
        )
        _ssim_stats_unrolled_kernel[(grid,)](
            x,
            y,
            norm,
            c1,
            c2,
            partial,
            d_mu,
            d_exx,
            d_exy,
            *sizes,
            WV=window.wv,
            UNROLL=self.unroll(len(window.wv)),
            **common
        )

    def launch_grad(
        self,
        planes,
        x,
        y,
        norm,
        d_mu,
        d_exx,
        d_exy,
        window,
        scale,
        grad,
        partial,
        h,
        w,
        ho,
        wo,
        ds,
        normalize,
    ):
        """
        The gradient kernel over input rows; ``partial`` holds 4 values per program (see
        grid).  The derivative maps hold ``planes`` (ho, ds) planes, then a row of ds zeros.
        """
        grid, col_blocks, row_blocks = self.grid(planes, h, w)
        common = dict(
            WH=window.wh,
            BLOCK_W=self.block_w,
            ROWS=self.rows,
            NORMALIZE=normalize,
            NORM_STRIDE=NORM_STRIDE,
            num_warps=self.num_warps,
        )
        _ssim_grad_unrolled_kernel[(grid,)](
            x,
            y,
            norm,
            d_mu,
            d_exx,
            d_exy,
            scale,
            grad,
            partial,
            h,
            w,
            ho,
            wo,
            ds,
            planes * ho * ds,
            col_blocks,
            row_blocks,
            WV=window.wv,
            UNROLL=self.unroll(len(window.wv)),
            **common
        )


class _Window(NamedTuple):
    """The separable Gaussian window: its taps as Python floats, compile-time constants of the
    kernels (one compilation per window)."""

    wh: tuple
    wv: tuple

    @classmethod
    @functools.lru_cache(maxsize=64)
    def of(cls, kh, kw, sigma):
        # computed on the CPU: .tolist() keeps the fp32 values exactly, with no device sync.
        # Memoised: the tuples are immutable, and building them with torch ops costs more host
        # time per level than launching the kernel
        wh, wv = gaussian_window_1d(kw, sigma, "cpu"), gaussian_window_1d(kh, sigma, "cpu")
        return cls(tuple(wh.tolist()), tuple(wv.tolist()))


def _on_device_of(t: torch.Tensor):
    """Triton launches on the current CUDA device: make it the tensor's, which in a process
    that drives several GPUs need not be the current one."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


class _FusedSSIMMean(torch.autograd.Function):
    """mean over planes and valid positions of SSIM(x', y'); gradient for x only.

    x' = x, y' = y, or with ``normalize`` each plane min-max rescaled to [0, 1].
    """

    @staticmethod
    def forward(ctx, x, y, window_size, sigma, c1, c2, normalize):
        with _on_device_of(x):
            return _FusedSSIMMean._forward(ctx, x, y, window_size, sigma, c1, c2, normalize)

    @staticmethod
    def backward(ctx, grad_out):
        with _on_device_of(grad_out):
            return _FusedSSIMMean._backward(ctx, grad_out)

    @staticmethod
    def _forward(ctx, x, y, window_size, sigma, c1, c2, normalize):
        n, c, h, w = x.shape
        planes = n * c
        kh, kw = effective_window_sizes(h, w, window_size)
        ho, wo = h - kh + 1, w - kw + 1
        x = x.contiguous().view(planes, h, w)
        y = y.contiguous().view(planes, h, w)
        window = _Window.of(kh, kw, sigma)
        c1 = _plane_values(c1, planes, x.device)
        c2 = _plane_values(c2, planes, x.device)
        norm = torch.zeros((planes, NORM_STRIDE), dtype=torch.float32, device=x.device)
        unclamped = None
        if normalize:
            lo_x, hi_x, inv_x, unclamped = _minmax(x)
            lo_y, _, inv_y, _ = _minmax(y)
            norm[:, 0], norm[:, 1], norm[:, 2], norm[:, 3], norm[:, 4] = (
                lo_x,
                inv_x,
                lo_y,
                inv_y,
                hi_x,
            )
        config = _KernelConfig.current()
        partial = torch.empty(config.grid(planes, ho, wo)[0], dtype=torch.float32, device=x.device)
        config.launch_stats(
            planes,
            x,
            y,
            norm,
            window,
            c1,
            c2,
            partial,
            partial,
            partial,
            partial,
            h,
            w,
            ho,
            wo,
            wo,
            False,
            normalize,
        )
        count = planes * ho * wo
        ctx.save_for_backward(x, y, c1, c2, norm, unclamped if normalize else norm)
        ctx.shape = (n, c, h, w, ho, wo, kh, kw, count)
        ctx.normalize = normalize
        ctx.config = config
        ctx.window = window
        return (partial.sum() / count).to(x.dtype)

    @staticmethod
    def _backward(ctx, grad_out):
        x, y, c1, c2, norm, unclamped = ctx.saved_tensors
        n, c, h, w, ho, wo, kh, kw, count = ctx.shape
        normalize, config, window = ctx.normalize, ctx.config, ctx.window
        planes = n * c
        scale = (grad_out.float() / count).reshape(1)
        grad = torch.empty_like(x)
        # per plane: sum g'x', sum g', #(x == min), #(x == max) (normalisation only)
        sums = torch.zeros((planes, 4), dtype=torch.float32, device=x.device) if normalize else None
        # derivative maps with kw - 1 zero columns either side, and a zero row after the last
        # plane: the gradient pass reads them without per-tap masks.  One set serves every
        # chunk: the kernels write only the planes' interiors, so the padding stays zero
        pad = kw - 1
        ds = wo + 2 * pad
        chunk = min(planes, max(1, BACKWARD_CHUNK_BYTES // max(1, 3 * 4 * ho * ds)))
        d_maps = _derivative_maps(chunk, ho, wo, pad, x.device)
        d_mu, d_exx, d_exy = d_maps.unbind(0)
        for p0 in range(0, planes, chunk):
            p1 = min(planes, p0 + chunk)
            if p1 - p0 < chunk:
                # a shorter last chunk's zero row is a row of the previous chunk's planes
                d_maps[:, (p1 - p0) * ho * ds : (p1 - p0) * ho * ds + ds].zero_()
            cx, cy, cnorm, cgrad = x[p0:p1], y[p0:p1], norm[p0:p1], grad[p0:p1]
            config.launch_stats(
                p1 - p0,
                cx,
                cy,
                cnorm,
                window,
                c1[p0:p1],
                c2[p0:p1],
                d_mu,
                d_mu,
                d_exx,
                d_exy,
                h,
                w,
                ho,
                wo,
                ds,
                True,
                normalize,
            )
            # per program: the four sums above; without normalisation the kernel stores none
            partial = (
                torch.empty(
                    (config.grid(p1 - p0, h, w)[0], 4), dtype=torch.float32, device=x.device
                )
                if normalize
                else scale
            )
            config.launch_grad(
                p1 - p0,
                cx,
                cy,
                cnorm,
                d_mu,
                d_exx,
                d_exy,
                window,
                scale,
                cgrad,
                partial,
                h,
                w,
                ho,
                wo,
                ds,
                normalize,
            )
            if normalize:
                sums[p0:p1] = partial.view(p1 - p0, -1, 4).sum(1)
        del d_maps, d_mu, d_exx, d_exy
        if normalize:
            # x' = (x - lo) * inv, inv = 1 / clamp_min(hi - lo, eps):
            # dL/dlo = inv * (u * sum g'x' - sum g'), dL/dhi = -u * inv * sum g'x',
            # u = [hi - lo >= eps];
            # amin/amax share their gradient equally between the positions holding the extreme
            sum_gx, sum_g, n_lo, n_hi = sums.unbind(1)
            inv, u = norm[:, 1], unclamped.float()
            fix = torch.stack(
                [
                    norm[:, 0],
                    norm[:, 4],
                    inv * (u * sum_gx - sum_g) / n_lo,
                    -u * inv * sum_gx / n_hi,
                ],
                dim=1,
            ).contiguous()
            n_blocks = _cdiv(h * w, FIXUP_BLOCK)
            _minmax_grad_fixup_kernel[(planes * n_blocks,)](
                x, grad, fix, h * w, n_blocks, BLOCK=FIXUP_BLOCK
            )
        return grad.view(n, c, h, w), None, None, None, None, None, None


def fused_ssim_mean(
    x, y, window_size=11, sigma=1.5, c1=0.01**2, c2=0.03**2, normalize=False
) -> torch.Tensor:
    """
    Mean SSIM of (N, C, H, W) tensors ``x`` (gets a gradient) and ``y``
    (constant), equal to ``ssim_map(x, y, ...).mean()``, or with ``normalize`` to
    ``ssim_map(minmax_normalize(x), minmax_normalize(y), ...).mean()``.
    ``c1``/``c2``: scalars or per-plane tensors of N*C values.  CUDA tensors, or CPU
    tensors under Triton's interpreter.
    """
    if triton is None:
        raise RuntimeError("the fused SSIM kernel needs Triton")
    if window_size > MAX_WINDOW:
        raise ValueError("the fused SSIM kernel supports windows up to {} taps".format(MAX_WINDOW))
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(
            "fused_ssim_mean expects two (N, C, H, W) tensors of one shape, got {} and {}".format(
                tuple(x.shape), tuple(y.shape)
            )
        )
    return _FusedSSIMMean.apply(x, y.detach(), window_size, sigma, c1, c2, bool(normalize))


def fused_ssim_feature_loss(
    student, teacher, window_size, sigma, k1, k2, normalize
) -> torch.Tensor:
    """One level of :class:`SSIMFeatureLoss`: ``(1 - mean SSIM) / 2``, fused on the GPU."""
    teacher = teacher.detach()
    if normalize == "minmax":
        mean = fused_ssim_mean(student, teacher, window_size, sigma, k1**2, k2**2, normalize=True)
    else:
        flat = teacher.flatten(2)
        value_range = (flat.amax(dim=2) - flat.amin(dim=2)).clamp_min(1e-6).flatten()
        mean = fused_ssim_mean(
            student, teacher, window_size, sigma, (k1 * value_range) ** 2, (k2 * value_range) ** 2
        )
    return (1.0 - mean) / 2.0

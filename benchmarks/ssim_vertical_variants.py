"""
The fused SSIM kernel's other vertical passes, "ring" and "band", kept for the sweep and
the benchmarks (``sweep_ssim_triton.py``, ``bench_ssim.py``, ``ssim_kernel_resources.py``).
kd_det keeps only its default pass, "unrolled" (:mod:`kd_det.losses.ssim_triton`), the
fastest of the three on the H100 (benchmarks/RESULTS.md).  These kernels reuse its
horizontal pass, SSIM formula and stores, and launch through its autograd function:

  - "ring": each horizontally filtered row is added, with its tap weight, into a ring of
    16 partial output rows (row ``o`` in slot ``o % 16``); a complete row is extracted and
    its slot cleared.  About 60 operations per row and quantity;
  - "band": 16 rows at a time, as products of 16x16 band matrices of the window with
    16-row tiles of horizontally filtered rows (``tl.dot``), one completing the previous
    tile of output rows, one starting the current.  Every input row is read once, and no
    per-row extraction and clearing of a ring slot is done.  ``DOT_PRECISION`` "ieee"
    keeps the products in fp32 on the FMA units; "tf32x3" moves them to tensor cores with
    three tf32 products per value (about fp32 accuracy).  It needs 4 or 8 warps (it
    spills with fewer).

Select one for the calls that follow (``ssim_triton.BLOCK_W``, ``NUM_WARPS`` etc. still
apply)::

    import ssim_vertical_variants as variants   # from benchmarks/, or with it on sys.path

    with variants.vertical_pass("band", "tf32x3"):
        loss = ssim_triton.fused_ssim_mean(x, y)
    variants.use("ring")   # until variants.use("unrolled"): the sweep's way

The kernel tests run with them too: ``pytest tests/losses/test_ssim_triton.py --ssim-variants``
(not part of ``make test``; ``benchmarks/gpu/run_suite.sh tests`` passes it).
"""

import contextlib
from typing import NamedTuple

import torch

from kd_det.losses import ssim_triton
from kd_det.losses.ssim_triton import SIZE_ARGS, SLICED_ARGS, triton

# "unrolled": kd_det's own pass, launched by kd_det's own _KernelConfig
PASSES = ("unrolled", "ring", "band")
RING = 16  # slots of the vertical ring: windows up to 15 taps (ssim_triton.MAX_WINDOW)
TILE_ROWS = 16  # rows of one band tile; windows up to TILE_ROWS + 1 taps
# Software pipelining (Triton's default num_stages=3) would buffer every tap's shifted
# 2-D tile of the band kernels in shared memory: compiled for sm_90 that is 100-400 KiB a
# program, past the H100's 227 KiB from BLOCK_W 64 on; one stage needs 8-43 KiB
# (ssim_kernel_resources.py).
BAND_NUM_STAGES = 1
# The pass and the band's dot precision of the next forward (read once per forward, as
# kd_det's tuning constants): set them with use() or vertical_pass()
VERTICAL_PASS = "unrolled"
DOT_PRECISION = "ieee"

# kd_det's own launcher, which VariantKernelConfig replaces while installed
PackageKernelConfig = ssim_triton._KernelConfig

if triton is not None:
    import triton.language as tl

    # the shared parts of the kernels, from kd_det (a jitted function calls those it finds
    # among its module's names)
    from kd_det.losses.ssim_triton import (
        _horizontal_stats,
        _horizontal_transposed,
        _plane_norm,
        _program_tile,
        _ssim_and_derivatives,
        _ssim_output,
        _stats_plane,
        _store_grad,
        _store_sums,
    )

    @triton.jit(do_not_specialize=SIZE_ARGS, do_not_specialize_on_alignment=SLICED_ARGS)
    def _ssim_stats_kernel(
        x_ptr,
        y_ptr,
        norm_ptr,
        wv_ptr,
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
        KH: tl.constexpr,
        WH: tl.constexpr,
        RING: tl.constexpr,
        BLOCK_W: tl.constexpr,
        ROWS: tl.constexpr,
        BACKWARD: tl.constexpr,
        NORMALIZE: tl.constexpr,
        NORM_STRIDE: tl.constexpr,
    ):
        """Per output position of a (plane, column strip, row chunk): SSIM (sum) or its
        derivatives."""
        pid = tl.program_id(0)
        plane, row0, cols = _program_tile(pid, n_col_blocks, n_row_blocks, ROWS, BLOCK_W)
        col_ok = cols < WO
        slots = tl.arange(0, RING)
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

        a_x = tl.zeros((RING, BLOCK_W), tl.float32)
        a_y = tl.zeros((RING, BLOCK_W), tl.float32)
        a_xx = tl.zeros((RING, BLOCK_W), tl.float32)
        a_yy = tl.zeros((RING, BLOCK_W), tl.float32)
        a_xy = tl.zeros((RING, BLOCK_W), tl.float32)
        total = tl.zeros((BLOCK_W,), tl.float32)
        row_end = tl.minimum(row0 + ROWS, HO)
        for r in range(row0, row_end + KH - 1):
            h_x, h_y, h_xx, h_yy, h_xy = _horizontal_stats(
                x_plane,
                y_plane,
                r * W + cols,
                col_ok,
                lo_x,
                inv_x,
                lo_y,
                inv_y,
                tl.zeros((BLOCK_W,), tl.float32),
                WH,
                NORMALIZE,
            )
            # vertical pass: slot s holds output row o = r - ((r - s) mod RING), tap i = r - o
            tap = (r - slots) & (RING - 1)
            wv = tl.load(wv_ptr + tap, mask=tap < KH, other=0.0)[:, None]
            a_x += wv * h_x[None, :]
            a_y += wv * h_y[None, :]
            a_xx += wv * h_xx[None, :]
            a_yy += wv * h_yy[None, :]
            a_xy += wv * h_xy[None, :]
            # output row r - KH + 1 has all its taps now
            o = r - KH + 1
            done = (slots == (o & (RING - 1)))[:, None]
            mu_x = tl.sum(tl.where(done, a_x, 0.0), axis=0)
            mu_y = tl.sum(tl.where(done, a_y, 0.0), axis=0)
            e_xx = tl.sum(tl.where(done, a_xx, 0.0), axis=0)
            e_yy = tl.sum(tl.where(done, a_yy, 0.0), axis=0)
            e_xy = tl.sum(tl.where(done, a_xy, 0.0), axis=0)
            a_x = tl.where(done, 0.0, a_x)
            a_y = tl.where(done, 0.0, a_y)
            a_xx = tl.where(done, 0.0, a_xx)
            a_yy = tl.where(done, 0.0, a_yy)
            a_xy = tl.where(done, 0.0, a_xy)

            s, g_mu, g_xx, g_xy = _ssim_and_derivatives(mu_x, mu_y, e_xx, e_yy, e_xy, c1, c2)
            ok = col_ok & (o >= row0)
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
            tl.store(partial_ptr + pid, tl.sum(total, axis=0))

    @triton.jit(do_not_specialize=SIZE_ARGS, do_not_specialize_on_alignment=SLICED_ARGS)
    def _ssim_grad_kernel(
        x_ptr,
        y_ptr,
        norm_ptr,
        d_mu_ptr,
        d_exx_ptr,
        d_exy_ptr,
        wv_ptr,
        scale_ptr,
        grad_ptr,
        partial_ptr,
        H,
        W,
        HO,
        WO,
        DS,
        n_col_blocks,
        n_row_blocks,
        KH: tl.constexpr,
        WH: tl.constexpr,
        RING: tl.constexpr,
        BLOCK_W: tl.constexpr,
        ROWS: tl.constexpr,
        NORMALIZE: tl.constexpr,
        NORM_STRIDE: tl.constexpr,
    ):
        """The gradient of the input rows of a (plane, column strip, row chunk), see
        :func:`_store_grad`."""
        pid = tl.program_id(0)
        plane, row0, cols = _program_tile(pid, n_col_blocks, n_row_blocks, ROWS, BLOCK_W)
        col_ok = cols < W
        slots = tl.arange(0, RING)
        scale = tl.load(scale_ptr)
        lo_x, inv_x, lo_y, inv_y, hi_x = _plane_norm(norm_ptr, plane, NORM_STRIDE)
        in_plane = plane.to(tl.int64) * H * W
        d_plane = plane.to(tl.int64) * HO * DS + len(WH) - 1

        b_mu = tl.zeros((RING, BLOCK_W), tl.float32)
        b_xx = tl.zeros((RING, BLOCK_W), tl.float32)
        b_xy = tl.zeros((RING, BLOCK_W), tl.float32)
        sum_gx = tl.zeros((BLOCK_W,), tl.float32)
        sum_g = tl.zeros((BLOCK_W,), tl.float32)
        n_lo = tl.zeros((BLOCK_W,), tl.float32)
        n_hi = tl.zeros((BLOCK_W,), tl.float32)
        row_end = tl.minimum(row0 + ROWS, H)
        # output row o feeds input rows o .. o + KH - 1; input row p is complete after o = p
        for o in range(row0 - KH + 1, row_end):
            h_mu, h_xx, h_xy = _horizontal_transposed(
                d_mu_ptr,
                d_exx_ptr,
                d_exy_ptr,
                d_plane + o * DS + cols,
                (o >= 0) & (o < HO) & col_ok,
                tl.zeros((BLOCK_W,), tl.float32),
                WH,
            )
            # slot s holds input row p = o + ((s - o) mod RING), tap i = p - o
            tap = (slots - o) & (RING - 1)
            wv = tl.load(wv_ptr + tap, mask=tap < KH, other=0.0)[:, None]
            b_mu += wv * h_mu[None, :]
            b_xx += wv * h_xx[None, :]
            b_xy += wv * h_xy[None, :]
            p = o
            done = (slots == (p & (RING - 1)))[:, None]
            g_mu = tl.sum(tl.where(done, b_mu, 0.0), axis=0)
            g_xx = tl.sum(tl.where(done, b_xx, 0.0), axis=0)
            g_xy = tl.sum(tl.where(done, b_xy, 0.0), axis=0)
            b_mu = tl.where(done, 0.0, b_mu)
            b_xx = tl.where(done, 0.0, b_xx)
            b_xy = tl.where(done, 0.0, b_xy)
            sum_gx, sum_g, n_lo, n_hi = _store_grad(
                x_ptr,
                y_ptr,
                grad_ptr,
                in_plane + p * W + cols,
                col_ok & (p >= row0),
                in_plane + p * W + cols,
                col_ok & (p >= row0),
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
                NORMALIZE,
            )
        if NORMALIZE:
            _store_sums(partial_ptr, pid, sum_gx, sum_g, n_lo, n_hi)

    @triton.jit
    def _band(
        wv_ptr, SHIFT: tl.constexpr, KH: tl.constexpr, TILE: tl.constexpr, TRANSPOSE: tl.constexpr
    ):
        """(TILE, TILE) band matrix B[q, k] = wv[k - q + SHIFT] (``TRANSPOSE``: wv[q - k + SHIFT]),
        0 off the window."""
        q = tl.arange(0, TILE)[:, None]
        k = tl.arange(0, TILE)[None, :]
        if TRANSPOSE:
            tap = q - k + SHIFT
        else:
            tap = k - q + SHIFT
        return tl.load(wv_ptr + tap, mask=(tap >= 0) & (tap < KH), other=0.0)

    @triton.jit(do_not_specialize=SIZE_ARGS, do_not_specialize_on_alignment=SLICED_ARGS)
    def _ssim_stats_band_kernel(
        x_ptr,
        y_ptr,
        norm_ptr,
        wv_ptr,
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
        KH: tl.constexpr,
        WH: tl.constexpr,
        TILE: tl.constexpr,
        BLOCK_W: tl.constexpr,
        ROWS: tl.constexpr,
        BACKWARD: tl.constexpr,
        NORMALIZE: tl.constexpr,
        NORM_STRIDE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """
        As :func:`_ssim_stats_kernel`, with the vertical pass on TILE-row tiles.  Input
        block b (rows b .. b + TILE - 1, horizontally filtered) feeds output tile b through
        band ``same`` and output tile b - TILE through band ``cross``; tile b - TILE is then
        complete (windows of at most TILE + 1 taps).
        """
        pid = tl.program_id(0)
        plane, row0, cols = _program_tile(pid, n_col_blocks, n_row_blocks, ROWS, BLOCK_W)
        col_ok = cols < WO
        tr = tl.arange(0, TILE)
        same = _band(wv_ptr, 0, KH, TILE, False)
        cross = _band(wv_ptr, TILE, KH, TILE, False)
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

        p_x = tl.zeros((TILE, BLOCK_W), tl.float32)
        p_y = tl.zeros((TILE, BLOCK_W), tl.float32)
        p_xx = tl.zeros((TILE, BLOCK_W), tl.float32)
        p_yy = tl.zeros((TILE, BLOCK_W), tl.float32)
        p_xy = tl.zeros((TILE, BLOCK_W), tl.float32)
        total = tl.zeros((TILE, BLOCK_W), tl.float32)
        row_end = tl.minimum(row0 + ROWS, HO)
        for b in range(row0, row_end + TILE, TILE):
            rows = b + tr
            # rows past H only reach outputs past HO, which are masked
            h_x, h_y, h_xx, h_yy, h_xy = _horizontal_stats(
                x_plane,
                y_plane,
                rows[:, None] * W + cols[None, :],
                (rows < H)[:, None] & col_ok[None, :],
                lo_x,
                inv_x,
                lo_y,
                inv_y,
                tl.zeros((TILE, BLOCK_W), tl.float32),
                WH,
                NORMALIZE,
            )
            # output tile b - TILE is complete with this block's share
            mu_x = tl.dot(cross, h_x, p_x, input_precision=DOT_PRECISION)
            mu_y = tl.dot(cross, h_y, p_y, input_precision=DOT_PRECISION)
            e_xx = tl.dot(cross, h_xx, p_xx, input_precision=DOT_PRECISION)
            e_yy = tl.dot(cross, h_yy, p_yy, input_precision=DOT_PRECISION)
            e_xy = tl.dot(cross, h_xy, p_xy, input_precision=DOT_PRECISION)
            p_x = tl.dot(same, h_x, input_precision=DOT_PRECISION)
            p_y = tl.dot(same, h_y, input_precision=DOT_PRECISION)
            p_xx = tl.dot(same, h_xx, input_precision=DOT_PRECISION)
            p_yy = tl.dot(same, h_yy, input_precision=DOT_PRECISION)
            p_xy = tl.dot(same, h_xy, input_precision=DOT_PRECISION)

            o = b - TILE + tr
            ok = ((o >= row0) & (o < row_end))[:, None] & col_ok[None, :]
            s, g_mu, g_xx, g_xy = _ssim_and_derivatives(mu_x, mu_y, e_xx, e_yy, e_xy, c1, c2)
            total = _ssim_output(
                d_mu_plane,
                d_exx_plane,
                d_exy_plane,
                o[:, None] * DS + cols[None, :],
                ok,
                s,
                g_mu,
                g_xx,
                g_xy,
                total,
                BACKWARD,
            )
        if not BACKWARD:
            tl.store(partial_ptr + pid, tl.sum(tl.sum(total, axis=1), axis=0))

    @triton.jit(do_not_specialize=SIZE_ARGS, do_not_specialize_on_alignment=SLICED_ARGS)
    def _ssim_grad_band_kernel(
        x_ptr,
        y_ptr,
        norm_ptr,
        d_mu_ptr,
        d_exx_ptr,
        d_exy_ptr,
        wv_ptr,
        scale_ptr,
        grad_ptr,
        partial_ptr,
        H,
        W,
        HO,
        WO,
        DS,
        n_col_blocks,
        n_row_blocks,
        KH: tl.constexpr,
        WH: tl.constexpr,
        TILE: tl.constexpr,
        BLOCK_W: tl.constexpr,
        ROWS: tl.constexpr,
        NORMALIZE: tl.constexpr,
        NORM_STRIDE: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
    ):
        """
        As :func:`_ssim_grad_kernel`, with the transposed vertical pass on TILE-row tiles:
        derivative block d feeds input tile d (band ``same``, transposed) and input tile
        d + TILE (band ``cross``, transposed); tile d is then complete.
        """
        pid = tl.program_id(0)
        plane, row0, cols = _program_tile(pid, n_col_blocks, n_row_blocks, ROWS, BLOCK_W)
        col_ok = cols < W
        tr = tl.arange(0, TILE)
        same = _band(wv_ptr, 0, KH, TILE, True)
        cross = _band(wv_ptr, TILE, KH, TILE, True)
        scale = tl.load(scale_ptr)
        lo_x, inv_x, lo_y, inv_y, hi_x = _plane_norm(norm_ptr, plane, NORM_STRIDE)
        in_plane = plane.to(tl.int64) * H * W
        d_plane = plane.to(tl.int64) * HO * DS + len(WH) - 1

        n_mu = tl.zeros((TILE, BLOCK_W), tl.float32)
        n_xx = tl.zeros((TILE, BLOCK_W), tl.float32)
        n_xy = tl.zeros((TILE, BLOCK_W), tl.float32)
        sum_gx = tl.zeros((TILE, BLOCK_W), tl.float32)
        sum_g = tl.zeros((TILE, BLOCK_W), tl.float32)
        n_lo = tl.zeros((TILE, BLOCK_W), tl.float32)
        n_hi = tl.zeros((TILE, BLOCK_W), tl.float32)
        row_end = tl.minimum(row0 + ROWS, H)
        for d in range(row0 - TILE, row_end, TILE):
            o = d + tr
            h_mu, h_xx, h_xy = _horizontal_transposed(
                d_mu_ptr,
                d_exx_ptr,
                d_exy_ptr,
                d_plane + o[:, None] * DS + cols[None, :],
                ((o >= 0) & (o < HO))[:, None] & col_ok[None, :],
                tl.zeros((TILE, BLOCK_W), tl.float32),
                WH,
            )
            g_mu = tl.dot(same, h_mu, n_mu, input_precision=DOT_PRECISION)
            g_xx = tl.dot(same, h_xx, n_xx, input_precision=DOT_PRECISION)
            g_xy = tl.dot(same, h_xy, n_xy, input_precision=DOT_PRECISION)
            n_mu = tl.dot(cross, h_mu, input_precision=DOT_PRECISION)
            n_xx = tl.dot(cross, h_xx, input_precision=DOT_PRECISION)
            n_xy = tl.dot(cross, h_xy, input_precision=DOT_PRECISION)

            p = d + tr
            ok = ((p >= row0) & (p < row_end))[:, None] & col_ok[None, :]
            sum_gx, sum_g, n_lo, n_hi = _store_grad(
                x_ptr,
                y_ptr,
                grad_ptr,
                in_plane + p[:, None] * W + cols[None, :],
                ok,
                in_plane + p[:, None] * W + cols[None, :],
                ok,
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
                NORMALIZE,
            )
        if NORMALIZE:
            _store_sums(
                partial_ptr,
                pid,
                tl.sum(sum_gx, axis=0),
                tl.sum(sum_g, axis=0),
                tl.sum(n_lo, axis=0),
                tl.sum(n_hi, axis=0),
            )


def _taps_on(window, device) -> torch.Tensor:
    """The vertical taps as a tensor, which the ring and band passes read (the copy from host
    memory makes PyTorch wait for the device; the unrolled pass has them as immediates)."""
    return torch.tensor(window.wv, dtype=torch.float32, device=device)


class VariantKernelConfig(NamedTuple):
    """
    kd_det's ``_KernelConfig`` with a choice of vertical pass: read once per forward (the
    module's VERTICAL_PASS, DOT_PRECISION, BAND_NUM_STAGES and kd_det's tuning constants),
    so that its backward uses the same.  "unrolled" launches kd_det's own kernels.
    """

    vertical_pass: str
    dot_precision: str
    block_w: int
    rows: int
    num_warps: int
    band_num_stages: int
    row_unroll: int

    @classmethod
    def current(cls) -> "VariantKernelConfig":
        if VERTICAL_PASS not in PASSES:
            raise ValueError(
                "ssim_vertical_variants.VERTICAL_PASS must be one of {}, got {!r}".format(
                    ", ".join(PASSES), VERTICAL_PASS
                )
            )
        return cls(
            VERTICAL_PASS,
            DOT_PRECISION,
            ssim_triton.BLOCK_W,
            ssim_triton.ROWS_PER_PROGRAM,
            ssim_triton.NUM_WARPS,
            BAND_NUM_STAGES,
            ssim_triton.ROW_UNROLL,
        )

    def package(self):
        """kd_det's launcher of the same settings (the unrolled pass)."""
        return PackageKernelConfig(self.block_w, self.rows, self.num_warps, self.row_unroll)

    def grid(self, planes, rows, cols):
        return self.package().grid(planes, rows, cols)

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
        """As ``_KernelConfig.launch_stats``, with this config's vertical pass."""
        if self.vertical_pass == "unrolled":
            self.package().launch_stats(
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
            )
            return
        grid, col_blocks, row_blocks = self.grid(planes, ho, wo)
        args = (
            x,
            y,
            norm,
            _taps_on(window, x.device),
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
            col_blocks,
            row_blocks,
        )
        common = dict(
            WH=window.wh,
            BLOCK_W=self.block_w,
            ROWS=self.rows,
            BACKWARD=backward,
            NORMALIZE=normalize,
            NORM_STRIDE=ssim_triton.NORM_STRIDE,
            num_warps=self.num_warps,
        )
        if self.vertical_pass == "band":
            _ssim_stats_band_kernel[(grid,)](
                *args,
                KH=len(window.wv),
                TILE=TILE_ROWS,
                DOT_PRECISION=self.dot_precision,
                num_stages=self.band_num_stages,
                **common
            )
        else:
            _ssim_stats_kernel[(grid,)](*args, KH=len(window.wv), RING=RING, **common)

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
        """As ``_KernelConfig.launch_grad``, with this config's vertical pass."""
        if self.vertical_pass == "unrolled":
            self.package().launch_grad(
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
            )
            return
        grid, col_blocks, row_blocks = self.grid(planes, h, w)
        args = (
            x,
            y,
            norm,
            d_mu,
            d_exx,
            d_exy,
            _taps_on(window, x.device),
            scale,
            grad,
            partial,
            h,
            w,
            ho,
            wo,
            ds,
            col_blocks,
            row_blocks,
        )
        common = dict(
            WH=window.wh,
            BLOCK_W=self.block_w,
            ROWS=self.rows,
            NORMALIZE=normalize,
            NORM_STRIDE=ssim_triton.NORM_STRIDE,
            num_warps=self.num_warps,
        )
        if self.vertical_pass == "band":
            _ssim_grad_band_kernel[(grid,)](
                *args,
                KH=len(window.wv),
                TILE=TILE_ROWS,
                DOT_PRECISION=self.dot_precision,
                num_stages=self.band_num_stages,
                **common
            )
        else:
            _ssim_grad_kernel[(grid,)](*args, KH=len(window.wv), RING=RING, **common)


def use(vertical_pass: str, precision: str = "ieee") -> None:
    """
    Launch ``vertical_pass`` (one of PASSES) in the fused SSIM loss's forwards and backwards
    from now on, with ``precision`` for the band pass's products.
    """
    global VERTICAL_PASS, DOT_PRECISION
    if vertical_pass not in PASSES:
        raise ValueError(
            "vertical pass must be one of {}, got {!r}".format(", ".join(PASSES), vertical_pass)
        )
    VERTICAL_PASS, DOT_PRECISION = vertical_pass, precision
    ssim_triton._KernelConfig = VariantKernelConfig


@contextlib.contextmanager
def vertical_pass(name: str, precision: str = "ieee"):
    """:func:`use` inside the block; afterwards the pass and launcher in use before it."""
    global VERTICAL_PASS, DOT_PRECISION
    saved = VERTICAL_PASS, DOT_PRECISION, ssim_triton._KernelConfig
    use(name, precision)
    try:
        yield
    finally:
        VERTICAL_PASS, DOT_PRECISION, ssim_triton._KernelConfig = saved

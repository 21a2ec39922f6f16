"""Fused SSIM feature loss on the GPU (Triton).

The PyTorch path blurs five maps (x, y, x*x, y*y, x*y) with two depthwise
convolutions and keeps them for backward: about ten feature-sized tensors of
memory traffic and storage per level.  Here one program walks down a strip of
columns of one (image, channel) plane, row by row:

* horizontal pass: the 1-D Gaussian over the row, from shifted loads (L1 hits);
* vertical pass: each filtered row is added, with its tap weight, into a ring of
  16 partial output rows (row ``o`` lives in slot ``o % 16``); once a row has
  received all ``KH`` taps it is complete, is turned into SSIM and summed, and its
  slot is cleared.

Nothing but the input planes is read and only per-program partial sums are
written.  Backward recomputes the statistics the same way and writes the three
SSIM derivatives (w.r.t. the local mean of x, E[x^2] and E[xy]) of each output
position; a second sliding kernel applies the transposed window to them and
combines them with x and y into the gradient.  Only the student gets a
gradient: the teacher is a constant in distillation.

Values match :func:`kd_det.losses.ssim.ssim_map` (same valid window, same
formula, fp32 accumulation); ``tests/test_ssim_triton.py`` checks values and
gradients on the GPU.
"""

import torch

from .ssim import effective_window_sizes, gaussian_window_1d

try:  # Triton ships with CUDA builds of PyTorch; CPU-only installs may lack it.
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - depends on the install
    triton = None

__all__ = ["is_available", "fused_ssim_feature_loss", "MAX_WINDOW"]

RING = 16  # slots of the vertical ring: windows up to 15 taps
MAX_WINDOW = RING - 1
BLOCK_W = 128  # columns per program
ROWS_PER_PROGRAM = 64
NUM_WARPS = 4


def is_available() -> bool:
    return triton is not None and torch.cuda.is_available()


if triton is not None:

    @triton.jit
    def _ssim_stats_kernel(
        x_ptr, y_ptr, wh_ptr, wv_ptr, c1_ptr, c2_ptr,
        partial_ptr, d_mu_ptr, d_exx_ptr, d_exy_ptr,
        H, W, HO, WO, n_col_blocks, n_row_blocks,
        KH: tl.constexpr, KW: tl.constexpr, RING: tl.constexpr, BLOCK_W: tl.constexpr,
        ROWS: tl.constexpr, BACKWARD: tl.constexpr,
    ):
        """Per output position of a (plane, column strip, row chunk): SSIM (sum) or its derivatives."""
        pid = tl.program_id(0)
        plane = pid // (n_col_blocks * n_row_blocks)
        rest = pid % (n_col_blocks * n_row_blocks)
        row0 = (rest // n_col_blocks) * ROWS
        cols = (rest % n_col_blocks) * BLOCK_W + tl.arange(0, BLOCK_W)
        col_ok = cols < WO
        slots = tl.arange(0, RING)
        c1 = tl.load(c1_ptr + plane)
        c2 = tl.load(c2_ptr + plane)
        x_plane = x_ptr + plane.to(tl.int64) * H * W
        y_plane = y_ptr + plane.to(tl.int64) * H * W
        o_plane = plane.to(tl.int64) * HO * WO

        a_x = tl.zeros((RING, BLOCK_W), tl.float32)
        a_y = tl.zeros((RING, BLOCK_W), tl.float32)
        a_xx = tl.zeros((RING, BLOCK_W), tl.float32)
        a_yy = tl.zeros((RING, BLOCK_W), tl.float32)
        a_xy = tl.zeros((RING, BLOCK_W), tl.float32)
        total = tl.zeros((BLOCK_W,), tl.float32)
        row_end = tl.minimum(row0 + ROWS, HO)
        for r in range(row0, row_end + KH - 1):
            # horizontal pass over input row r
            h_x = tl.zeros((BLOCK_W,), tl.float32)
            h_y = tl.zeros((BLOCK_W,), tl.float32)
            h_xx = tl.zeros((BLOCK_W,), tl.float32)
            h_yy = tl.zeros((BLOCK_W,), tl.float32)
            h_xy = tl.zeros((BLOCK_W,), tl.float32)
            for j in tl.static_range(KW):
                w = tl.load(wh_ptr + j)
                xv = tl.load(x_plane + r * W + cols + j, mask=col_ok, other=0.0).to(tl.float32)
                yv = tl.load(y_plane + r * W + cols + j, mask=col_ok, other=0.0).to(tl.float32)
                h_x += w * xv
                h_y += w * yv
                h_xx += w * xv * xv
                h_yy += w * yv * yv
                h_xy += w * xv * yv
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

            n1 = 2.0 * mu_x * mu_y + c1
            n2 = 2.0 * (e_xy - mu_x * mu_y) + c2
            d1 = mu_x * mu_x + mu_y * mu_y + c1
            d2 = (e_xx - mu_x * mu_x) + (e_yy - mu_y * mu_y) + c2
            den = d1 * d2
            s = n1 * n2 / den
            ok = col_ok & (o >= row0)
            if BACKWARD:
                # dS/d mu_x, dS/d E[x^2], dS/d E[xy] (mu_y, E[y^2] are the teacher's)
                g_mu = 2.0 * mu_y * (n2 - n1) / den - 2.0 * mu_x * s * (d2 - d1) / den
                g_xx = -s / d2
                g_xy = 2.0 * n1 / den
                offs = o_plane + o * WO + cols
                tl.store(d_mu_ptr + offs, g_mu, mask=ok)
                tl.store(d_exx_ptr + offs, g_xx, mask=ok)
                tl.store(d_exy_ptr + offs, g_xy, mask=ok)
            else:
                total += tl.where(ok, s, 0.0)
        if not BACKWARD:
            tl.store(partial_ptr + pid, tl.sum(total, axis=0))

    @triton.jit
    def _ssim_grad_kernel(
        x_ptr, y_ptr, d_mu_ptr, d_exx_ptr, d_exy_ptr, wh_ptr, wv_ptr, scale_ptr, grad_ptr,
        H, W, HO, WO, n_col_blocks, n_row_blocks,
        KH: tl.constexpr, KW: tl.constexpr, RING: tl.constexpr, BLOCK_W: tl.constexpr,
        ROWS: tl.constexpr,
    ):
        """grad_x = scale * (W^T d_mu + 2 x W^T d_exx + y W^T d_exy), W^T the transposed window."""
        pid = tl.program_id(0)
        plane = pid // (n_col_blocks * n_row_blocks)
        rest = pid % (n_col_blocks * n_row_blocks)
        row0 = (rest // n_col_blocks) * ROWS
        cols = (rest % n_col_blocks) * BLOCK_W + tl.arange(0, BLOCK_W)
        col_ok = cols < W
        slots = tl.arange(0, RING)
        scale = tl.load(scale_ptr)
        in_plane = plane.to(tl.int64) * H * W
        o_plane = plane.to(tl.int64) * HO * WO

        b_mu = tl.zeros((RING, BLOCK_W), tl.float32)
        b_xx = tl.zeros((RING, BLOCK_W), tl.float32)
        b_xy = tl.zeros((RING, BLOCK_W), tl.float32)
        row_end = tl.minimum(row0 + ROWS, H)
        # output row o feeds input rows o .. o + KH - 1; input row p is complete after o = p
        for o in range(row0 - KH + 1, row_end):
            h_mu = tl.zeros((BLOCK_W,), tl.float32)
            h_xx = tl.zeros((BLOCK_W,), tl.float32)
            h_xy = tl.zeros((BLOCK_W,), tl.float32)
            row_ok = (o >= 0) & (o < HO)
            for j in tl.static_range(KW):
                w = tl.load(wh_ptr + j)
                src = cols - j
                m = row_ok & (src >= 0) & (src < WO)
                offs = o_plane + o * WO + src
                h_mu += w * tl.load(d_mu_ptr + offs, mask=m, other=0.0)
                h_xx += w * tl.load(d_exx_ptr + offs, mask=m, other=0.0)
                h_xy += w * tl.load(d_exy_ptr + offs, mask=m, other=0.0)
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
            ok = col_ok & (p >= row0)
            offs = in_plane + p * W + cols
            xv = tl.load(x_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            yv = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
            g = scale * (g_mu + 2.0 * xv * g_xx + yv * g_xy)
            tl.store(grad_ptr + offs, g.to(grad_ptr.dtype.element_ty), mask=ok)


def _launch_shape(h, w, ho, wo):
    col_blocks = triton.cdiv(wo, BLOCK_W)
    row_blocks = triton.cdiv(ho, ROWS_PER_PROGRAM)
    return col_blocks, row_blocks


def _plane_constants(value, planes: int, device) -> torch.Tensor:
    """c1/c2 as one fp32 value per (image, channel) plane."""
    t = torch.as_tensor(value, dtype=torch.float32, device=device)
    return t.expand(planes).contiguous() if t.dim() == 0 else t.reshape(planes).contiguous()


class _FusedSSIMMean(torch.autograd.Function):
    """mean over planes and valid positions of SSIM(x, y); gradient for x only."""

    @staticmethod
    def forward(ctx, x, y, window_size, sigma, c1, c2):
        n, c, h, w = x.shape
        kh, kw = effective_window_sizes(h, w, window_size)
        ho, wo = h - kh + 1, w - kw + 1
        x, y = x.contiguous(), y.contiguous()
        wh = gaussian_window_1d(kw, sigma, x.device)
        wv = gaussian_window_1d(kh, sigma, x.device)
        planes = n * c
        c1 = _plane_constants(c1, planes, x.device)
        c2 = _plane_constants(c2, planes, x.device)
        col_blocks, row_blocks = triton.cdiv(wo, BLOCK_W), triton.cdiv(ho, ROWS_PER_PROGRAM)
        grid = planes * col_blocks * row_blocks
        partial = torch.empty(grid, dtype=torch.float32, device=x.device)
        _ssim_stats_kernel[(grid,)](
            x, y, wh, wv, c1, c2, partial, partial, partial, partial,
            h, w, ho, wo, col_blocks, row_blocks,
            KH=kh, KW=kw, RING=RING, BLOCK_W=BLOCK_W, ROWS=ROWS_PER_PROGRAM, BACKWARD=False, num_warps=NUM_WARPS,
        )
        count = planes * ho * wo
        ctx.save_for_backward(x, y, wh, wv, c1, c2)
        ctx.shape = (h, w, ho, wo, kh, kw, count)
        return (partial.sum() / count).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        x, y, wh, wv, c1, c2 = ctx.saved_tensors
        h, w, ho, wo, kh, kw, count = ctx.shape
        planes = x.shape[0] * x.shape[1]
        d_mu = torch.empty((planes, ho, wo), dtype=torch.float32, device=x.device)
        d_exx = torch.empty_like(d_mu)
        d_exy = torch.empty_like(d_mu)
        col_blocks, row_blocks = triton.cdiv(wo, BLOCK_W), triton.cdiv(ho, ROWS_PER_PROGRAM)
        _ssim_stats_kernel[(planes * col_blocks * row_blocks,)](
            x, y, wh, wv, c1, c2, d_mu, d_mu, d_exx, d_exy,
            h, w, ho, wo, col_blocks, row_blocks,
            KH=kh, KW=kw, RING=RING, BLOCK_W=BLOCK_W, ROWS=ROWS_PER_PROGRAM, BACKWARD=True, num_warps=NUM_WARPS,
        )
        scale = (grad_out.float() / count).reshape(1)
        grad = torch.empty_like(x)
        col_blocks, row_blocks = triton.cdiv(w, BLOCK_W), triton.cdiv(h, ROWS_PER_PROGRAM)
        _ssim_grad_kernel[(planes * col_blocks * row_blocks,)](
            x, y, d_mu, d_exx, d_exy, wh, wv, scale, grad,
            h, w, ho, wo, col_blocks, row_blocks,
            KH=kh, KW=kw, RING=RING, BLOCK_W=BLOCK_W, ROWS=ROWS_PER_PROGRAM, num_warps=NUM_WARPS,
        )
        return grad, None, None, None, None, None


def fused_ssim_mean(x, y, window_size=11, sigma=1.5, c1=0.01**2, c2=0.03**2) -> torch.Tensor:
    """
    Mean SSIM of (N, C, H, W) CUDA tensors ``x`` (gets a gradient) and ``y``
    (constant), equal to ``ssim_map(x, y, ...).mean()``.  ``c1``/``c2``: scalars
    or per-plane tensors of N*C values.
    """
    if window_size > MAX_WINDOW:
        raise ValueError("the fused SSIM kernel supports windows up to {} taps".format(MAX_WINDOW))
    return _FusedSSIMMean.apply(x, y.detach(), window_size, sigma, c1, c2)


def fused_ssim_feature_loss(student, teacher, window_size, sigma, k1, k2, normalize) -> torch.Tensor:
    """One level of :class:`SSIMFeatureLoss`: ``(1 - mean SSIM) / 2``, fused on the GPU."""
    from .ssim import minmax_normalize

    teacher = teacher.detach()
    if normalize == "minmax":
        student, teacher = minmax_normalize(student), minmax_normalize(teacher)
        c1, c2 = k1**2, k2**2
    else:
        flat = teacher.flatten(2)
        value_range = (flat.amax(dim=2) - flat.amin(dim=2)).clamp_min(1e-6).flatten()
        c1, c2 = (k1 * value_range) ** 2, (k2 * value_range) ** 2
    return (1.0 - fused_ssim_mean(student, teacher, window_size, sigma, c1, c2)) / 2.0

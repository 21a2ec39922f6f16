"""Tuning sweep of the fused SSIM kernel's block sizes (forward and backward timed apart)."""
import itertools
import torch
from kd_det.losses import ssim_triton

shapes = [(8, 256, 200, 336), (8, 256, 100, 168), (8, 256, 50, 84), (8, 256, 25, 42), (8, 256, 13, 21)]
xs = [torch.rand(s, device="cuda").requires_grad_() for s in shapes]
ys = [torch.rand(s, device="cuda") for s in shapes]


def bench(fn, reps=5):
    fn(); torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record(); torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


for bw, rows, warps in itertools.product([32, 64, 128, 256], [32, 64, 128], [1, 2, 4, 8]):
    if bw // (32 * warps) < 1:
        continue
    ssim_triton.BLOCK_W, ssim_triton.ROWS_PER_PROGRAM, ssim_triton.NUM_WARPS = bw, rows, warps
    fwd = bench(lambda: [ssim_triton.fused_ssim_mean(x, y) for x, y in zip(xs, ys)])
    def both(normalize=False):
        total = sum(ssim_triton.fused_ssim_mean(x, y, normalize=normalize) for x, y in zip(xs, ys))
        total.backward()
    tot = bench(both)
    tot_minmax = bench(lambda: both(normalize=True))
    print("BLOCK_W {:4d} ROWS {:4d} warps {}: forward {:6.2f} ms  forward+backward {:6.2f} ms  "
          "with min-max normalisation {:6.2f} ms".format(bw, rows, warps, fwd, tot, tot_minmax), flush=True)

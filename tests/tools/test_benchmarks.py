"""The GPU benchmarks' scripts, on the CPU: they run, and their plans are what the GPU session
expects."""

import os
import runpy

import pytest
from conftest import REPO

BENCHMARKS = os.path.join(REPO, "benchmarks")


@pytest.fixture(autouse=True)
def beside_the_scripts(monkeypatch):
    """The scripts import their neighbours (ssim_vertical_variants.py), as when run by path."""
    monkeypatch.syspath_prepend(BENCHMARKS)


def _script(name):
    return runpy.run_path(os.path.join(BENCHMARKS, name), run_name="bench")


def test_bench_ssim_reports_the_bandwidth_floor():
    result = _script("bench_ssim.py")["main"](
        ["--device", "cpu", "--shape", "small", "--reps", "2"]
    )
    rows = {r["impl"]: r for r in result["rows"]}
    assert rows["kd_det-torch"]["rel_diff"] == 0.0
    assert result["copy_bandwidth_GBps"] > 0 and result["floor_ms"] > 0
    # no implementation moves the data faster than a plain copy of it
    assert all(r["x_floor"] > 1 for r in result["rows"]), result["rows"]
    assert "SSIMFeatureLoss[torch]" in rows


def test_sweep_tries_narrow_strips_of_every_pass_first():
    sweep = _script("sweep_ssim_triton.py")

    class Args:  # the sweep's default grid
        passes = ["unrolled", "band", "ring"]
        block_w, rows, warps, band_warps = [32, 64, 128], [128], [1, 2, 4, 8], [4, 8]
        precisions, row_unroll = ["ieee", "tf32x3"], [4, 2]

    configs = sweep["configurations"](Args)
    widths = [c[2] for c in configs]
    assert widths == sorted(widths)
    assert configs[0] == ("unrolled", 4, 32, 128, 1, "-")
    assert {c[0] for c in configs if c[2] == 32} == {"unrolled", "band", "ring"}
    # no layout with more threads than columns, except the band pass's tiles
    assert all(c[2] >= 32 * c[4] for c in configs if c[0] != "band")


def test_bench_step_times_the_fused_ssim_against_pytorch_on_cuda():
    step = _script("bench_step.py")
    methods = step["ARCHS"]["retinanet"][2]
    runs = {name: opts for name, _, opts in step["method_runs"](methods, "cuda")}
    assert runs["ssim"] == [] and runs["ssim[torch]"] == ["KD.SSIM.IMPL", "torch"]
    assert "ssim[torch]" not in {name for name, _, _ in step["method_runs"](methods, "cpu")}


def test_vertical_variants_refuse_an_unknown_pass():
    """The benchmarks' pass selection names the passes it has (no kernel runs)."""
    import ssim_vertical_variants as variants

    from kd_det.losses import ssim_triton

    with pytest.raises(ValueError, match="unrolled, ring, band"):
        variants.use("rows")
    with variants.vertical_pass("ring"):
        assert ssim_triton._KernelConfig.current().vertical_pass == "ring"
        variants.VERTICAL_PASS = "rows"  # set by hand: the block restores it
        with pytest.raises(ValueError, match="VERTICAL_PASS"):
            ssim_triton._KernelConfig.current()
    # afterwards kd_det launches its own pass again
    assert ssim_triton._KernelConfig is variants.PackageKernelConfig
    assert variants.VERTICAL_PASS == "unrolled"


def test_bench_image_check_projects_the_first_and_the_cached_run(tmp_path):
    numbers = _script("bench_image_check.py")["main"](
        ["--num", "3", "--total", "12", "--processes", "1", "--workdir", str(tmp_path)]
    )
    assert numbers["images"] == 3 and numbers["images_per_s"] > 0
    assert numbers["projected_first_run_s"] == pytest.approx(
        12 / numbers["images_per_s"], rel=0.05, abs=0.1
    )
    assert numbers["cached_run_s"] >= 0 and numbers["cache_file_mb"] >= 0

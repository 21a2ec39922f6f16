#!/usr/bin/env bash
# On the lent GPU machine (device tool), from the repository root, with .whl carried:
#
#   bash benchmarks/gpu/run_suite.sh tests sanitize ssim profile sweep step step-fast accuracy-faster_rcnn accuracy-retinanet
#
# Installs the carried wheels (benchmarks/gpu/prepare_wheels.sh) into a private folder
# without touching the image's packages, then runs the named stages in order.  Every
# stage's output goes to $OUT/suite.log (also printed, last lines per stage), JSON
# results to $OUT/<stage>.json: few files, as the device tool brings back at most 8.
set -uo pipefail
OUT=${OUT:-/tmp/kd_det_gpu_out}
mkdir -p "$OUT"
LOG="$OUT/suite.log"
SITE=/tmp/kd_det_site
PY=${PY:-python3}
if [ ! -d "$SITE/detectron2" ]; then
    "$PY" -m pip install -q --no-index --no-deps --target "$SITE" .whl/*.whl >>"$LOG" 2>&1 || {
        tail -n 40 "$LOG"; exit 1; }
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c "import sys, torch, triton; print(sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__)"
} >>"$LOG" 2>&1

# The kernel tests compile about 27 kernels per vertical pass (seconds each, one at a
# time in a process): one pytest process per pass, side by side, and one for the tests
# of no pass (the four selections partition the file).  --ssim-variants: the ring and
# band passes of benchmarks/ssim_vertical_variants.py too (make test runs "unrolled" only).
run_tests() {
    local rc=0 i=0 pids=() sel
    local selections=("unrolled" "band" "ring" "not unrolled and not band and not ring")
    for sel in "${selections[@]}"; do
        "$PY" -m pytest -q -p no:cacheprovider tests/losses/test_ssim_triton.py --ssim-variants -k "$sel" \
            >"/tmp/kd_det_tests_$i.log" 2>&1 &
        pids+=($!)
        i=$((i + 1))
    done
    for i in "${!pids[@]}"; do
        wait "${pids[$i]}" || rc=$?
        echo "--- tests/losses/test_ssim_triton.py -k '${selections[$i]}'"
        tail -n 30 "/tmp/kd_det_tests_$i.log"
    done
    "$PY" -m pytest -q -p no:cacheprovider tests/losses/test_losses.py || rc=$?
    return $rc
}

status=0
for stage in "$@"; do
    start=$(date +%s)
    echo "===== $stage" >>"$LOG"
    case "$stage" in
        tests)    run_tests ;;
        ssim)     "$PY" benchmarks/bench_ssim.py --json "$OUT/ssim.json" ;;
        sweep)    "$PY" benchmarks/sweep_ssim_triton.py --json "$OUT/sweep.json" ;;
        profile)  "$PY" benchmarks/profile_ssim_triton.py --json "$OUT/profile.json" ;;
        # memcheck of the kernels on exact-size allocations (the caching allocator's blocks
        # would hide reads past a tensor's end); tests/losses/interpreter_bounds.py checks the same
        # on the CPU, at the interpreter's block sizes
        sanitize) PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck --error-exitcode 9 \
                      --print-limit 20 "$PY" -m pytest -q -p no:cacheprovider tests/losses/test_ssim_triton.py \
                      --ssim-variants \
                      -k "mean_and_grad or half_precision or non_contiguous or fpn_features" ;;
        step)     "$PY" benchmarks/bench_step.py --json "$OUT/step.json" ;;
        step-fast) "$PY" benchmarks/bench_step.py --teacher-autocast bf16 --channels-last --json "$OUT/step-fast.json" ;;
        accuracy-*) "$PY" benchmarks/bench_accuracy.py --setting gpu --arch "${stage#accuracy-}" \
                        --output-root /tmp/kd_det_bench_accuracy --json "$OUT/$stage.json" ;;
        *) echo "unknown stage $stage (tests sanitize ssim profile sweep step step-fast accuracy-<arch>)"; false ;;
    esac >>"$LOG" 2>&1
    rc=$?
    [ $rc -eq 0 ] || status=$rc
    echo "===== $stage: exit $rc, $(( $(date +%s) - start )) s" >>"$LOG"
    sed -n "/^===== $stage\$/,\$p" "$LOG" | tail -n 40
done
exit $status

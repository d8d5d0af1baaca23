#!/usr/bin/env bash
# GPU checks in one run: the gpu-marked tests at the paper's shapes, the kernel benchmarks (JSON for `python -m bench`),
# the CPU-sized kernel tests compiled for CUDA, and the FlexAttention comparison last (slowest to build).
#
#   PYTHONPATH=. bash scripts/gpu_check.sh        # from the repo root; results in ${OUT:-./gpu_results}
#
# Uses `python3` from PATH (the GPU machine has no venv; the package need not be installed). Every step has a time
# limit cut from one overall budget (GPU_CHECK_SECONDS, default 470 s, under 8 minutes on an H100), so a slow or
# hanging step cannot starve the rest; a failed step is reported and the script goes on, exiting non-zero at the end.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS="${OUT:-./gpu_results}"
mkdir -p "$RESULTS"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECK_SECONDS:-470}"
START=$SECONDS
FAILED=()

# run NAME MAX_SECONDS CMD...: at most MAX_SECONDS and never past the overall budget; output to $RESULTS/NAME.log
run() {
    local name=$1 max=$2 left
    shift 2
    left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        echo "== $name: skipped, budget spent" | tee "$RESULTS/$name.log"
        FAILED+=("$name(no time)")
        return
    fi
    if ((max > left)); then max=$left; fi
    echo "== $name (limit ${max}s): $*"
    local rc=0
    timeout --kill-after=10 "$max" "$@" 2>&1 | tee "$RESULTS/$name.log" || rc=$?
    if ((rc == 0 || rc == 5)); then  # pytest's 5: nothing selected (e.g. no FlexAttention in this torch)
        echo "== $name: ok after $((SECONDS - START))s"
    else
        echo "== $name: FAILED (exit $rc; 124 = time limit)"
        FAILED+=("$name($rc)")
    fi
}

BENCH_OPTS=(--benchmark-min-rounds=10 --benchmark-max-time=0.25 --benchmark-warmup=on --benchmark-warmup-iterations=3
            --benchmark-disable-gc --benchmark-sort=name --benchmark-columns=min,median,mean,stddev,rounds -q)

run env 30 bash -c 'nvidia-smi -L; python3 -c "import sys, torch, triton; print(sys.version.split()[0], \
torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())"; python3 -m pip list 2>/dev/null \
| grep -i -E "^(torch|triton|pytest|pytest-benchmark|xformers) " || true'
run gpu_tests 180 python3 -m pytest -m gpu tests/ -q
run bench 180 python3 -m pytest bench/test_kernels.py -k "not flex" --benchmark-json="$RESULTS/bench_kernels.json" \
    "${BENCH_OPTS[@]}"
# End-to-end latency of every backend on the paper's student (random weights: latency only, say so in the
# results). Reads the kernel JSON the previous step wrote; carry data/bench-synthetic-2 to the GPU machine.
run bench_e2e 240 python3 -m bench --device cuda --config vitl16_512 --checkpoint none --quick --no-kernels \
    --backends torch-fp32,torch-bf16,torch-fp16,torch-triton-fp32,torch-triton-bf16,ort-fp32,ort-fp16,trt-fp16 \
    --kernels-json "$RESULTS/bench_kernels.json" --out "$RESULTS" --overwrite
run kernel_tests 120 python3 -m pytest tests/test_kernels.py -m "not gpu" -q
run bench_flex 150 python3 -m pytest bench/test_kernels.py -k flex --benchmark-json="$RESULTS/bench_kernels_flex.json" \
    "${BENCH_OPTS[@]}"

echo "== done in $((SECONDS - START))s; results in $RESULTS"
if ((${#FAILED[@]})); then
    echo "== failed: ${FAILED[*]}"
    exit 1
fi

#!/usr/bin/env bash
# GPU checks in one run: the gpu-marked tests at the paper's shapes, the kernel benchmarks (JSON for `python -m bench`),
# the CPU-sized kernel tests compiled for CUDA, the end-to-end backend benchmark of the paper's student, and the
# FlexAttention comparison last (slowest to build).
#
#   bash scripts/gpu_check.sh [STEP ...]     # from anywhere; results in ${OUT:-./gpu_results}
#
# A 15-minute GPU slot (the machine's start, ~2-3 minutes, included) holds ONE call of at most ~9 minutes: a second
# call risks the machine's release between calls (30 s idle) and another start, and a step may overrun its limit
# by 30 s (SIGINT, then SIGKILL). The kernel benchmark and the end-to-end report in one call, the report picking up
# the kernel JSON of the same run (the evaluation images are drawn there in seconds; nothing needs carrying):
#   E2E_BATCH=1 E2E_BACKENDS=torch-fp32,torch-bf16,torch-bf16-pure,torch-triton-bf16,torch-triton-bf16-graphs,\
#   torch-compile-triton-bf16 GPU_CHECK_SECONDS=540 bash scripts/gpu_check.sh env dynamo bench bench_e2e
#   (timeout_s 590)
# Each torch.compile backend takes ~130 s per batch size, so the e2e step's 270 s holds one of them at batch 1
# beside the eager and CUDA-graph backends. op_profile (~150 s) needs a slot of its own.
#
# STEPs, run in this order: env dynamo gpu_tests bench host_profile compile_overhead op_profile bench_e2e bench_flex
# kernel_tests. dynamo (~20 s, no GPU work) checks this machine's Dynamo on the model: the compiled graphs take the
# kernel operators and the paper's student compiles in one graph (torch 2.11 folded is_exporting() to True and could
# not trace `not ModuleList`: both silently, caught on a CPU copy of its torch). The default is the kernel check (all but compile_overhead and bench_e2e, ~7 minutes on an H100);
# bench_e2e, the end-to-end benchmark of the ViT-L student, takes up to 7 minutes more and is run by naming it.
# host_profile (~20 s)
# splits the host time of one kernel call (issue rate, synchronised rate, cProfile; direct launches beside Triton's
# own dispatch and SDPA) into host_profile.md. op_profile (~2 minutes) books the GPU time of one ViT-L student
# forward (Triton attention, bf16 autocast and the whole model in bf16, batch 1 and 8) to its modules and kernels,
# beside each module's ideal time, into op_profile.md.
# All output goes to one log, gpu_check.log, beside the benchmark JSON files and the `python -m bench` report (few
# files, so that a results folder fetched from a remote machine stays small).
# Uses `python3` from PATH (the GPU machine has no venv; the package need not be installed). Every step has a time
# limit cut from one overall budget (GPU_CHECK_SECONDS, default 470 s, under 8 minutes on an H100), so a slow or
# hanging step cannot starve the rest; a failed step is reported and the script goes on, exiting non-zero at the end.
# A step at its limit gets SIGINT first (Ctrl-C: pytest stops after the test in progress and still saves its
# benchmark JSON, and `python -m bench` still writes its report of what ran), then SIGKILL 30 s later.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
RESULTS="${OUT:-./gpu_results}"
mkdir -p "$RESULTS"
export PYTHONPATH="$(pwd)${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
BUDGET="${GPU_CHECK_SECONDS:-470}"
START=$SECONDS
FAILED=()
LOG="$RESULTS/gpu_check.log"
: >"$LOG"
STEPS=("$@")
((${#STEPS[@]})) || STEPS=(env dynamo gpu_tests bench host_profile op_profile bench_flex kernel_tests)
wanted() { [[ " ${STEPS[*]} " == *" $1 "* ]]; }

# run NAME MAX_SECONDS CMD...: at most MAX_SECONDS and never past the overall budget; output appended to $LOG
run() {
    local name=$1 max=$2 left
    shift 2
    wanted "$name" || return 0
    left=$((BUDGET - (SECONDS - START)))
    if ((left < 20)); then
        echo "== $name: skipped, budget spent" | tee -a "$LOG"
        FAILED+=("$name(no time)")
        return
    fi
    if ((max > left)); then max=$left; fi
    echo "== $name (limit ${max}s): $*" | tee -a "$LOG"
    local rc=0
    # STEP_SECONDS tells a step its own limit (bench_e2e passes it on as --time-limit, less a margin for its report).
    STEP_SECONDS=$max timeout --signal=INT --kill-after=30 "$max" "$@" 2>&1 | tee -a "$LOG" || rc=$?
    if ((rc == 0 || rc == 5)); then  # pytest's 5: nothing selected (e.g. no FlexAttention in this torch)
        echo "== $name: ok after $((SECONDS - START))s" | tee -a "$LOG"
    elif ((rc == 124)); then
        echo "== $name: STOPPED at its time limit after $((SECONDS - START))s (what finished is saved)" \
            | tee -a "$LOG"
        FAILED+=("$name(time limit)")
    elif ((rc == 137)); then  # still running 30 s after the SIGINT: timeout's SIGKILL
        echo "== $name: KILLED 30 s after its time limit, at $((SECONDS - START))s (files written before are kept)" \
            | tee -a "$LOG"
        FAILED+=("$name(killed)")
    else
        echo "== $name: FAILED (exit $rc) after $((SECONDS - START))s" | tee -a "$LOG"
        FAILED+=("$name($rc)")
    fi
}

BENCH_OPTS=(--benchmark-min-rounds=10 --benchmark-max-time=0.25 --benchmark-warmup=on --benchmark-warmup-iterations=3
            --benchmark-disable-gc --benchmark-sort=name --benchmark-columns=min,median,mean,stddev,rounds -q)

run env 30 bash -c 'nvidia-smi -L; python3 -c "import sys, torch, triton; print(sys.version.split()[0], \
torch.__version__, \"triton\", triton.__version__, torch.cuda.get_device_name())"; python3 -m pip list 2>/dev/null \
| grep -i -E "^(torch|triton|pytest|pytest-benchmark|xformers) " || true'
# What this torch's Dynamo makes of the model (fake tensors and a probe: seconds, no kernel runs).
run dynamo 60 python3 -m pytest -q -p no:cacheprovider \
    "tests/test_kernel_ops.py::test_compiled_graphs_take_the_kernels_only_when_named_and_without_gradients" \
    tests/test_kernel_ops.py::test_exports_never_take_the_kernels \
    tests/test_kernel_ops.py::test_the_paper_student_compiles_to_one_graph_with_every_kernel_operator
# Only test_kernels.py and test_layers.py hold gpu tests; collecting all of tests/ would import diffusers, absent on
# the GPU image.
# Correctness runs use one fixed config per kernel (QD_TRITON_AUTOTUNE=0): compiling every autotune config for each
# dtype and shape took minutes. The bench step autotunes, and checks the chosen configs' outputs and gradients.
run gpu_tests 180 env QD_TRITON_AUTOTUNE=0 python3 -m pytest -m gpu tests/test_kernels.py \
    tests/test_layers.py -q -p no:cacheprovider
run bench 240 python3 -m pytest bench/test_kernels.py -k "not flex" --benchmark-json="$RESULTS/bench_kernels.json" \
    "${BENCH_OPTS[@]}"
# Host cost does not depend on the tile config: one fixed config each, no autotuning to wait for.
run host_profile 60 env QD_TRITON_AUTOTUNE=0 python3 -m bench.host_profile --calls 200 --out "$RESULTS/host_profile.md"
# Dynamo's host cost per call of the compiled ViT-L student, with and without module guards (~30 s; run by naming it).
run compile_overhead 60 python3 -m pytest bench/test_compile_overhead.py -p no:cacheprovider \
    --benchmark-json="$RESULTS/bench_compile_overhead.json" "${BENCH_OPTS[@]}"
# Where the student's forward spends its GPU time (random weights; the evaluation images are drawn if absent).
# Autocast (torch-triton-bf16) against the whole model in bf16 (the graphs backend's eager twin), each module beside
# its ideal time on the GPU (bench.roofline).
run op_profile 150 python3 -m bench.op_profile --device cuda --config vitl16_512 \
    --backend torch-triton-bf16 torch-triton-bf16-graphs --batch 1 8 --out "$RESULTS/op_profile.md"
# End-to-end latency of every backend on the paper's student (random weights: latency only, the report says so).
# Includes the kernel JSON of the bench step of the same call when there is one.
# (KERNELS_JSON names one from an earlier run instead.) On an H100 the eager and CUDA-graph backends take ~90 s
# together (model build included) and torch-compile-bf16 ~130 s per batch size (Inductor + graph capture), so the
# whole list does not fit 420 s: --time-limit skips the tests that would end past the step's limit, less 60 s for
# the report, and the report lists them (a run stopped by signal during a compilation was killed before its report
# was written). E2E_BACKENDS picks the backends (comma-separated) and E2E_BATCH the larger batch (default 8; 1 times
# batch 1 only: both compiled backends then fit, ~130 s each).
KERNEL_JSON=()
KJ="${KERNELS_JSON:-$RESULTS/bench_kernels.json}"
if [[ -f "$KJ" ]]; then
    KERNEL_JSON=(--kernels-json "$KJ")
elif wanted bench_e2e; then
    echo "== bench_e2e: no kernel JSON ($KJ): the report will have no kernel table (set KERNELS_JSON)" | tee -a "$LOG"
fi
run bench_e2e 420 bash -c 'python3 -m bench --time-limit $((STEP_SECONDS > 120 ? STEP_SECONDS - 60 : 60)) "$@"' e2e \
    --device cuda --config vitl16_512 --checkpoint none --quick --no-kernels \
    --images 8 --batch "${E2E_BATCH:-8}" --backends "${E2E_BACKENDS:-torch-fp32,torch-bf16,torch-fp16,torch-bf16-pure,\
torch-triton-fp32,torch-triton-bf16,torch-triton-bf16-graphs,torch-compile-bf16,torch-compile-triton-bf16,ort-fp32,ort-fp16,\
trt-fp16}" "${KERNEL_JSON[@]}" \
    --out "$RESULTS" --overwrite
run bench_flex 150 python3 -m pytest bench/test_kernels.py -k flex --benchmark-json="$RESULTS/bench_kernels_flex.json" \
    "${BENCH_OPTS[@]}"
# Last: every kernel test at the CPU shapes, compiled (each new shape autotunes; may not all fit the budget).
run kernel_tests 150 env QD_TRITON_AUTOTUNE=0 python3 -m pytest tests/test_kernels.py -m "not gpu" -q \
    -p no:cacheprovider

echo "== done in $((SECONDS - START))s; results in $RESULTS" | tee -a "$LOG"
if ((${#FAILED[@]})); then
    echo "== failed: ${FAILED[*]}" | tee -a "$LOG"
    exit 1
fi

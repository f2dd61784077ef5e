#!/usr/bin/env bash
# The GPU check, for any machine with an NVIDIA GPU, a preinstalled torch and no network:
#
#   bash bench/gpu_check.sh OUT_DIR
#
# Steps, by value: probe the GPU; build in place for the visible GPU's arch only (pip, no build
# isolation, no downloads; timed); `qwen-kernels info`; the GPU tests of the ops and the encoder
# (junit XML in OUT_DIR, stopping at the first failure); the heart benchmarks, window attention
# and the encoder end to end (OUT_DIR/bench-heart); compute-sanitizer memcheck and racecheck on a
# tiny call of every CUDA kernel (bench/sanitize_cases.py); the other op benchmarks, quick
# (OUT_DIR/bench). Every step has its own time limit, writes its results when it ends and is
# reported whether it passes, fails, times out or is skipped; a failing step never stops the
# later ones. OUT_DIR/report.json and report.md hold each step's status, duration and log tail
# (full logs in OUT_DIR/logs/). Exit status 0 when every step passed or was skipped for a stated
# reason.
#
# Environment:
#   PYTHON                      the interpreter with torch (default: python3)
#   QK_GPU_CHECK_BUDGET         seconds for the whole check (default 420, within a 15-minute
#                               lease that includes the machine's start and a rerun); each step
#                               has a cap and leaves time for the steps after it
#   QK_CUDA_ARCHS               archs to build (default: the visible GPU's only, for a short build)
#   QK_GPU_CHECK_CPU_TESTS=1    run the tests even without a GPU (skipped otherwise); without a
#                               GPU the benchmark steps are CPU dry runs
#   QK_GPU_CHECK_DRY_RUN=1      run nothing: print and record the plan, every step taking its
#                               whole limit (the worst case), to show the order and the budget
#
# Budget: each step has a cap (the most it may take) and a floor (the least it is promised);
# a step never runs into the floors of the steps after it, so a step that ends early leaves its
# time to the later ones, and the floors add up to the whole budget.
set -uo pipefail

if [[ $# -ne 1 ]]; then
    echo "usage: bash bench/gpu_check.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1/logs" && OUT=$(cd "$1" && pwd) || exit 2
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 2

export PYTHON=${PYTHON:-python3}
BUDGET=${QK_GPU_CHECK_BUDGET:-420}
DRY_RUN=${QK_GPU_CHECK_DRY_RUN:-0}
STEPS="$OUT/steps.tsv"
: >"$STEPS"
LAST_STATUS=

# The steps in the order they run, by value, with their floors in seconds (adding up to 420).
ORDER=(gpu build info tests heart memcheck racecheck bench)
declare -A FLOOR=([gpu]=20 [build]=145 [info]=15 [tests]=80 [heart]=70 [memcheck]=30
    [racecheck]=30 [bench]=30)

CLOCK=$(date +%s)  # advanced by each step's limit in a dry run
now() { if ((DRY_RUN)); then echo "$CLOCK"; else date +%s; fi; }
START=$(now)
DEADLINE=$((START + BUDGET))

floors_after() {  # NAME: the seconds promised to the steps after NAME, scaled to the budget
    local name total=0 after=0 later=0
    for name in "${ORDER[@]}"; do
        total=$((total + FLOOR[$name]))
        ((later)) && after=$((after + FLOOR[$name]))
        [[ $name == "$1" ]] && later=1
    done
    echo $((after * BUDGET / total))
}

record() {  # NAME STATUS EXIT_CODE SECONDS LIMIT DETAIL
    printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STEPS"
    LAST_STATUS=$2
}

skip_step() {  # NAME REASON
    echo "== $1: skipped ($2)"
    record "$1" skip - 0 0 "$2"
}

# run_step NAME CAP COMMAND...: run COMMAND with its output in logs/NAME.log, for at most CAP
# seconds and never into the floors of the later steps.
run_step() {
    local name=$1 cap=$2
    shift 2
    local reserve
    reserve=$(floors_after "$name")
    local left=$((DEADLINE - reserve - $(now)))
    local limit=$((cap < left ? cap : left))
    if ((limit < 10)); then  # out of time: reported as a timeout, never as a pass
        echo "== $name: not started, the ${BUDGET}s budget is spent"
        record "$name" timeout - 0 0 \
            "not started: the ${BUDGET}s budget is spent (${reserve}s kept for later steps)"
        return
    fi
    if ((DRY_RUN)); then
        echo "== $name (limit ${limit}s, cap ${cap}s, ${reserve}s kept for later steps): $*"
        CLOCK=$((CLOCK + limit))
        record "$name" plan - "$limit" "$limit" "$*"
        return
    fi
    echo "== $name (limit ${limit}s): $*"
    local begin rc status=pass
    begin=$(date +%s)
    # STEP_SIGNAL=INT lets pytest write its report and summary before it stops.
    timeout -s "${STEP_SIGNAL:-TERM}" --kill-after=15 "$limit" "$@" >"$OUT/logs/$name.log" 2>&1
    rc=$?
    if ((rc == 124 || rc == 137)); then
        status=timeout
    elif ((rc != 0)); then
        status=fail
    fi
    record "$name" "$status" "$rc" "$(($(date +%s) - begin))" "$limit" "$*"
    echo "   $status (exit $rc, $(($(date +%s) - begin))s)"
}

probe_gpu() {
    if command -v nvidia-smi >/dev/null; then nvidia-smi; fi
    "$PYTHON" -c '
import torch
print("torch", torch.__version__, "CUDA", torch.version.cuda)
assert torch.cuda.is_available(), "no CUDA GPU is visible to torch"
for i in range(torch.cuda.device_count()):
    print(f"cuda:{i}", torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
'
}
export -f probe_gpu

gpu_arch() {  # the visible GPU's compute capability as setup.py takes it ("9.0a" on Hopper)
    "$PYTHON" -c '
import torch
major, minor = torch.cuda.get_device_capability()
print(f"{major}.{minor}" + ("a" if major == 9 else ""))
'
}

find_sanitizer() {
    command -v compute-sanitizer && return
    local candidate
    for candidate in "${CUDA_HOME:-}" /usr/local/cuda; do
        if [[ -n $candidate && -x $candidate/bin/compute-sanitizer ]]; then
            echo "$candidate/bin/compute-sanitizer"
            return
        fi
    done
}

# Steps by value: a run cut short keeps the results that matter most. Each step writes its own
# results when it ends.
run_step gpu 60 bash -c probe_gpu
HAVE_GPU=0
[[ $LAST_STATUS == pass || $LAST_STATUS == plan ]] && HAVE_GPU=1

if ((HAVE_GPU && !DRY_RUN)) && [[ -z ${QK_CUDA_ARCHS:-} ]]; then
    QK_CUDA_ARCHS=$(gpu_arch) && export QK_CUDA_ARCHS
fi
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
run_step build 240 "$PYTHON" -m pip install --no-build-isolation --no-deps --no-index -e .
run_step info 30 "$PYTHON" -m qwen_kernels info

# The GPU tests of the ops and the encoder, stopping at the first failure.
if ((HAVE_GPU)) || [[ ${QK_GPU_CHECK_CPU_TESTS:-0} == 1 ]]; then
    PARALLEL=()  # pytest-xdist, where installed; loadfile keeps module fixtures on one worker
    if "$PYTHON" -c "import xdist" 2>/dev/null; then PARALLEL=(-n 4 --dist loadfile); fi
    CUBLAS_WORKSPACE_CONFIG=:4096:8 STEP_SIGNAL=INT run_step tests 180 "$PYTHON" -m pytest \
        -x -q -p no:cacheprovider --durations=25 "${PARALLEL[@]}" --junitxml="$OUT/junit.xml" \
        tests/ops tests/model
else
    skip_step tests "no CUDA GPU (set QK_GPU_CHECK_CPU_TESTS=1 to run the suite on the CPU)"
fi

# The heart: window attention on both layer kinds against varlen_attn, SDPA and flash-attn, and
# the encoder end to end against transformers.
BENCH_MODE=(--quick)
((HAVE_GPU)) || BENCH_MODE=(--dry-run)
run_step heart 150 "$PYTHON" -m qwen_kernels bench "${BENCH_MODE[@]}" --op window_attn \
    --op encoder --out "$OUT/bench-heart"

SANITIZER=$(find_sanitizer)
KERNELS=planned
((DRY_RUN)) || KERNELS=$("$PYTHON" -m bench.sanitize_cases --list 2>/dev/null)
for tool in memcheck racecheck; do
    if ((!HAVE_GPU)); then
        skip_step "$tool" "no CUDA GPU"
    elif [[ -z $SANITIZER ]] && ((!DRY_RUN)); then
        skip_step "$tool" "compute-sanitizer not found (PATH, CUDA_HOME, /usr/local/cuda)"
    elif [[ -z $KERNELS ]]; then
        skip_step "$tool" "no op has a CUDA kernel yet (or the package failed to import)"
    else
        # Without the caching allocator every tensor is its own allocation, so memcheck sees
        # accesses past a tensor's end.
        run_step "$tool" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
            "${SANITIZER:-compute-sanitizer}" --tool "$tool" --error-exitcode 99 --print-limit 50 \
            "$PYTHON" -m bench.sanitize_cases
    fi
done

# The other ops, quick: the other benchmark files, the fused op of the attention file, and vLLM's
# tower with and without the plug-in (rows skipped where vllm is not installed).
run_step bench 120 "$PYTHON" -m qwen_kernels bench "${BENCH_MODE[@]}" --op norm_swiglu \
    --op patch_merge --op mrope --op window_attn_rope --op vllm_tower --out "$OUT/bench"

"$PYTHON" bench/gpu_check_report.py "$OUT" --started "$START" --budget "$BUDGET"

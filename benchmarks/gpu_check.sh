#!/usr/bin/env bash
# GPU check: build the extension, run the CUDA and Triton tests, then the benchmarks, all in under 8 minutes, every
# result in one folder ($OUT if set, else benchmarks/out/gpu-DATE, which git ignores). For a fresh GPU machine without
# network whose Python already has torch (>= 2.6), triton, pytest, pytest-benchmark and ninja. Run from the repository
# root:
#     bash benchmarks/gpu_check.sh
# Without a GPU it runs what the CPU allows (environment, build, a no-timing smoke run of the benchmarks, the report,
# the Triton bench's dry run) and skips the GPU phases. GPU_CHECK_BUILD=0 skips the build (extension already built).
# Files written (at most 8): check.log (everything), env.txt, tests.txt, bench.json (ops), steps.json,
# kernels_bench.txt, table.md, plot.png.
set -u
cd "$(dirname "$0")/.."
START=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-460}          # seconds for the whole script (under 8 minutes)
OUT=${OUT:-benchmarks/out/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
LOG="$OUT/check.log"
PY=${PYTHON:-python}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-$(nproc)}
export TRITON_INTERPRET=0                # tests/conftest.py only defaults it to 1: GPU runs are native
export PYTHONUNBUFFERED=1
export FASTNAS_BENCH_REFERENCE_DEVICE=cuda   # the eager and compiled references run on the GPU too

left() { echo $(( BUDGET - ($(date +%s) - START) )); }
# phase NAME SECONDS CMD...: run CMD under `timeout`, capped by what is left of the budget (keeping RESERVE seconds);
# SIGINT first, so that an interrupted pytest still writes its partial --benchmark-json
RESERVE=20
phase() {
    local name=$1 box=$2; shift 2
    local avail=$(( $(left) - RESERVE ))
    (( box > avail )) && box=$avail
    if (( box < 10 )); then echo "== $name: skipped, no time left" | tee -a "$LOG"; return 124; fi
    echo "== $name (time box ${box}s, $(date +%T))" | tee -a "$LOG"
    timeout -s INT -k 15 "$box" "$@" 2>&1 | tee -a "$LOG"
    local rc=${PIPESTATUS[0]}
    echo "== $name: rc=$rc after $(( $(date +%s) - START ))s" | tee -a "$LOG"
    return "$rc"
}

{
    echo "date: $(date -Is)"; echo "host: $(uname -a)"; nproc
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    "$PY" - <<'EOF'
import torch, sys
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda,
      "available", torch.cuda.is_available())
for mod in ("triton", "pytest", "pytest_benchmark", "ninja"):
    try:
        m = __import__(mod); print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "MISSING", exc)
EOF
} 2>&1 | tee "$OUT/env.txt" | tee -a "$LOG"
HAS_GPU=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null || echo 0)

# 1. build (CPU kernels always, CUDA kernels where a toolkit is found)
build() {
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . \
        || "$PY" setup.py build_ext --inplace
}
[ "$HAS_GPU" = 1 ] && export FASTNAS_CUDA=${FASTNAS_CUDA:-1}
if [ "${GPU_CHECK_BUILD:-1}" = 1 ]; then
    phase build 200 build
else  # a machine where others use the installed extension: rewriting the .so under them would crash them
    echo "== build: skipped (GPU_CHECK_BUILD=0)" | tee -a "$LOG"
fi
# without the editable install (build_ext --inplace fallback) fastnas.kernels is not mapped to kernels/: link it
LINKED=0
if ! "$PY" -c "import fastnas.kernels" 2>/dev/null && [ ! -e fastnas/kernels ]; then
    ln -s ../kernels fastnas/kernels && LINKED=1
fi
"$PY" -c "import fastnas.ops as o; print('backends:', o.available_backends())" 2>&1 | tee -a "$LOG"

if [ "$HAS_GPU" = 1 ]; then
    # 2. CUDA and Triton tests (native Triton)
    phase tests 100 "$PY" -m pytest tests/test_ops.py tests/test_cpp_backend.py tests/test_triton_backend.py \
        tests/test_channel_attention.py tests/test_fused_supernet.py tests/test_cuda_graphs.py -q \
        -k "cuda or triton" -p no:cacheprovider 2>&1 | tee "$OUT/tests.txt"
    # 3. op and step benchmarks on the GPU (CPU providers and the CPU-only side-by-side cases deselected)
    phase bench-ops 150 "$PY" -m pytest benchmarks/test_bench_ops.py -q -p no:cacheprovider \
        -k "not cpu and not targets" --benchmark-json="$OUT/bench.json" --benchmark-group-by=group \
        --benchmark-columns=min,median,rounds
    FASTNAS_BENCH_STEP_PROVIDERS=reference_darts,reference,cuda,cuda_graphs,cuda_batched,cuda_batched_graphs,cuda_pc4 \
        phase bench-steps 110 "$PY" -m pytest benchmarks/test_bench_step.py -q -p no:cacheprovider \
        --benchmark-json="$OUT/steps.json" --benchmark-columns=min,median,rounds
    # 4. Triton kernels against the copy bandwidth (CUDA graphs, no Python overhead)
    phase kernels-bench 40 "$PY" -m fastnas.kernels.bench 2>&1 | tee "$OUT/kernels_bench.txt"
else
    echo "== no CUDA device: GPU tests and benchmarks skipped" | tee -a "$LOG"
    # the CPU-only checks of this script: a tiny benchmark run (its JSON feeds the report), the Triton bench's dry run
    phase benchmark-smoke 120 env FASTNAS_BENCH_STEP_BATCH=2 FASTNAS_BENCH_RETRAIN_C=8 FASTNAS_BENCH_RETRAIN_LAYERS=3 \
        FASTNAS_BENCH_STEP_ROUNDS=1 FASTNAS_BENCH_STEP_MEMORY=0 "$PY" -m pytest benchmarks/ -q -p no:cacheprovider \
        -k "(mixed_sum and s1 and fp32 and fwdbwd and not compiled) or search1" --benchmark-json="$OUT/bench.json"
    TRITON_INTERPRET=1 phase kernels-bench-dry 60 "$PY" -m fastnas.kernels.bench --dry --dtypes float32 2>&1 \
        | tee "$OUT/kernels_bench.txt"
fi

# 5. report
JSONS=$(ls "$OUT"/bench.json "$OUT"/steps.json 2>/dev/null | while read -r f; do [ -s "$f" ] && echo "$f"; done)
if [ -n "$JSONS" ]; then
    # shellcheck disable=SC2086
    phase report 30 "$PY" -m benchmarks.report $JSONS --out "$OUT"
fi
[ "$LINKED" = 1 ] && rm -f fastnas/kernels
echo "== done in $(( $(date +%s) - START ))s; results in $OUT:" | tee -a "$LOG"
ls -la "$OUT" | tee -a "$LOG"

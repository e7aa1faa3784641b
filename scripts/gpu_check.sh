#!/usr/bin/env bash
# The checks that need a CUDA GPU, in one run of a few minutes (under 8 on one H100-class GPU):
#   1. the tests marked `cuda` (skipped on a machine without a GPU): the engine on CUDA (greedy
#      equal to the CPU's tokens, bf16/fp16 equal to the model's own forward, seeded sampling
#      equal to the CPU's draws, MTP), attention on the flash / memory-efficient SDPA kernels,
#      a GRPO step on CUDA, and FP8 scaled_mm against its emulation;
#   2. the GPU benchmarks: `nanoseek bench decode` and `nanoseek bench train` with --device cuda.
# Results go to $OUT (default runs/gpu_check): the test log and JUnit XML, each benchmark's output,
# and summary.txt with one line per part. The exit status is 0 only when every part passed.
#
#   scripts/gpu_check.sh                 # from the repository root or anywhere
#   OUT=/tmp/gpu scripts/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3
fi
OUT=${OUT:-runs/gpu_check}
mkdir -p "$OUT"
SUMMARY="$OUT/summary.txt"
: > "$SUMMARY"
status=0

# part NAME SECONDS COMMAND...: run it under a time limit, its output to $OUT/NAME.log, a line to the summary.
part() {
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    echo "== $name: $*"
    timeout --kill-after=10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    tail -n 25 "$OUT/$name.log"
    local verdict=passed
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then verdict="timed out after ${limit}s"; status=1
    elif [ "$rc" -ne 0 ]; then verdict="FAILED (exit $rc)"; status=1
    fi
    echo "$name: $verdict in $((SECONDS - start))s" | tee -a "$SUMMARY"
}

if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check: torch sees no CUDA GPU here; nothing was run" | tee -a "$SUMMARY" >&2
    exit 2
fi
"$PY" -c "import torch; p = torch.cuda.get_device_properties(0); print(f'{p.name}, {p.total_memory / 2**30:.0f} GiB, \
sm_{p.major}{p.minor}; torch {torch.__version__}, CUDA {torch.version.cuda}')" | tee -a "$SUMMARY"

# 1. The CUDA tests (`-m cuda` replaces the default `-m 'not slow'`); -rs lists any skip with its reason.
part cuda-tests 240 "$PY" -m pytest -m cuda -q -rs -p no:cacheprovider --junitxml="$OUT/cuda-tests.xml" tests

# 2. The benchmarks on the GPU: decode (engine vs transformers' generate, then FP8 vs bf16 weights)
#    and training throughput (nanoseek vs transformers), on the `small` preset.
part bench-decode 120 "$PY" -m nanoseek.cli bench decode --device cuda --preset small --batch-sizes 1,16 \
    --new-tokens 128 --repeats 2 --threads 0
part bench-train 75 "$PY" -m nanoseek.cli bench train --device cuda --preset small --batch 8 --seq 256 \
    --steps 6 --json "$OUT/bench-train.json"

echo "gpu_check: $( [ "$status" -eq 0 ] && echo 'all passed' || echo 'some parts failed' ); results in $OUT" \
    | tee -a "$SUMMARY"
exit "$status"

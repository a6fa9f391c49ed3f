#!/usr/bin/env bash
# One command on a GPU machine with no registry: install, GPU tests, every benchmark, plots.
#   bash bench/gpu_check.sh              results under runs/bench/<device>-<date>/ (untracked)
#   bash bench/gpu_check.sh --results    under bench/results/<device>-<date>/ (the tracked results)
#   bash bench/gpu_check.sh --dry-run    no GPU needed: every step's script imports and takes its
#                                        arguments (--help), the GPU tests collect, outputs are writable
# and copied to $OUT if set. Optional peers (liger-kernel, cut-cross-entropy) are installed from
# ./.whl if that folder exists. Each step has its own time limit, so one slow or hung step
# cannot take the whole lease (the device tool allows 10 minutes a call): the limits sum to 9.5 min.
set -uo pipefail
cd "$(dirname "$0")/.."
root=runs/bench
dry=0
for arg in "$@"; do
    case "$arg" in
        --results) root=bench/results ;;
        --dry-run) dry=1 ;;
        *) echo "gpu_check: unknown argument $arg (use --results, --dry-run)" >&2; exit 2 ;;
    esac
done
# first, before installing or creating anything: is there a device at all?
if [ "$dry" = 0 ] && ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); nothing was run" >&2
    exit 1
fi
if [ "$dry" = 0 ]; then
    python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
    if [ -d .whl ]; then python3 -m pip install -q --no-deps .whl/*.whl || true; fi
    export TRITON_INTERPRET=0
    dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
    dir=$root/${dev}-$(date +%F)
else
    dir=$(mktemp -d)
fi
export PYTHONUNBUFFERED=1
mkdir -p "$dir" && [ -w "$dir" ] || { echo "gpu_check: cannot write to $dir" >&2; exit 1; }
status=0
# a dry run checks what would run: pytest collects the GPU tests; each script imports and parses
# its arguments (--help) or, without an argument parser, runs; every output lands in the writable $dir
dry_check() {
    if [ "$2" = "-m" ]; then "$@" --collect-only -q > /dev/null
    elif grep -q argparse "$2"; then python3 "$2" --help > /dev/null
    else "$@"; fi  # plot.py: over the (empty) output folder
}
step() {
    local limit=$1; shift; echo "== $*"
    if [ "$dry" = 1 ]; then
        timeout 300 env TRITON_INTERPRET=1 bash -c "$(declare -f dry_check); dry_check \"\$@\"" _ "$@" \
            || { echo "!! dry run failed: $*"; status=1; }
    else
        timeout "$limit" "$@" || { echo "!! failed or timed out: $*"; status=1; }
    fi
}
step 130 python3 -m pytest -q -m gpu tests --junitxml "$dir/gpu_tests.xml"
# bf16 attention (and its gradients) and the fused loss against float64 on 8K / 32K / 128K-token rows
step 60 python3 bench/gpu_correctness.py --out "$dir/correctness.csv"
step 120 python3 bench/bench_varlen_attention.py --out "$dir/varlen_attention.csv"
step 90 python3 bench/bench_cross_entropy.py --out "$dir/cross_entropy.csv"
step 30 python3 bench/bench_positions.py --out "$dir/positions.csv"
# a small end-to-end run: one epoch of the same 256 sequences for every strategy, 8 ranks emulated
step 120 python3 bench/bench_e2e.py --preset small --world-size 8 --num-samples 256 --out "$dir"
step 20 python3 bench/plot.py "$dir"
if [ "$dry" = 1 ]; then echo "gpu_check --dry-run: $([ $status = 0 ] && echo every step checks out || echo some step failed)"; rm -rf "$dir"; exit $status; fi
if [ -n "${OUT:-}" ]; then cp "$dir"/*.csv "$dir"/*.png "$dir"/*.xml "$OUT"/ 2>/dev/null; fi
exit $status

#!/usr/bin/env bash
# One command on a GPU machine with no registry: install, GPU tests, every benchmark, plots.
#   bash bench/gpu_check.sh              results under runs/bench/<device>-<date>/ (untracked)
#   bash bench/gpu_check.sh --results    under bench/results/<device>-<date>/ (the tracked results)
# and copied to $OUT if set. Optional peers (liger-kernel, cut-cross-entropy) are installed from
# ./.whl if that folder exists. Each step has its own time limit, so one slow or hung step
# cannot take the whole lease (the device tool allows 10 minutes a call): the limits sum to 9.5 min.
set -uo pipefail
cd "$(dirname "$0")/.."
# first, before installing or creating anything: is there a device at all?
if ! python3 -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "gpu_check: no CUDA device is visible (torch.cuda.is_available() is False); nothing was run" >&2
    exit 1
fi
root=runs/bench
if [ "${1:-}" = "--results" ]; then root=bench/results; fi
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
if [ -d .whl ]; then python3 -m pip install -q --no-deps .whl/*.whl || true; fi
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
dir=$root/${dev}-$(date +%F)
mkdir -p "$dir"
status=0
step() { local limit=$1; shift; echo "== $*"; timeout "$limit" "$@" || { echo "!! failed or timed out: $*"; status=1; }; }
step 130 python3 -m pytest -q -m gpu tests --junitxml "$dir/gpu_tests.xml"
step 150 python3 bench/bench_varlen_attention.py --out "$dir/varlen_attention.csv"
step 90 python3 bench/bench_cross_entropy.py --out "$dir/cross_entropy.csv"
step 30 python3 bench/bench_positions.py --out "$dir/positions.csv"
# a small end-to-end run: one epoch of the same 256 sequences for every strategy, 8 ranks emulated
step 150 python3 bench/bench_e2e.py --preset small --world-size 8 --num-samples 256 --out "$dir"
step 20 python3 bench/plot.py "$dir"
if [ -n "${OUT:-}" ]; then cp "$dir"/*.csv "$dir"/*.png "$dir"/*.xml "$OUT"/ 2>/dev/null; fi
exit $status

#!/usr/bin/env bash
# One command on a GPU machine with no registry: install, GPU tests, every benchmark, plots.
#   bash bench/gpu_check.sh            (results under bench/results/<device>-<date>/, and $OUT if set)
# Optional peers (liger-kernel, cut-cross-entropy) are installed from ./.whl if that folder exists.
set -uo pipefail
cd "$(dirname "$0")/.."
python3 -m pip install -q --no-build-isolation --no-deps -e . || exit 1
if [ -d .whl ]; then python3 -m pip install -q --no-deps .whl/*.whl || true; fi
export TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
dev=$(python3 -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
dir=bench/results/${dev}-$(date +%F)
mkdir -p "$dir"
status=0
python3 -m pytest -q -m gpu tests 2>&1 | tee "$dir/gpu_tests.log" || status=1
python3 bench/bench_varlen_attention.py --out "$dir/varlen_attention.csv" || status=1
python3 bench/bench_cross_entropy.py --out "$dir/cross_entropy.csv" || status=1
python3 bench/bench_positions.py --out "$dir/positions.csv" || status=1
python3 bench/bench_e2e.py --preset small --world-size 8 --out "$dir" || status=1
python3 bench/plot.py "$dir" || status=1
if [ -n "${OUT:-}" ]; then cp "$dir"/*.csv "$dir"/*.png "$dir"/*.log "$OUT"/ 2>/dev/null; fi
exit $status

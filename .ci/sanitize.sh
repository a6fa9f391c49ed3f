#!/usr/bin/env bash
# The C++ extension built once with AddressSanitizer + UndefinedBehaviorSanitizer and run over
# its tests (packer, positions, their hypothesis properties). Any report aborts the run
# (-fno-sanitize-recover=all; ASan aborts by default). Leak checking is off: CPython and torch
# keep allocations alive until exit by design.
set -euo pipefail
cd "$(dirname "$0")/.."
build=build/sanitize
flags="-fsanitize=address,undefined -fno-sanitize-recover=all -fno-omit-frame-pointer -g -O1"
cmake -S . -B "$build" -G Ninja -DCMAKE_BUILD_TYPE=RelWithDebInfo -DLONGALIGN_BUILD_CUDA=OFF \
  -DCMAKE_CXX_FLAGS="$flags" -DCMAKE_MODULE_LINKER_FLAGS="-fsanitize=address,undefined" \
  -Dpybind11_DIR="$(python3 -m pybind11 --cmakedir)" -DPython_EXECUTABLE="$(command -v python3)" > "$build.log" 2>&1 \
  || { cat "$build.log"; exit 1; }
cmake --build "$build" --target _C >> "$build.log" 2>&1 || { cat "$build.log"; exit 1; }
so=$(ls "$build"/_C*.so)
echo "sanitize: built $so"
rm -f "$build"/report.*
# reports go to files: pytest captures stderr, and an aborting process never prints it
LD_PRELOAD="$(g++ -print-file-name=libasan.so):$(g++ -print-file-name=libubsan.so)" \
ASAN_OPTIONS="detect_leaks=0:abort_on_error=1:log_path=$PWD/$build/report" \
UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1:log_path=$PWD/$build/report" \
LONGALIGN_SANITIZED_C="$PWD/$so" PYTHONPATH=".ci/sanitize${PYTHONPATH:+:$PYTHONPATH}" \
  python3 -m pytest -q -p preload_sanitized_c tests/test_packer.py tests/test_positions.py \
  || { status=$?; echo "sanitize: the tests failed (exit $status); reports:"; cat "$build"/report.* 2>/dev/null; exit "$status"; }

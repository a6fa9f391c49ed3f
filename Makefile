# The two set-up commands of the README:  `make demo` (the tiny training demo on CPU) and
# `make test` (the test suite, Triton kernels through the interpreter). Both install first.
PY ?= python3
PIP := $(PY) -m pip
# CPU wheel of torch (on disk on the project's machines) and the triton of the GPU machines.
# numpy<2.4: triton 3.6's interpreter calls int() on 1-element arrays (loop bounds loaded from
# cu_seqlens), which numpy 2.4 turned from a deprecation warning into a TypeError.
TORCH_PIN := torch==2.13.0 triton==3.6.0 "numpy<2.4"
# where `make demo` writes (bench/results/<device>-<date>/... to keep a run as the README's source)
DEMO_OUT ?= runs/demo

.PHONY: install test sanitize test-gpu demo bench-cpu

install:
	$(PIP) install -q $(TORCH_PIN) pybind11 scikit-build-core ninja
	$(PIP) install -q --no-build-isolation -e ".[test,train]"

# two pytest workers, one for each core of the CI machine, each torch on one thread (two busy
# processes with a thread pool each stall one another); the slowest tests are printed
test: install
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -n 2 --durations=25 tests

sanitize: install
	bash .ci/sanitize.sh

demo: install
	$(PY) bench/bench_e2e.py --preset tiny --world-size 8 --num-samples 256 --out $(DEMO_OUT)

# pytest-benchmark: ours and the peers (plain-Python BFD, lightbinpack, NumPy) in one run, saved as
# JSON with machine info under bench/results/pytest-benchmark/ and compared with the last saved
# run of this machine kind (a regression shows in the comparison table)
BENCH_STORAGE := file://bench/results/pytest-benchmark
bench-cpu: install
	$(PIP) install -q pytest-benchmark
	$(PIP) install -q --no-deps lightbinpack
	$(PY) -m pytest bench/test_cpu_benchmarks.py -p no:cacheprovider --benchmark-storage=$(BENCH_STORAGE) \
		--benchmark-autosave $$(ls bench/results/pytest-benchmark/*/*.json >/dev/null 2>&1 && echo --benchmark-compare) \
		--benchmark-columns=min,median,iqr,max,rounds --benchmark-sort=name

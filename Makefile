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

test: install
	TRITON_INTERPRET=1 $(PY) -m pytest -q tests

sanitize: install
	bash .ci/sanitize.sh

demo: install
	$(PY) bench/bench_e2e.py --preset tiny --world-size 8 --num-samples 256 --out $(DEMO_OUT)

bench-cpu: install
	$(PY) bench/bench_packer.py
	$(PY) bench/bench_positions.py
